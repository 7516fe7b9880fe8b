"""The fused L2 norm of q and k over the head dim (use_qk_l2norm=True of
lasp2.gated_delta_rule / lasp2.kda) as torch.library custom ops.

    y = x * rsqrt(sum_d x_d^2 + eps),   dx = rstd * (dy - y <dy, y>)

the unfused formula's function (eps 1e-6, as fla's l2norm), computed by one kernel
launch for q and k together forward and one backward (csrc/core/qk_l2norm.cpp, the CUDA
kernels in csrc/core/cuda/l2norm_kernels.cu) instead of autograd over several
elementwise ops, each a pass over a whole [B, T, H, D] tensor.

Registered ops (opaque to torch.compile / torch.export, with fake kernels and an
autograd formula):
  lasp2::qk_l2norm_forward(q, k, eps) -> (q_hat, k_hat, rstd_q, rstd_k)
  lasp2::qk_l2norm_backward(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k) -> (dq, dk)
q and k: one shape ([B, T, H, D] or fewer dims, D last), dtype (float32, float64,
float16, bfloat16) and device, any strides (a last dim that is not contiguous is
copied first). q_hat / k_hat: torch.empty_like of that input, so a dense layout such as
Megatron's [T, B, H, D] seen as [B, T, H, D] is kept; rstd: x.shape[:-1], float32
(float64 for float64 inputs). In plain eager mode qk_l2norm runs the same functions
through a torch.autograd.Function (lasp2.ops._eager: no custom-op dispatch cost).
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops._eager import eager_call, eager_function, reject_functorch

L2NORM_EPS = 1e-6  # as fla's l2norm
OP = "lasp2.qk_l2norm"


def _last_dim_contiguous(x: Tensor) -> Tensor:
    """What the kernels read: x itself unless its last dim is strided (the binding's rule)."""
    return x if x.shape[-1] == 1 or x.stride(-1) == 1 else x.contiguous()


def _rstd_like(x: Tensor) -> Tensor:
    return x.new_empty(x.shape[:-1], dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)


def _forward_impl(q: Tensor, k: Tensor, eps: float):
    try:
        return tuple(_C.qk_l2norm_forward(q, k, eps))
    except RuntimeError as exc:  # e.g. a failed launch; bad arguments raise ValueError naming them
        C.reraise_named(OP, exc)


@torch.library.custom_op("lasp2::qk_l2norm_forward", mutates_args=())
def qk_l2norm_forward(q: Tensor, k: Tensor, eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, eps)


@qk_l2norm_forward.register_fake
def _(q, k, eps):
    return (torch.empty_like(_last_dim_contiguous(q)), torch.empty_like(_last_dim_contiguous(k)), _rstd_like(q),
            _rstd_like(k))


def _backward_impl(dq_hat: Tensor, dk_hat: Tensor, q_hat: Tensor, k_hat: Tensor, rstd_q: Tensor, rstd_k: Tensor):
    try:
        return tuple(_C.qk_l2norm_backward(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k))
    except RuntimeError as exc:
        C.reraise_named(OP, exc)


@torch.library.custom_op("lasp2::qk_l2norm_backward", mutates_args=())
def qk_l2norm_backward(dq_hat: Tensor, dk_hat: Tensor, q_hat: Tensor, k_hat: Tensor, rstd_q: Tensor,
                       rstd_k: Tensor) -> Tuple[Tensor, Tensor]:
    return _backward_impl(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k)


@qk_l2norm_backward.register_fake
def _(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k):
    return torch.empty_like(_last_dim_contiguous(q_hat)), torch.empty_like(_last_dim_contiguous(k_hat))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*output)  # q_hat, k_hat, rstd_q, rstd_k: the inputs are not needed


def _backward(ctx, dq_hat, dk_hat, *_d_rstd):
    q_hat, k_hat, rstd_q, rstd_k = ctx.saved_tensors
    # an output the loss does not use sends no gradient (None) in the eager Function
    dq_hat = torch.zeros_like(q_hat) if dq_hat is None else dq_hat
    dk_hat = torch.zeros_like(k_hat) if dk_hat is None else dk_hat
    run = _backward_impl if eager_call(dq_hat, dk_hat, q_hat) else qk_l2norm_backward
    with torch.no_grad():
        dq, dk = run(dq_hat, dk_hat, q_hat, k_hat, rstd_q, rstd_k)
    need = ctx.needs_input_grad
    dq, dk = C.guard_double_backward(OP, (dq if need[0] else None, dk if need[1] else None))
    return dq, dk, None


torch.library.register_autograd("lasp2::qk_l2norm_forward", _backward, setup_context=_setup_context)
# rstd (outputs 2, 3) only carries what the backward needs
_EagerForward = eager_function("QkL2NormForward", _forward_impl, _setup_context, _backward, internal_outputs=(2, 3))


def qk_l2norm(q: Tensor, k: Tensor, eps: float = L2NORM_EPS) -> Tuple[Tensor, Tensor]:
    """(q, k) each L2-normalised over its last dim, x * rsqrt(sum x^2 + eps), through one
    fused op (both tensors in one kernel launch each way). q and k share shape, dtype and
    device."""
    reject_functorch(OP)
    run = _EagerForward.apply if eager_call(q, k) else qk_l2norm_forward
    out = run(q, k, float(eps))
    return out[0], out[1]


def custom_op_names():
    return ("lasp2::qk_l2norm_forward", "lasp2::qk_l2norm_backward")
