// Binding of the fused L2 norm (qk_l2norm_op.h). q and k: tensors of 1 to 4 dims, one
// shape, dtype and device, the head dim last; any strides (a last dim that is not
// contiguous is copied first). Outputs: y = at::empty_like of the (last-dim contiguous)
// input, so a dense layout (Megatron's [T, B, H, D] seen as [B, T, H, D]) is kept and
// anything else comes back contiguous (the custom op's fake kernel says the same); rstd
// x.shape[:-1] contiguous, float32 (float64 for float64 inputs). dx: at::empty_like(y).
// On the CPU half precisions run through float32 copies (the CPU kernels take float /
// double), rounded once on the way back, as the CUDA kernels round.
#include "qk_l2norm_op.h"

#include <c10/core/DeviceGuard.h>

#include <string>
#include <tuple>

#include "lasp2/qk_l2norm.h"
#include "tensor_views.h"

namespace lasp2::torch_binding {
namespace {

at::Tensor last_dim_contiguous(const at::Tensor& x) {
  return x.size(-1) == 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

// A [B, T, H, D] view of a tensor of 1..4 dims (leading size-1 dims added).
at::Tensor as_4d(const at::Tensor& x) {
  at::Tensor v = x;
  while (v.dim() < 4) v = v.unsqueeze(0);
  return v;
}

L2NormShape shape_of(const at::Tensor& x4, ScalarType dtype) {
  return {dtype, x4.size(0), x4.size(1), x4.size(2), x4.size(3)};
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// On the CPU the kernels compute in float / double: 16-bit tensors go through float32.
bool via_float(const at::Tensor& x) { return !x.is_cuda() && (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16); }

void check_pair(const char* op, const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  const std::string o = std::string(op) + ": ";
  LASP2_CHECK(a.dim() >= 1 && a.dim() <= 4, o + "`" + an + "` must have 1 to 4 dims ([B, T, H, D] or fewer)");
  LASP2_CHECK(a.sizes() == b.sizes(), o + "`" + bn + "` must have the shape of `" + an + "`");
  LASP2_CHECK(a.scalar_type() == b.scalar_type(), o + "`" + bn + "` must have the dtype of `" + an + "`");
  LASP2_CHECK(a.device() == b.device(), o + "`" + bn + "` must be on the device of `" + an + "`");
  LASP2_CHECK(a.size(-1) >= 1, o + "the head dim of `" + an + "` must be >= 1");
  LASP2_CHECK(a.is_cuda() || a.is_cpu(), o + "`" + an + "` must be a CPU or CUDA tensor");
  from_aten(a.scalar_type(), an);  // float32, float64, float16 or bfloat16
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                   double eps) {
  check_pair("qk_l2norm_forward", q_in, "q", k_in, "k");
  LASP2_CHECK(eps >= 0, "qk_l2norm_forward: `eps` must be >= 0");
  const c10::DeviceGuard guard(q_in.device());
  const at::Tensor q = last_dim_contiguous(q_in), k = last_dim_contiguous(k_in);
  at::Tensor yq = at::empty_like(q), yk = at::empty_like(k);
  const auto rstd_shape = q.sizes().slice(0, q.dim() - 1);
  const at::TensorOptions acc = q.options().dtype(acc_type(q.scalar_type()));
  at::Tensor rq = at::empty(rstd_shape, acc), rk = at::empty(rstd_shape, acc);
  const bool f32 = via_float(q);
  // the tensors the kernels read and write (float32 twins on the CPU for 16-bit)
  const at::Tensor xq = f32 ? q.to(at::kFloat) : q, xk = f32 ? k.to(at::kFloat) : k;
  at::Tensor oq = f32 ? at::empty_like(xq) : yq, ok = f32 ? at::empty_like(xk) : yk;

  L2NormForwardArgs args;
  const at::Tensor xq4 = as_4d(xq), xk4 = as_4d(xk);
  at::Tensor oq4 = as_4d(oq), ok4 = as_4d(ok);
  args.shape = shape_of(xq4, from_aten(xq.scalar_type(), "q"));
  args.eps = eps;
  args.count = 2;
  args.t[0] = {const_view(xq4, "q"), mut_view(oq4, "q_hat"), rq.data_ptr()};
  args.t[1] = {const_view(xk4, "k"), mut_view(ok4, "k_hat"), rk.data_ptr()};
  l2norm_forward(core_device(q), args, current_stream(q));
  if (f32) {
    yq.copy_(oq);
    yk.copy_(ok);
  }
  return {yq, yk, rq, rk};
}

std::tuple<at::Tensor, at::Tensor> backward(const at::Tensor& dq_in, const at::Tensor& dk_in, const at::Tensor& yq_in,
                                            const at::Tensor& yk_in, const at::Tensor& rq, const at::Tensor& rk) {
  const char* op = "qk_l2norm_backward";
  check_pair(op, yq_in, "q_hat", yk_in, "k_hat");
  check_pair(op, yq_in, "q_hat", dq_in, "dq_hat");
  check_pair(op, yq_in, "q_hat", dk_in, "dk_hat");
  const at::ScalarType acc_t = acc_type(yq_in.scalar_type());
  const auto rstd_shape = yq_in.sizes().slice(0, yq_in.dim() - 1);
  for (const at::Tensor* r : {&rq, &rk}) {
    LASP2_CHECK(r->sizes() == rstd_shape && r->scalar_type() == acc_t && r->is_contiguous() &&
                    r->device() == yq_in.device(),
                std::string(op) + ": rstd must be the forward's (contiguous, q_hat.shape[:-1], " +
                    c10::toString(acc_t) + ")");
  }
  const c10::DeviceGuard guard(yq_in.device());
  const at::Tensor yq = last_dim_contiguous(yq_in), yk = last_dim_contiguous(yk_in);
  const at::Tensor dq = last_dim_contiguous(dq_in), dk = last_dim_contiguous(dk_in);
  at::Tensor gq = at::empty_like(yq), gk = at::empty_like(yk);
  const bool f32 = via_float(yq);
  auto twin = [&](const at::Tensor& t) { return f32 ? t.to(at::kFloat) : t; };
  const at::Tensor dq4 = as_4d(twin(dq)), dk4 = as_4d(twin(dk)), yq4 = as_4d(twin(yq)), yk4 = as_4d(twin(yk));
  at::Tensor oq = f32 ? at::empty_like(yq, at::kFloat) : gq, ok = f32 ? at::empty_like(yk, at::kFloat) : gk;
  at::Tensor oq4 = as_4d(oq), ok4 = as_4d(ok);

  L2NormBackwardArgs args;
  args.shape = shape_of(yq4, from_aten(yq4.scalar_type(), "q_hat"));
  args.count = 2;
  args.t[0] = {const_view(dq4, "dq_hat"), const_view(yq4, "q_hat"), rq.data_ptr(), mut_view(oq4, "dq")};
  args.t[1] = {const_view(dk4, "dk_hat"), const_view(yk4, "k_hat"), rk.data_ptr(), mut_view(ok4, "dk")};
  l2norm_backward(core_device(yq), args, current_stream(yq));
  if (f32) {
    gq.copy_(oq);
    gk.copy_(ok);
  }
  return {gq, gk};
}

}  // namespace

void register_qk_l2norm(pybind11::module_& m) {
  namespace py = pybind11;
  m.def("qk_l2norm_forward", &forward, py::arg("q"), py::arg("k"), py::arg("eps"),
        "(q_hat, k_hat, rstd_q, rstd_k): x * rsqrt(sum x^2 + eps) over the last dim, one launch for both "
        "(lasp2/qk_l2norm.h)");
  m.def("qk_l2norm_backward", &backward, py::arg("dq_hat"), py::arg("dk_hat"), py::arg("q_hat"), py::arg("k_hat"),
        py::arg("rstd_q"), py::arg("rstd_k"), "(dq, dk) = rstd * (dy - y <dy, y>), one launch for both");
}

}  // namespace lasp2::torch_binding
