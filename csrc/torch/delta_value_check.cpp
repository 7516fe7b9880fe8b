#include "delta_value_check.h"

#include <array>
#include <limits>
#include <memory>
#include <optional>

#ifdef LASP2_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace py = pybind11;

namespace lasp2::torch_binding {
namespace {

// [max g, min beta, max beta] in float64 (NaN where the tensor holds one: max and
// aminmax propagate NaN), copied to pinned host memory behind an event on CUDA.
class PendingValueStats {
 public:
  PendingValueStats(const at::Tensor& g, const at::Tensor& beta) {
    const double inf = std::numeric_limits<double>::infinity();
    const bool empty = g.numel() == 0 || beta.numel() == 0;  // nothing to check
    const at::TensorOptions f64 = g.options().dtype(at::kDouble);
    at::Tensor stats;
    if (empty) {
      stats = at::tensor({-inf, 0.0, 0.0}, f64);
    } else {
      const auto [beta_min, beta_max] = at::aminmax(beta);
      // stack promotes to the widest of the dtypes, so no value is rounded
      stats = at::stack({g.max(), beta_min, beta_max}).to(at::kDouble);
    }
    if (!g.is_cuda()) {
      host_ = stats;
      return;
    }
#ifdef LASP2_WITH_CUDA
    host_ = at::empty({3}, at::TensorOptions().dtype(at::kDouble).pinned_memory(true));
    host_.copy_(stats, /*non_blocking=*/true);
    event_.emplace();
    event_->record(c10::cuda::getCurrentCUDAStream(g.get_device()));
#endif
  }

  // Waits for the reductions alone (not for what the stream ran after them).
  std::array<double, 3> wait() {
#ifdef LASP2_WITH_CUDA
    if (event_) event_->synchronize();
#endif
    const double* v = host_.data_ptr<double>();
    return {v[0], v[1], v[2]};
  }

 private:
  at::Tensor host_;
#ifdef LASP2_WITH_CUDA
  std::optional<at::cuda::CUDAEvent> event_;
#endif
};

}  // namespace

void register_delta_value_check(py::module_& m) {
  py::class_<PendingValueStats, std::shared_ptr<PendingValueStats>>(m, "PendingValueStats")
      .def("wait", &PendingValueStats::wait, py::call_guard<py::gil_scoped_release>(),
           "(max g, min beta, max beta) as floats, NaN where a NaN is present");
  m.def(
      "delta_value_stats",
      [](const at::Tensor& g, const at::Tensor& beta) { return std::make_shared<PendingValueStats>(g, beta); },
      py::arg("g"), py::arg("beta"),
      "starts the one-pass value checks of the delta rule's g and beta (delta_value_check.h)");
}

}  // namespace lasp2::torch_binding
