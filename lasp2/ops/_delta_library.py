"""The delta-rule family (gated DeltaNet, KDA) as torch.library custom ops.

Registered ops (opaque to torch.compile / torch.export, with fake kernels for
tracing and an autograd formula):
  lasp2::delta_rule_forward(q, k, v, g, beta, cu_seqlens?, initial_state?, scale, chunk_size,
                            comm, parts, ring, num_seqs, output_final_state, consistency,
                            keep=True)
      -> (o, final_state, saved0, saved1, saved2, saved3, kept)
  lasp2::delta_rule_backward(q, k, v, g, beta, cu_seqlens?, initial_state?, scale, chunk_size,
                             comm, parts, ring, num_seqs, do, d_final_state?,
                             saved0, saved1, saved2, saved3, kept, need_dg, need_dbeta, need_dinitial)
      -> (dq, dk, dv, dg, dbeta, d_initial_state)
q, k, v, g, beta are [B, T, H, *] views (g [B, T, H] for GDN, [B, T, H, Dk] for KDA);
cu_seqlens the global document boundaries (a tensor: the op reads its values, so a
compiled graph takes packed documents without a graph break), num_seqs N (B, or the
number of documents: cu_seqlens.numel() - 1).
ring=False runs LASP-2 (saved: local records, prefix states, map table, head maps),
ring=True LASP-1 (saved: entering states, local records, head maps, and an unused
one-float buffer so both schedules return the same number of tensors). kept: what the
CUDA chunked kernels' forward keeps for the backward (GDN: prep's w, meta, T; KDA: prep's
w, qg, kd, P, eL, T; both: the state pass's v_new and per-chunk states; fp32 values; empty
on the CPU, for other dtypes or head dims, for packed documents with their own states,
with LASP2_DELTA_KEEP_FORWARD=0 (KDA also LASP2_DELTA_KDA_KEEP_FORWARD=0), and with
keep=False: delta_rule passes keep only when a backward can follow; its size:
_forward_kept_floats, docs/delta_rule.md). final_state is
[N, H, Dk, Dv] float32 (N = B, or num_seqs documents), an empty tensor when not asked
for; d_final_state is this rank's, d_initial_state its share ("the sum of the ranks'
losses", docs/delta_rule.md). An empty gradient stands for "not asked for". In plain
eager mode the entry point runs the same functions through a torch.autograd.Function
instead of the registered op (lasp2.ops._eager: the custom op's Python dispatch costs
host time per call).

The communicator and the process group travel as one int handle (0: one device;
lasp2.ops._opaque). What needs tensor contents runs in the real kernel, not in the
traced Python: the value checks of g, beta and cu_seqlens (ValueError naming them), the
planning of the documents from cu_seqlens and, on a group, the per-call cross-rank
consistency check (`consistency` holds its integer fields), so compiled graphs keep
all of them without a graph break.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from lasp2._extension import _C
from lasp2.distributed.communicator import get_communicator, group_rank_and_size
from lasp2.ops import _checks as C
from lasp2.ops._documents import final_state_grad, local_documents
from lasp2.ops._eager import eager_call, eager_function, reject_functorch
from lasp2.ops._group_consistency import report_local_failure, tensor_bits_digest, verify_group_consistency
from lasp2.ops._opaque import handle_of, resolve

# The fields of the cross-rank check, in the order of `consistency`.
CONSISTENCY_FIELDS = (
    "batch size", "local sequence length", "heads", "key head dim", "value head dim", "dtype",
    "gate kind (GDN/KDA)", "split", "number of sequences", "use of cu_seqlens", "use of initial_state",
    "output_final_state", "use_qk_l2norm", "provider (lasp2/lasp1/ulysses)", "dtype of `g`", "dtype of `beta`",
    "layout (bthd/tbhd)", "building a backward (grad mode and an input requiring grad)")


def op_name(g: Tensor) -> str:
    return "lasp2.kda" if g.dim() == 4 else "lasp2.gated_delta_rule"


def _value_error(stats: Sequence[float]) -> Optional[str]:
    """What is wrong with the values of g and beta (None: nothing), from their one-pass
    statistics (max g, min beta, max beta; NaN where a tensor holds one) that
    _C.delta_value_stats reduces on the tensors' device (csrc/torch/delta_value_check.h)."""
    g_max, beta_min, beta_max = stats
    if math.isnan(g_max):
        return "`g` contains NaN"
    if g_max > 0:
        return (f"`g` holds log gates, which must be <= 0 (max is {g_max:.4g}); "
                "use e.g. -softplus(...) or logsigmoid(...)")
    if not (beta_min >= 0 and beta_max <= 1):  # NaN fails both
        return f"`beta` must lie in [0, 1] (e.g. sigmoid(...)); got values in [{beta_min:.4g}, {beta_max:.4g}]"
    return None


def _raise_value_error(g: Tensor, stats: Sequence[float]):
    error = _value_error(stats)
    if error is not None:
        C.fail(op_name(g), error)


def _documents(q: Tensor, g: Tensor, cu_seqlens: Optional[Tensor], group, parts: int):
    """(doc_start, doc_id, head_doc, boundaries) of this rank from the global cu_seqlens
    ((None, None, [], None) without documents); ValueError naming `cu_seqlens` for bad values."""
    if cu_seqlens is None:
        return None, None, [], None
    rank, world = group_rank_and_size(group)
    return local_documents(op_name(g), cu_seqlens, q.shape[1], rank, world, parts, q.device)


def _check_call(q: Tensor, g: Tensor, beta: Tensor, group, scale: float, consistency: List[int],
                cu_seqlens: Optional[Tensor], parts: int, initial_state: Optional[Tensor] = None):
    """The value checks (g, beta, cu_seqlens), then (on a group) the cross-rank check: a
    rank whose values are bad still takes part in the check's collective, so no rank
    waits for it. Returns this rank's documents (_documents). initial_state's values are
    compared too: every rank must pass the same (docs/reliability.md; with copies that
    differed, LASP-2 returned different final states per rank and "ulysses" started each
    head from its own rank's copy).

    A group with no `consistency` fields is a call made with a RanksChecked proof: its
    caller ran both checks before its own collectives (gated_delta_rule.check_call_early),
    so neither runs again (the documents, read here, were checked there too)."""
    op = op_name(g)
    if group is not None and not consistency:
        return _documents(q, g, cu_seqlens, group, parts)[:3]
    try:
        _raise_value_error(g, _C.delta_value_stats(g, beta).wait())
        doc_start, doc_id, head_doc, bounds = _documents(q, g, cu_seqlens, group, parts)
    except ValueError:
        report_local_failure(op, group, q)
        raise
    if group is not None and consistency:
        verify_group_consistency(op, group, consistency, CONSISTENCY_FIELDS, q.device,
                                 host_values=[("`scale`", float(scale)), ("`cu_seqlens` contents", bounds),
                                              ("`initial_state` values", tensor_bits_digest(initial_state))])
    return doc_start, doc_id, head_doc


def _comm_and_group(handle: int):
    return resolve(handle) if handle else (None, None)


def _packed_states(cu_seqlens, initial_state, states_used: bool) -> bool:
    return cu_seqlens is not None and (initial_state is not None or states_used)


def _forward_impl(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs,
                  output_final_state, consistency, keep=True):
    communicator, group = _comm_and_group(comm)
    # One CUDA device without documents: nothing else reads values on the host, so the
    # check of g and beta waits for its reductions only after the kernels are launched
    # (they are safe on any values; a bad call raises and its outputs are dropped) and
    # the GPU never idles for it. Otherwise it goes first: a rank with bad values must
    # fail before the collectives.
    pending = _C.delta_value_stats(g, beta) if (group is None and cu_seqlens is None and g.is_cuda) else None
    if pending is None:
        doc_start, doc_id, head_doc = _check_call(q, g, beta, group, scale, consistency, cu_seqlens, parts,
                                                  initial_state)
    else:
        doc_start, doc_id, head_doc = None, None, []
    with C.named_errors(op_name(g)):
        o, final, saved, kept = _C.delta_forward(q, k, v, g, beta, doc_start, doc_id, list(head_doc), num_seqs,
                                           initial_state, scale, chunk_size, communicator, parts,
                                           output_final_state, ring, keep)
    # a custom op's outputs must be deterministic (opcheck, AOT tracing): zero what the
    # schedule leaves unwritten (one device without states: every buffer; the head maps
    # without packed documents' states)
    if communicator is None and initial_state is None and not output_final_state:
        for buffer in saved:
            buffer.zero_()
    elif not _packed_states(cu_seqlens, initial_state, output_final_state):
        saved[-1].zero_()
    if pending is not None:
        _raise_value_error(g, pending.wait())
    if ring:
        saved = [*saved, q.new_zeros(1, dtype=torch.float32)]
    return (o, final if final is not None else q.new_empty(0, dtype=torch.float32), *saved, kept)


@torch.library.custom_op("lasp2::delta_rule_forward", mutates_args=())
def delta_rule_forward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Optional[Tensor],
                       initial_state: Optional[Tensor], scale: float, chunk_size: int, comm: int, parts: int,
                       ring: bool, num_seqs: int, output_final_state: bool, consistency: List[int],
                       keep: bool = True) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs,
                         output_final_state, consistency, keep)


def _world(handle: int) -> int:
    return 1 if handle == 0 else int(_comm_and_group(handle)[0].size)


def _forward_kept_floats(q: Tensor, v: Tensor, g: Tensor, cu_seqlens, initial_state, output_final_state: bool,
                         comm: int, parts: int, keep: bool = True):
    """The size of the forward's kept buffer (csrc/torch/delta_rule_op.cpp's
    forward_kept_floats: DeltaFamily::forward_kept_floats over the rank's parts, each
    ForwardKept::floats or, KDA, KdaForwardKept::floats in delta_cuda_backend.cpp), from
    sizes that may be symbolic: per part of n tokens, c = ceil(n / 64) chunks and
    r = B H 64 c rows, 16-bit v_new (r dv / 2 floats), the 16-bit state entering each chunk
    (B H c dk dv / 2) and GDN: 16-bit w (r dk / 2), meta (2 r), T (32 r); KDA: 16-bit w, qg,
    kd (r dk / 2 each), P and T (32 r each), fp32 eL (B H c dk). GPU tests hold it to the
    kernels' own size."""
    if not keep or _packed_states(cu_seqlens, initial_state, output_final_state):
        return 0
    B, T, H, dk = q.shape
    dv = v.shape[3]
    if not _C.delta_keeps_forward(q.dtype, int(dk), int(dv), g.dim() == 4, q.device):
        return 0
    n_parts = parts if comm else 1  # one device: the whole local sequence is one part
    bh = B * H
    per_key = g.dim() == 4

    def part(n):
        chunks = (n + 63) // 64
        rows = bh * chunks * 64
        shared = rows * dv // 2 + bh * chunks * dk * dv // 2  # v_new, chunk states
        if per_key:  # w, qg, kd; P, T; eL
            return shared + 3 * (rows * dk // 2) + 2 * 32 * rows + bh * chunks * dk
        return shared + rows * dk // 2 + 2 * rows + 32 * rows  # w, meta, T

    return n_parts * part(T // n_parts)


@delta_rule_forward.register_fake
def _(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs,
      output_final_state, consistency, keep=True):
    # sizes of csrc/core/sp/lasp2.cpp's Lasp2Saved / lasp1.cpp's Lasp1Saved for the delta rule
    B, _, H, dk = q.shape
    dv = v.shape[3]
    state, map_ = B * H * dk * dv, B * H * dk * dk
    record = state + map_
    total = _world(comm) * parts
    packed = _packed_states(cu_seqlens, initial_state, output_final_state)
    f32 = dict(dtype=torch.float32)
    if ring:
        saved = (q.new_empty(parts * state, **f32), q.new_empty(parts * record, **f32),
                 q.new_empty(max(parts * map_ if packed else 0, 1), **f32), q.new_empty(1, **f32))
    else:
        saved = (q.new_empty(parts * record, **f32), q.new_empty(parts * state, **f32),
                 q.new_empty((total + 2) * map_, **f32), q.new_empty(max(total * map_ if packed else 0, 1), **f32))
    final = q.new_empty((num_seqs, H, dk, dv) if output_final_state else (0,), **f32)
    kept = q.new_empty(_forward_kept_floats(q, v, g, cu_seqlens, initial_state, output_final_state, comm, parts,
                                            keep), **f32)
    return (torch.empty_like(v), final, *saved, kept)  # the kernel's output keeps v's strides (at::empty_like)


def _backward_impl(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs, do,
                   d_final_state, saved0, saved1, saved2, saved3, kept, need_dg, need_dbeta, need_dinitial):
    saved = [saved0, saved1, saved2] if ring else [saved0, saved1, saved2, saved3]
    communicator, group = _comm_and_group(comm)
    doc_start, doc_id, head_doc, _ = _documents(q, g, cu_seqlens, group, parts)  # checked by the forward
    with C.named_errors(op_name(g)):
        dq, dk, dv, dg, dbeta, d_initial = _C.delta_backward(
            q, k, v, g, beta, doc_start, doc_id, head_doc, num_seqs, initial_state, scale, chunk_size,
            communicator, parts, do, saved, d_final_state, need_dg, need_dbeta,
            need_dinitial and initial_state is not None, ring, kept if kept.numel() else None)
    return (dq, dk, dv,
            _or_empty(dg.to(g.dtype) if need_dg else None, q),
            _or_empty(dbeta.to(beta.dtype) if need_dbeta else None, q),
            _or_empty(d_initial.to(initial_state.dtype) if need_dinitial and initial_state is not None else None, q))


@torch.library.custom_op("lasp2::delta_rule_backward", mutates_args=())
def delta_rule_backward(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, cu_seqlens: Optional[Tensor],
                        initial_state: Optional[Tensor], scale: float, chunk_size: int, comm: int, parts: int,
                        ring: bool, num_seqs: int, do: Tensor, d_final_state: Optional[Tensor], saved0: Tensor,
                        saved1: Tensor, saved2: Tensor, saved3: Tensor, kept: Tensor, need_dg: bool, need_dbeta: bool,
                        need_dinitial: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs,
                          do, d_final_state, saved0, saved1, saved2, saved3, kept, need_dg, need_dbeta, need_dinitial)


@delta_rule_backward.register_fake
def _(q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs, do,
      d_final_state, saved0, saved1, saved2, saved3, kept, need_dg, need_dbeta, need_dinitial):
    dg = q.new_empty(g.shape, dtype=g.dtype) if need_dg else None
    dbeta = q.new_empty(beta.shape, dtype=beta.dtype) if need_dbeta else None
    d_initial = (q.new_empty(initial_state.shape, dtype=initial_state.dtype)
                 if need_dinitial and initial_state is not None else None)
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), _or_empty(dg, q), _or_empty(dbeta, q),
            _or_empty(d_initial, q))


def _or_empty(grad: Optional[Tensor], q: Tensor) -> Tensor:
    """A custom op returns tensors only: a fresh empty one stands for a gradient not asked for."""
    return q.new_empty(0, dtype=torch.float32) if grad is None else grad


_PLAN = slice(7, 13)  # scale .. num_seqs: what backward needs besides the tensors


def _setup_context(ctx, inputs, output):
    q, k, v, g, beta, cu_seqlens, initial_state = inputs[:7]
    ctx.save_for_backward(q, k, v, g, beta, cu_seqlens, initial_state, *output[2:])
    ctx.plan = inputs[_PLAN]
    ctx.output_final_state = inputs[13]


def _backward(ctx, do, d_final, *_d_saved):
    q, k, v, g, beta, cu_seqlens, initial_state, *saved = ctx.saved_tensors
    scale, chunk_size, comm, parts, ring, num_seqs = ctx.plan
    need = ctx.needs_input_grad
    need_dinitial = initial_state is not None and need[6]
    if do is None:  # only the final states took part in the loss
        do = torch.zeros_like(v)
    elif do.stride(-1) != 1:
        do = do.contiguous()
    d_final = final_state_grad(d_final, ctx.output_final_state, q, v, num_seqs)
    run = _backward_impl if eager_call(do, q) else delta_rule_backward
    with torch.no_grad():
        dq, dk, dv, dg, dbeta, d_initial = run(
            q, k, v, g, beta, cu_seqlens, initial_state, scale, chunk_size, comm, parts, ring, num_seqs, do, d_final,
            *saved, bool(need[3]), bool(need[4]), bool(need_dinitial))
    grads = C.guard_double_backward(op_name(g), (dq, dk, dv, dg if need[3] else None,
                                                  dbeta if need[4] else None, d_initial if need_dinitial else None))
    return (*grads[:5], None, grads[5], *([None] * 9))


torch.library.register_autograd("lasp2::delta_rule_forward", _backward, setup_context=_setup_context)
# the saved buffers (outputs 2..6) only carry what the backward needs: no zero gradients
# are made for them on every backward
_EagerForward = eager_function("DeltaRuleForward", _forward_impl, _setup_context, _backward,
                               internal_outputs=(2, 3, 4, 5, 6))


def group_handle(group, device: torch.device) -> int:
    """The op's int handle of (the group's lasp2 communicator on `device`, the group);
    0 for no group. torch.compile sees a constant: the group goes in by its name, and
    communicators are cached per group and handles stable, so a compiled graph keeps it."""
    return 0 if group is None else _named_group_handle(group.group_name, str(device))


def _assume_constant_result(fn):
    """torch.compiler.assume_constant_result without its import of torch._dynamo, which
    would cost every `import lasp2` (and every spawned rank) seconds: the decorator only
    marks the function (tests/python/ops/test_import.py checks both halves of that)."""
    fn._dynamo_marked_constant = True
    return fn


@_assume_constant_result
def _named_group_handle(group_name: str, device: str) -> int:
    group = dist.distributed_c10d._resolve_process_group(group_name)
    comm = get_communicator(group, torch.device(device))
    return 0 if comm is None else handle_of(comm, group)


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, initial_state: Optional[Tensor],
               cu_seqlens: Optional[Tensor], num_seqs: int, scale: float, chunk_size: int, comm: int, parts: int,
               ring: bool, output_final_state: bool, consistency: Sequence[int] = ()):
    """One rank's (o, final_state or None) through the custom op. cu_seqlens: the global
    document boundaries (None: rows); num_seqs: N (B, or the number of documents); comm:
    group_handle(...), 0 for one device."""
    reject_functorch(op_name(g))
    run = _EagerForward.apply if eager_call(q, k, v, g, beta, cu_seqlens, initial_state) else delta_rule_forward
    # the forward keeps its chunked outputs only for a backward that can follow
    keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                           for x in (q, k, v, g, beta, initial_state))
    out = run(q, k, v, g, beta, cu_seqlens, initial_state, float(scale), int(chunk_size), int(comm), int(parts),
              bool(ring), int(num_seqs), bool(output_final_state), [int(x) for x in consistency], keep)
    return out[0], (out[1] if output_final_state else None)


def custom_op_names() -> Sequence[str]:
    return ("lasp2::delta_rule_forward", "lasp2::delta_rule_backward")
