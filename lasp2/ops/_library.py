"""LASP-2 linear attention as torch.library custom ops.

Registered ops (opaque to torch.compile / torch.export, with fake kernels for
tracing and an autograd formula):
  lasp2::lasp2_forward(q, k, v, g?, decay?, doc_start?, scale, chunk_size, comm, parts, overlap)
      -> (o, local_records, prefix_states, maps)
  lasp2::lasp2_backward(q, k, v, g?, decay?, doc_start?, scale, chunk_size, comm, parts,
                        do, local_records, prefix_states, maps, need_dg) -> (dq, dk, dv, dg, d_decay)

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
        o, _, saved = _C.lasp2_forward(_args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts), overlap)
    records, prefixes, maps = saved
    if comm == 0:
        # one device: the schedule leaves these buffers unwritten (backward reads none of
        # them); a custom op's outputs must be deterministic (opcheck, AOT tracing)
        for buffer in (records, prefixes, maps):
            buffer.zero_()
    return o, records, prefixes, maps


def _args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts):
    return _C.LinearAttentionArgs(q, k, v, g=g, decay=decay, doc_start=doc_start, scale=scale, comm=_comm(comm),
                                  parts_per_rank=parts, chunk_size=chunk_size)


@lasp2_forward.register_fake
def _(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, overlap):
    # sizes of csrc/core/sp/lasp2.cpp's Lasp2Saved for the scalar-decay family
    B, _, H, dk = q.shape
    dv = v.shape[3]
    bh = B * H
    f32 = dict(dtype=torch.float32, device=q.device)
    return (torch.empty_like(v),  # the kernel's output keeps v's strides (at::empty_like)
            q.new_empty(parts * (bh * dk * dv + bh), **f32),
            q.new_empty(parts * bh * dk * dv, **f32),
            q.new_empty((_world(comm) * parts + 2) * bh, **f32))


def _decay_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if (q.device.type == "cpu" and q.dtype == torch.float64) else torch.float32


@torch.library.custom_op("lasp2::lasp2_backward", mutates_args=())
def lasp2_backward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                   doc_start: Optional[Tensor], scale: float, chunk_size: int, comm: int, parts: int,
                   do: Tensor, records: Tensor, prefixes: Tensor, maps: Tensor,
                   need_dg: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    with C.named_errors(OP):
        dq, dk, dv, dg, d_decay, _ = _C.lasp2_backward(
            _args(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts), [records, prefixes, maps], do,
            need_dg)
    # dg ([B, T, H], for g) and d_decay ([H], for decay, summed over tokens) in their
    # inputs' dtypes; an empty tensor stands for "not asked for"
    return dq, dk, dv, _or_empty(dg, q), _or_empty(d_decay, q)


@lasp2_backward.register_fake
def _(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, do, records, prefixes, maps, need_dg):
    dg = q.new_empty(q.shape[:3], dtype=g.dtype) if (need_dg and g is not None) else None
    d_decay = q.new_empty(decay.shape, dtype=decay.dtype) if (need_dg and decay is not None) else None
    dg, d_decay = _or_empty(dg, q), _or_empty(d_decay, q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, d_decay


def _or_empty(grad: Optional[Tensor], q: Tensor) -> Tensor:
    """A custom op returns tensors only: an empty one (a fresh one each time, outputs
    must not alias) stands for a gradient not asked for."""
    return q.new_empty(0, dtype=_decay_dtype(q)) if grad is None else grad


def _setup_context(ctx, inputs, output):
    q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, _overlap = inputs
    _, records, prefixes, maps = output
    ctx.save_for_backward(q, k, v, g, decay, doc_start, records, prefixes, maps)
    ctx.config = (scale, chunk_size, comm, parts)


def _backward(ctx, do, _d_records, _d_prefixes, _d_maps):
    q, k, v, g, decay, doc_start, records, prefixes, maps = ctx.saved_tensors
    scale, chunk_size, comm, parts = ctx.config
    need_g, need_decay = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    with torch.no_grad():
        dq, dk, dv, dg, d_decay = lasp2_backward(q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts, do,
                                                 records, prefixes, maps, bool(need_g or need_decay))
    grads = C.guard_double_backward(OP, (dq, dk, dv, dg if need_g else None, d_decay if need_decay else None))
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
