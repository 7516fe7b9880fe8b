"""LASP-1: the state entering each rank's part travels along a ring of P2P sends
(rank r-1 -> r in forward, r+1 -> r in backward); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Contiguous split only."""

from __future__ import annotations

import torch

from lasp2._extension import _C
from lasp2.ops import _checks as C

OP = "lasp2.linear_attention"


class Lasp1LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views of this rank's contiguous share of the sequence."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, doc_start, scale, chunk_size, comm):
        with C.named_errors(OP):
            o, entering, record = _C.lasp1_forward(q, k, v, g, decay, doc_start, scale, chunk_size, comm)
        # KV-state caching: the received state and the part's own (M, L) serve backward.
        ctx.save_for_backward(q, k, v, g, decay, doc_start, entering, record)
        ctx.config = (scale, chunk_size, comm)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, decay, doc_start, entering, record = ctx.saved_tensors
        scale, chunk_size, comm = ctx.config
        need_dg = bool(ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        if do.stride(-1) != 1:
            do = do.contiguous()
        with torch.no_grad(), C.named_errors(OP):
            dq, dk, dv, dg = _C.lasp1_backward(q, k, v, g, decay, doc_start, scale, chunk_size, comm,
                                               do, entering, record, need_dg)
            d_g = dg.to(g.dtype) if ctx.needs_input_grad[3] else None
            # A fixed decay acts as the same gate at every token: its gradient is the sum.
            d_decay = dg.sum(dim=(0, 1)).to(decay.dtype) if ctx.needs_input_grad[4] else None
        grads = C.guard_double_backward(OP, (dq, dk, dv, d_g, d_decay))
        return (*grads, None, None, None, None)
