"""LASP-1: the state entering each rank's part travels along a ring of P2P sends
(rank r-1 -> r in forward, r+1 -> r in backward); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Contiguous split only."""

from __future__ import annotations

import torch

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops.providers.base import KernelCall, Provider

OP = "lasp2.linear_attention"


class Lasp1LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views of this rank's contiguous share of the sequence."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, call: KernelCall):
        args = _C.LinearAttentionArgs(q, k, v, g=g, decay=decay, doc_start=call.doc_start, scale=call.scale,
                                      comm=call.comm, chunk_size=call.chunk_size)
        with C.named_errors(OP):
            o, saved = _C.lasp1_forward(args)
        # KV-state caching: the received state and the part's own (M, L) serve backward.
        ctx.save_for_backward(*args.tensors(), *saved)
        ctx.args = args.config()
        return o

    @staticmethod
    def backward(ctx, do):
        n = _C.LinearAttentionArgs.num_tensors
        args = ctx.args.with_tensors(ctx.saved_tensors[:n])
        need_dg = bool(ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        with torch.no_grad(), C.named_errors(OP):
            dq, dk, dv, dg, d_decay = _C.lasp1_backward(args, ctx.saved_tensors[n:], do, need_dg)
        grads = C.guard_double_backward(OP, (dq, dk, dv, dg if ctx.needs_input_grad[3] else None,
                                             d_decay if ctx.needs_input_grad[4] else None))
        return (*grads, None)


class Lasp1Provider(Provider):
    name = "lasp1"
    splits = ("contiguous",)

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap):
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm())
        return Lasp1LinearAttention.apply(q, k, v, g, decay, call)
