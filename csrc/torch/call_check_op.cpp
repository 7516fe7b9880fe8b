#include "call_check_op.h"

#include "lasp2/call_check.h"
#include "tensor_views.h"

namespace lasp2::torch_binding {

std::optional<std::pair<at::Tensor, int64_t>> take_call_check_words(const at::Tensor& like) {
  const CallCheck check = take_call_check();
  if (!check.armed()) return std::nullopt;
  LASP2_CHECK(check.device == core_device(like),
              "the call's consistency check and the op's tensors are on different devices (CPU vs CUDA)");
  // the check's ring entry (restaged by a later call): the op keeps its own copy
  const at::Tensor entry = at::from_blob(const_cast<int64_t*>(check.words), {check.count},
                                         like.options().dtype(at::kLong));
  return std::make_pair(entry.clone(), static_cast<int64_t>(check.max_mask));
}

void poison_on_failed_words(const at::Tensor& gathered, int64_t max_mask, const std::vector<at::Tensor>& targets) {
  LASP2_CHECK(gathered.dim() == 2 && gathered.scalar_type() == at::kLong && gathered.is_contiguous(),
              "poison_on_failed_words: `gathered` must be a contiguous int64 [world, count] tensor");
  LASP2_CHECK(gathered.size(0) >= 1 && gathered.size(1) >= 1 && gathered.size(1) <= kCallCheckWords,
              "poison_on_failed_words: `gathered` holds 1.." + std::to_string(kCallCheckWords) + " words per rank");
  LASP2_CHECK(static_cast<int>(targets.size()) <= kMaxPoisonTargets, "poison_on_failed_words: too many targets");
  CallCheck check;
  check.words = gathered.data_ptr<int64_t>();
  check.count = static_cast<int>(gathered.size(1));
  check.max_mask = static_cast<uint32_t>(max_mask);
  check.device = core_device(gathered);
  std::vector<PoisonTarget> views;
  for (const at::Tensor& t : targets) {
    LASP2_CHECK(t.device() == gathered.device(), "poison_on_failed_words: a target is not on `gathered`'s device");
    at::Tensor target = t;  // mut_view takes a non-const reference (a handle to the same data)
    const MutView v = mut_view(target, "target");
    views.push_back({v.data, from_aten(t.scalar_type(), "target"), t.size(0), t.size(1), t.size(2), t.size(3),
                     v.stride});
  }
  poison_on_failed_check(check.device, reinterpret_cast<const float*>(check.words), 2 * gathered.size(1),
                         static_cast<int>(gathered.size(0)), check, views.data(), static_cast<int>(views.size()),
                         current_stream(gathered));
}

void register_call_check(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("take_call_check_words", &take_call_check_words, py::arg("like"),
        "-> (the armed words, int64 [count] on like's device; their max mask) or None, disarmed "
        "(lasp2/call_check.h)");
  m.def("poison_on_failed_words", &poison_on_failed_words, py::arg("gathered"), py::arg("max_mask"),
        py::arg("targets"), "NaN into every target when the ranks' gathered words fail (lasp2/call_check.h)");
}

}  // namespace lasp2::torch_binding
