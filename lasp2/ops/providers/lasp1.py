"""LASP-1: the state entering each part travels along a ring of P2P sends in global
part order (contiguous split: rank r-1 -> r in forward, r+1 -> r in backward; the
balanced split runs up the ranks and back down); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Sequence states work as under LASP-2; the final states
arise on different ranks, so they take one more AllGather (and their gradients one
in backward)."""

from __future__ import annotations

import torch

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops.providers.base import KernelCall, Provider

OP = "lasp2.linear_attention"


class Lasp1LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views of this rank's share of the sequence; returns
    (o, final_state), final_state an empty tensor unless output_final_state."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, initial_state, call: KernelCall, output_final_state, head_doc, num_seqs):
        args = _C.LinearAttentionArgs(q, k, v, g=g, decay=decay, doc_start=call.doc_start,
                                      initial_state=initial_state, scale=call.scale, comm=call.comm,
                                      parts_per_rank=call.parts_per_rank, chunk_size=call.chunk_size,
                                      head_doc=list(head_doc), num_seqs=num_seqs)
        with C.named_errors(OP):
            o, final, saved = _C.lasp1_forward(args, output_final_state)
        # KV-state caching: the received states and the parts' own records serve backward.
        ctx.save_for_backward(*args.tensors(), *saved)
        ctx.args = args.config()
        ctx.output_final_state = output_final_state
        ctx.num_seqs = num_seqs if call.doc_start is not None and head_doc else q.shape[0]
        ctx.set_materialize_grads(False)
        if final is None:
            final = o.new_empty(0, dtype=torch.float32)
            ctx.mark_non_differentiable(final)
        return o, final

    @staticmethod
    def backward(ctx, do, d_final):
        n = _C.LinearAttentionArgs.num_tensors
        tensors = ctx.saved_tensors[:n]
        q, v, initial_state = tensors[0], tensors[2], tensors[6]
        args = ctx.args.with_tensors(tensors)
        need = ctx.needs_input_grad
        need_dg = bool(need[3] or need[4])
        need_dinitial = bool(initial_state is not None and need[5])
        if do is None:  # only the final states took part in the loss
            do = torch.zeros_like(v)
        if not ctx.output_final_state:
            d_final = None
        elif d_final is None:  # the final states took no part in the loss: the same ring, zero gradient
            d_final = q.new_zeros((ctx.num_seqs, q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)
        with torch.no_grad(), C.named_errors(OP):
            dq, dk, dv, dg, d_decay, d_initial = _C.lasp1_backward(args, ctx.saved_tensors[n:], do, need_dg,
                                                                   d_final, need_dinitial)
        grads = C.guard_double_backward(OP, (dq, dk, dv, dg if need[3] else None, d_decay if need[4] else None,
                                             d_initial if need_dinitial else None))
        return (*grads, None, None, None, None)


class Lasp1Provider(Provider):
    name = "lasp1"
    takes_states = True

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap):
        return self._run(q, k, v, g, decay, None, scale, sp_context, False, (), 0)[0]

    def apply_with_states(self, q, k, v, g, decay, initial_state, *, scale, sp_context, overlap,
                          output_final_state, head_doc, num_seqs):
        """apply() with the sequences' initial / final states -> (o, final_state or None)."""
        o, final = self._run(q, k, v, g, decay, initial_state, scale, sp_context, output_final_state, head_doc,
                             num_seqs)
        return o, (final if output_final_state else None)

    @staticmethod
    def _run(q, k, v, g, decay, initial_state, scale, sp_context, output_final_state, head_doc, num_seqs):
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm(), sp_context.parts_per_rank)
        return Lasp1LinearAttention.apply(q, k, v, g, decay, initial_state, call, output_final_state,
                                          tuple(head_doc), int(num_seqs))
