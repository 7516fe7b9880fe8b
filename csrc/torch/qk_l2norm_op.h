// The fused L2 norm of q and k (lasp2/qk_l2norm.h) for PyTorch tensors: the kernels of
// the custom ops lasp2::qk_l2norm_forward / _backward (lasp2/ops/_l2norm_library.py).
#pragma once

#include <torch/extension.h>

namespace lasp2::torch_binding {

// Adds qk_l2norm_forward(q, k, eps) -> (q_hat, k_hat, rstd_q, rstd_k) and
// qk_l2norm_backward(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k) -> (dq, dk).
void register_qk_l2norm(pybind11::module_& m);

}  // namespace lasp2::torch_binding
