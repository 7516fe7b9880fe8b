"""LASP-2: every rank gathers the other parts' d_k x d_v state summaries in ONE
AllGather per direction (forward: each part's (M, L); backward: each part's state
gradient), and the C++ core (csrc/core/sp/lasp2.cpp) combines them. Any split; on
one device (no communicator) it is the plain single-device op."""

from __future__ import annotations

import torch

from lasp2._extension import _C
from lasp2.ops.providers.base import KernelCall, Provider, gate_gradients, needs_gate_gradient


class Lasp2LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views; `call` carries everything else."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, call: KernelCall):
        o, records, prefixes, log_decays = _C.lasp2_forward(
            q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size, call.comm, call.parts_per_rank,
            call.overlap)
        ctx.save_for_backward(q, k, v, g, decay, records, prefixes, log_decays)
        ctx.call = call
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, g, decay, records, prefixes, log_decays = ctx.saved_tensors
        call = ctx.call
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv, dg = _C.lasp2_backward(
            q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size, call.comm, call.parts_per_rank,
            do, records, prefixes, log_decays, needs_gate_gradient(ctx.needs_input_grad))
        return (dq, dk, dv, *gate_gradients(ctx.needs_input_grad, g, decay, dg), None)


class Lasp2Provider(Provider):
    name = "lasp2"

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap):
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm(), sp_context.parts_per_rank,
                          overlap)
        return Lasp2LinearAttention.apply(q, k, v, g, decay, call)
