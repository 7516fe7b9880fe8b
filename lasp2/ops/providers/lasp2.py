"""LASP-2: every rank gathers the other parts' d_k x d_v state summaries in ONE
AllGather per direction (forward: each part's (M, L); backward: each part's state
gradient), and the C++ core (csrc/core/sp/lasp2.cpp) combines them. Any split; on
one device (no communicator) it is the plain single-device op.

The schedule runs through the torch.library custom op of lasp2/ops/_library.py, so
torch.compile (fullgraph), torch.export and opcheck see one opaque op with its fake
kernel and autograd formula."""

from __future__ import annotations

from lasp2.ops._library import lasp2_linear_attention
from lasp2.ops.providers.base import KernelCall, Provider


class Lasp2LinearAttention:
    """apply(q, k, v, g, decay, call) -> o: inputs are [B, T, H, D] views; `call`
    carries everything else."""

    @staticmethod
    def apply(q, k, v, g, decay, call: KernelCall):
        return lasp2_linear_attention(q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size, call.comm,
                                      call.parts_per_rank, call.overlap)


class Lasp2Provider(Provider):
    name = "lasp2"
    takes_states = True
    checks_in_op = True

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap, **in_op_check):
        """in_op_check: lasp2.ops._library.compiled_check's arguments (a compiled call
        over a group: the custom op checks the ranks)."""
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm(), sp_context.parts_per_rank,
                          overlap)
        if in_op_check:
            return lasp2_linear_attention(q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size, call.comm,
                                          call.parts_per_rank, call.overlap, **in_op_check)
        return Lasp2LinearAttention.apply(q, k, v, g, decay, call)

    def apply_with_states(self, q, k, v, g, decay, initial_state, *, scale, sp_context, overlap,
                          output_final_state, head_doc, num_seqs, **in_op_check):
        """apply() with the sequences' initial / final states -> (o, final_state or None)."""
        call = KernelCall(scale, sp_context.doc_start_on(q.device), sp_context.comm(), sp_context.parts_per_rank,
                          overlap)
        out = lasp2_linear_attention(q, k, v, g, decay, call.doc_start, call.scale, call.chunk_size, call.comm,
                                     call.parts_per_rank, call.overlap, initial_state=initial_state,
                                     output_final_state=output_final_state, head_doc=head_doc, num_seqs=num_seqs,
                                     **in_op_check)
        return out if output_final_state else (out, None)
