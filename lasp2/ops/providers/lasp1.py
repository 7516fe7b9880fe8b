"""LASP-1: the state entering each rank's part travels along a ring of P2P sends
(rank r-1 -> r in forward, r+1 -> r in backward); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Contiguous split only."""

from __future__ import annotations

import torch

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops.providers.base import KernelCall, Provider, gate_gradients, needs_gate_gradient

OP = "lasp2.linear_attention"


class Lasp1LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views of this rank's contiguous share of the sequence."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, call: KernelCall):
        with C.named_errors(OP):
            o, entering, record = _C.lasp1_forward(q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size,
                                                   call.comm)
        # KV-state caching: the received state and the part's own (M, L) serve backward.
        ctx.save_for_backward(q, k, v, g, decay, entering, record)
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, decay, entering, record = ctx.saved_tensors
        call = ctx.call
        if do.stride(-1) != 1:
            do = do.contiguous()
        with torch.no_grad(), C.named_errors(OP):
            dq, dk, dv, dg = _C.lasp1_backward(q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size,
                                               call.comm, do, entering, record,
                                               needs_gate_gradient(ctx.needs_input_grad))
        grads = C.guard_double_backward(OP, (dq, dk, dv, *gate_gradients(ctx.needs_input_grad, g, decay, dg)))
        return (*grads, None)


class Lasp1Provider(Provider):
    name = "lasp1"
    splits = ("contiguous",)

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap):
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm())
        return Lasp1LinearAttention.apply(q, k, v, g, decay, call)
