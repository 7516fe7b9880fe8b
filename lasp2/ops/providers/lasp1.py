"""LASP-1: the state entering each part travels along a ring of P2P sends in global
part order (contiguous split: rank r-1 -> r in forward, r+1 -> r in backward; the
balanced split runs up the ranks and back down); the C++ core runs the schedule
(csrc/core/sp/lasp1.cpp). Sequence states work as under LASP-2; the final states
arise on different ranks, so they take one more AllGather (and their gradients one
in backward).

The schedule runs as torch.library custom ops, like LASP-2's (lasp2/ops/_library.py):
  lasp2::lasp1_forward(q, k, v, g?, decay?, doc_start?, initial_state?, scale, chunk_size, comm,
                       parts, head_doc, num_seqs, output_final_state, check, consistency?)
      -> (o, final_state, entering_states, local_records, head_maps)
  lasp2::lasp1_backward(q, k, v, g?, decay?, doc_start?, initial_state?, scale, chunk_size, comm,
                        parts, head_doc, num_seqs, do, d_final_state?, entering_states,
                        local_records, head_maps, need_dg, need_dinitial)
      -> (dq, dk, dv, dg, d_decay, d_initial_state)
so torch.compile(fullgraph=True) takes a call over a group: `comm` is the
communicator's int handle (under torch.compile the group's, _delta_library.group_handle,
a constant of the graph) and `check` / `consistency` run the per-call cross-rank check
inside the op's real kernel (_library.compiled_check; 0 / None: the eager entry point
checked the ranks before the op). Plain eager calls run the same functions through a
torch.autograd.Function (lasp2.ops._eager). final_state is an empty tensor when not
asked for, as are the gradients not asked for.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops import _library as L
from lasp2.ops._documents import final_state_grad
from lasp2.ops._eager import eager_call, eager_function, reject_functorch
from lasp2.ops._opaque import handle_of
from lasp2.ops.providers.base import KernelCall, Provider

OP = "lasp2.linear_attention"


def _packed(doc_start, head_doc) -> bool:
    """Packed documents carrying their own states (N = the number of documents)."""
    return doc_start is not None and len(head_doc) > 0


def _forward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                   output_final_state, check=0, consistency=None):
    if check:  # compiled over a group: the cross-rank check (and the gates' signs) here, before the ring
        L._check_in_op(q, g, decay, scale, check, consistency, initial_state)
    args = L._args(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                   None, False)
    with C.named_errors(OP):
        o, final, saved = _C.lasp1_forward(args, output_final_state)
    return (o, final if final is not None else q.new_empty(0, dtype=torch.float32), *saved)


def _forward_impl(*inputs):
    out = _forward_eager(*inputs)
    doc_start, initial_state, comm, head_doc, output_final_state = (inputs[i] for i in (5, 6, 9, 11, 13))
    # a custom op's outputs must be deterministic (opcheck, AOT tracing): zero what the
    # ring leaves unwritten (one device without states: every buffer, backward reads none
    # of them; the one-float head maps without packed documents' states)
    if comm == 0 and initial_state is None and not output_final_state:
        for buffer in out[2:]:
            buffer.zero_()
    elif not _packed(doc_start, head_doc):
        out[4].zero_()
    return out


@torch.library.custom_op("lasp2::lasp1_forward", mutates_args=())
def lasp1_forward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                  doc_start: Optional[Tensor], initial_state: Optional[Tensor], scale: float, chunk_size: int,
                  comm: int, parts: int, head_doc: List[int], num_seqs: int, output_final_state: bool,
                  check: int = 0, consistency: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                   Tensor]:
    return _forward_impl(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc,
                         num_seqs, output_final_state, check, consistency)


@lasp1_forward.register_fake
def _(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
      output_final_state, check=0, consistency=None):
    # sizes of csrc/core/include/lasp2/lasp1.h's Lasp1Saved for the scalar-decay family
    B, _, H, dk = q.shape
    dv = v.shape[3]
    bh = B * H
    f32 = dict(dtype=torch.float32)
    n = num_seqs if _packed(doc_start, head_doc) else B
    return (torch.empty_like(v),  # the kernel's output keeps v's strides (at::empty_like)
            q.new_empty((n, H, dk, dv) if output_final_state else (0,), **f32),
            q.new_empty(parts * bh * dk * dv, **f32),
            q.new_empty(parts * (bh * dk * dv + bh), **f32),
            q.new_empty(max(parts * bh if _packed(doc_start, head_doc) else 0, 1), **f32))


def _backward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                    do, d_final_state, entering, records, head_maps, need_dg, need_dinitial):
    """The ring's gradients, None where not asked for (the custom op returns empty tensors)."""
    args = L._args(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                   None, False)
    with C.named_errors(OP):
        return _C.lasp1_backward(args, [entering, records, head_maps], do, need_dg, d_final_state, need_dinitial)


@torch.library.custom_op("lasp2::lasp1_backward", mutates_args=())
def lasp1_backward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                   doc_start: Optional[Tensor], initial_state: Optional[Tensor], scale: float, chunk_size: int,
                   comm: int, parts: int, head_doc: List[int], num_seqs: int, do: Tensor,
                   d_final_state: Optional[Tensor], entering: Tensor, records: Tensor, head_maps: Tensor,
                   need_dg: bool, need_dinitial: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc,
                            num_seqs, do, d_final_state, entering, records, head_maps, need_dg, need_dinitial)
    return tuple(L._or_empty(x, q) for x in grads)


@lasp1_backward.register_fake
def _(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs, do,
      d_final_state, entering, records, head_maps, need_dg, need_dinitial):
    # the binding's gradient epilogue is LASP-2's (csrc/torch/attention_params.cpp): the same sizes
    dg = q.new_empty(q.shape[:3], dtype=g.dtype) if (need_dg and g is not None) else None
    d_decay = q.new_empty(decay.shape, dtype=decay.dtype) if (need_dg and decay is not None) else None
    d_initial = torch.empty_like(initial_state) if (need_dinitial and initial_state is not None) else None
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
            *(L._or_empty(x, q) for x in (dg, d_decay, d_initial)))


def _setup_context(ctx, inputs, output):
    (q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
     output_final_state, *_check) = inputs
    ctx.save_for_backward(q, k, v, g, decay, doc_start, initial_state, *output[2:])
    ctx.config = (scale, chunk_size, comm, parts, list(head_doc), num_seqs, output_final_state)


def _backward(ctx, do, d_final, *_d_saved):
    q, k, v, g, decay, doc_start, initial_state, *saved = ctx.saved_tensors
    scale, chunk_size, comm, parts, head_doc, num_seqs, output_final_state = ctx.config
    need = ctx.needs_input_grad
    need_dinitial = initial_state is not None and need[6]
    # the final states took no part in the loss: the same ring, zero gradient (every rank
    # makes the same collectives)
    d_final = final_state_grad(d_final, output_final_state, q, v, num_seqs if _packed(doc_start, head_doc)
                               else q.shape[0])
    if do is None:  # only the final states took part in the loss
        do = torch.zeros_like(v)
    run = _backward_eager if eager_call(do, q) else lasp1_backward
    with torch.no_grad():
        dq, dk, dv, dg, d_decay, d_initial = run(
            q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs, do,
            d_final, *saved, bool(need[3] or need[4]), bool(need_dinitial))
    grads = C.guard_double_backward(OP, (dq, dk, dv, dg if need[3] else None, d_decay if need[4] else None,
                                         d_initial if need_dinitial else None))
    return (*grads[:5], None, grads[5], *([None] * 9))


torch.library.register_autograd("lasp2::lasp1_forward", _backward, setup_context=_setup_context)
_EagerForward = eager_function("Lasp1Forward", _forward_eager, _setup_context, _backward,
                               internal_outputs=(2, 3, 4))


def lasp1_linear_attention(q, k, v, g, decay, initial_state, call: KernelCall, output_final_state: bool,
                           head_doc, num_seqs: int, check: int = 0, consistency=None):
    """One rank's (o, final_state: empty unless output_final_state) through the custom op.
    check / consistency: _library.compiled_check's (compiled calls over a group: the op
    checks the ranks, and `check` is also the communicator's handle)."""
    reject_functorch(OP)
    handle = int(check) if check else handle_of(call.comm)
    args = (q, k, v, g, decay, call.doc_start, initial_state, float(call.scale), int(call.chunk_size), handle,
            int(call.parts_per_rank), [int(d) for d in head_doc], int(num_seqs), bool(output_final_state))
    if check:
        out = lasp1_forward(*args, int(check), list(consistency))
    elif eager_call(q, k, v, g, decay, call.doc_start, initial_state):
        out = _EagerForward.apply(*args)
    else:
        out = lasp1_forward(*args)
    return out[0], out[1]


class Lasp1Provider(Provider):
    name = "lasp1"
    takes_states = True
    checks_in_op = True

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap, **in_op_check):
        return self._run(q, k, v, g, decay, None, scale, sp_context, False, (), 0, in_op_check)[0]

    def apply_with_states(self, q, k, v, g, decay, initial_state, *, scale, sp_context, overlap,
                          output_final_state, head_doc, num_seqs, **in_op_check):
        """apply() with the sequences' initial / final states -> (o, final_state or None)."""
        o, final = self._run(q, k, v, g, decay, initial_state, scale, sp_context, output_final_state, head_doc,
                             num_seqs, in_op_check)
        return o, (final if output_final_state else None)

    @staticmethod
    def _run(q, k, v, g, decay, initial_state, scale, sp_context, output_final_state, head_doc, num_seqs,
             in_op_check):
        # compiled (in_op_check): the communicator travels as the check's group handle
        comm = None if in_op_check else sp_context.comm()
        call = KernelCall(scale, sp_context.doc_start_on(q.device), comm, sp_context.parts_per_rank)
        return lasp1_linear_attention(q, k, v, g, decay, initial_state, call, output_final_state, tuple(head_doc),
                                      int(num_seqs), **in_op_check)
