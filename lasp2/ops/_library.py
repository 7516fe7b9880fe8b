"""LASP-2 linear attention as torch.library custom ops.

Registered ops (opaque to torch.compile / torch.export, with fake kernels for
tracing and an autograd formula):
  lasp2::lasp2_forward(q, k, v, g?, decay?, doc_start?, scale, chunk_size, comm, parts, overlap)
      -> (o, local_records, prefix_states, log_decays)
  lasp2::lasp2_backward(q, k, v, g?, decay?, doc_start?, scale, chunk_size, comm, parts,
                        do, local_records, prefix_states, log_decays, need_dg) -> (dq, dk, dv, dg)

A communicator is not a tensor or a schema type, so it travels as an int handle
(0: one device) into a registry that keeps it alive; communicators are cached per
group by lasp2.distributed.communicator, so the registry does not grow per call.
The value checks that need tensor contents (positive gates on CPU) run inside the
real kernel, so traced / compiled graphs keep them without a graph break.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from lasp2._extension import _C
from lasp2.ops import _checks as C

OP = "lasp2.linear_attention"
_COMMS: dict = {}


def comm_handle(comm) -> int:
    if comm is None:
        return 0
    handle = id(comm)
    _COMMS[handle] = comm
    return handle


def _comm(handle: int):
    return None if handle == 0 else _COMMS[handle]


def _world(handle: int) -> int:
    return 1 if handle == 0 else int(_COMMS[handle].size)


@torch.library.custom_op("lasp2::lasp2_forward", mutates_args=())
def lasp2_forward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                  doc_start: Optional[Tensor], scale: float, chunk_size: int, comm: int, parts: int,
                  overlap: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    C.check_log_gates(OP, "g", g)
    C.check_log_gates(OP, "decay", decay)
    with C.named_errors(OP):
        o, records, prefixes, log_decays = _C.lasp2_forward(q, k, v, g, decay, doc_start, scale, chunk_size,
                                                            _comm(comm), parts, overlap)
    if comm == 0:  # one device: backward needs none of them (and they are uninitialised)
        records, prefixes, log_decays = (q.new_empty(0, dtype=torch.float32) for _ in range(3))
    return o, records, prefixes, log_decays


@lasp2_forward.register_fake
def _(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, overlap):
    B, _, H, dk = q.shape
    dv = v.shape[3]
    bh = B * H
    one = comm == 0
    f32 = dict(dtype=torch.float32, device=q.device)
    return (torch.empty_like(v),  # the kernel's output keeps v's strides (at::empty_like)
            q.new_empty(0 if one else parts * (bh * dk * dv + bh), **f32),
            q.new_empty(0 if one else parts * bh * dk * dv, **f32),
            q.new_empty(0 if one else _world(comm) * parts * bh, **f32))


def _decay_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if (q.device.type == "cpu" and q.dtype == torch.float64) else torch.float32


@torch.library.custom_op("lasp2::lasp2_backward", mutates_args=())
def lasp2_backward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                   doc_start: Optional[Tensor], scale: float, chunk_size: int, comm: int, parts: int,
                   do: Tensor, records: Tensor, prefixes: Tensor, log_decays: Tensor,
                   need_dg: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    if do.stride(-1) != 1:
        do = do.contiguous()
    with C.named_errors(OP):
        dq, dk, dv, dg = _C.lasp2_backward(q, k, v, g, decay, doc_start, scale, chunk_size, _comm(comm),
                                           parts, do, records, prefixes, log_decays, need_dg)
    if dg is None or not need_dg:
        dg = q.new_empty(0, dtype=_decay_dtype(q))
    return dq, dk, dv, dg


@lasp2_backward.register_fake
def _(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, do, records, prefixes, log_decays, need_dg):
    dg_shape = q.shape[:3] if need_dg else (0,)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            q.new_empty(dg_shape, dtype=_decay_dtype(q)))


_CONFIG = ("scale", "chunk_size", "comm", "parts")


def _setup_context(ctx, inputs, output):
    q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, _overlap = inputs
    _, records, prefixes, log_decays = output
    ctx.save_for_backward(q, k, v, g, decay, doc_start, records, prefixes, log_decays)
    ctx.config = (scale, chunk_size, comm, parts)
    ctx.dtypes = (None if g is None else g.dtype, None if decay is None else decay.dtype)


def _backward(ctx, do, _d_records, _d_prefixes, _d_log_decays):
    q, k, v, g, decay, doc_start, records, prefixes, log_decays = ctx.saved_tensors
    scale, chunk_size, comm, parts = ctx.config
    need_g, need_decay = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    with torch.no_grad():
        dq, dk, dv, dg = lasp2_backward(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, do,
                                        records, prefixes, log_decays, bool(need_g or need_decay))
        d_g = dg.to(ctx.dtypes[0]) if need_g else None
        # a fixed decay acts as the same gate at every token: its gradient is the sum
        d_decay = dg.sum(dim=(0, 1)).to(ctx.dtypes[1]) if need_decay else None
    grads = C.guard_double_backward(OP, (dq, dk, dv, d_g, d_decay))
    return (*grads, None, None, None, None, None, None)


torch.library.register_autograd("lasp2::lasp2_forward", _backward, setup_context=_setup_context)


def lasp2_linear_attention(q, k, v, g, decay, doc_start, scale: float, chunk_size: int, comm, parts: int,
                           overlap: bool) -> Tensor:
    """The LASP-2 schedule (or one device when comm is None) through the custom op."""
    if not torch.compiler.is_compiling() and _under_functorch():
        raise NotImplementedError(
            f"{OP}: torch.func transforms (grad, vmap, jacrev, ...) are not supported by this op; "
            "use torch.autograd (torch.autograd.grad / .backward) or torch.compile")
    return lasp2_forward(q, k, v, g, decay, doc_start, float(scale), int(chunk_size), comm_handle(comm),
                         int(parts), bool(overlap))[0]


def _under_functorch() -> bool:
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def custom_op_names() -> Sequence[str]:
    return ("lasp2::lasp2_forward", "lasp2::lasp2_backward")
