#include "lasp2_eager_node.h"

#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/functions/basic_ops.h>
#include <torch/csrc/utils/pybind.h>

#include <string>

#include "lasp2_op.h"

namespace lasp2::torch_binding {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr const char* kOp = "lasp2.linear_attention";

// The same arguments lasp2.ops._library builds for a one-device call (no communicator,
// one part, no documents, no states).
LinearAttentionArgs one_device_args(at::Tensor q, at::Tensor k, at::Tensor v, OptTensor g, OptTensor decay,
                                    double scale, int64_t chunk_size) {
  return LinearAttentionArgs{std::move(q), std::move(k), std::move(v), std::move(g), std::move(decay),
                             std::nullopt, std::nullopt, scale, nullptr, 1, chunk_size, {}, 0};
}

OptTensor present(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// lasp2.ops._checks.guard_double_backward: under create_graph=True the gradients get
// a graph whose backward raises, so a second-order term is never dropped silently.
void guard_double_backward(variable_list& grads) {
  variable_list present_grads;
  for (const at::Tensor& g : grads)
    if (g.defined()) present_grads.push_back(g.detach().requires_grad_(true));
  if (present_grads.empty()) return;
  torch::autograd::DelayedError error(
      std::string(kOp) + ": double backward (create_graph=True through this op, e.g. a gradient penalty) "
                         "is not supported; its backward is not differentiable",
      static_cast<int64_t>(present_grads.size()));
  variable_list wrapped = error.apply(std::move(present_grads));
  size_t next = 0;
  for (at::Tensor& g : grads)
    if (g.defined()) g = wrapped[next++];
}

// A backward's error as the Python eager Function gave it: lasp2::Error as
// lasp2._C.Lasp2Error (set as the Python error, which autograd carries to the caller's
// thread), a Python error raised inside (e.g. by a dispatch mode around the backward)
// as itself (its type and message are in the thread's Python error state, which a
// std::exception's what() does not carry), anything else prefixed with the op's name
// (C.reraise_named's rule).
[[noreturn]] void rethrow_named() {
  try {
    throw;
  } catch (const python_error&) {
    throw;
  } catch (const lasp2::Error& e) {
    pybind11::gil_scoped_acquire gil;
    const pybind11::object type = pybind11::module_::import("lasp2._C").attr("Lasp2Error");
    PyErr_SetString(type.ptr(), e.what());
    throw python_error();
  } catch (const std::exception& e) {
    // torch's errors without their C++ backtrace, as Python shows them
    const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
    const std::string what = c10_error ? c10_error->what_without_backtrace() : e.what();
    if (what.rfind(kOp, 0) == 0) throw;
    throw std::runtime_error(std::string(kOp) + ": " + what);
  }
}

struct OneDevice : public torch::autograd::Function<OneDevice> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const OptTensor& g, const OptTensor& decay, double scale, int64_t chunk_size,
                            bool overlap) {
    (void)overlap;  // LASP-2's forward schedule flag: one device has no gather to overlap
    auto [o, states] = lasp2_one_device_forward(one_device_args(q, k, v, g, decay, scale, chunk_size));
    ctx->save_for_backward({q, k, v, g.value_or(at::Tensor()), decay.value_or(at::Tensor()), states});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["chunk_size"] = chunk_size;
    return o;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2];
    const OptTensor g = present(s[3]), decay = present(s[4]);
    // next edges hold only the tensor inputs present: g's is 3, decay's follows it
    const bool need_g = g && ctx->needs_input_grad(3);
    const bool need_decay = decay && ctx->needs_input_grad(g ? 4 : 3);
    const at::Tensor dout = grad_outputs[0].defined() ? grad_outputs[0] : at::zeros_like(v);
    std::vector<OptTensor> grads;
    try {
      grads = lasp2_one_device_backward(one_device_args(q, k, v, g, decay, ctx->saved_data["scale"].toDouble(),
                                                        ctx->saved_data["chunk_size"].toInt()),
                                        s[5], dout, need_g || need_decay);
    } catch (...) {
      rethrow_named();
    }
    // one gradient per forward argument: q, k, v, g, decay, then the three non-tensors
    variable_list out{grads[0].value_or(at::Tensor()), grads[1].value_or(at::Tensor()),
                      grads[2].value_or(at::Tensor()),
                      need_g ? grads[3].value_or(at::Tensor()) : at::Tensor(),
                      need_decay ? grads[4].value_or(at::Tensor()) : at::Tensor(),
                      at::Tensor(), at::Tensor(), at::Tensor()};
    if (at::GradMode::is_enabled()) guard_double_backward(out);
    return out;
  }
};

}  // namespace

at::Tensor lasp2_one_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                            const OptTensor& decay, double scale, int64_t chunk_size, bool overlap) {
  return OneDevice::apply(q, k, v, g, decay, scale, chunk_size, overlap);
}

}  // namespace lasp2::torch_binding
