"""LASP-1: the state entering each rank's part travels along a ring of P2P sends
(rank r-1 -> r in forward, r+1 -> r in backward); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Contiguous split only."""

from __future__ import annotations

import torch

from lasp2._extension import _C


class Lasp1LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views of this rank's contiguous share of the sequence."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, doc_start, scale, chunk_size, comm):
        args = _C.LinearAttentionArgs(q, k, v, g=g, decay=decay, doc_start=doc_start, scale=scale, comm=comm,
                                      chunk_size=chunk_size)
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
        dq, dk, dv, dg, d_decay = _C.lasp1_backward(args, ctx.saved_tensors[n:], do, need_dg)
        return dq, dk, dv, dg, d_decay, None, None, None, None
