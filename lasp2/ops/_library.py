"""LASP-2 linear attention as torch.library custom ops.

Registered ops (opaque to torch.compile / torch.export, with fake kernels for
tracing and an autograd formula):
  lasp2::lasp2_forward(q, k, v, g?, decay?, doc_start?, initial_state?, scale, chunk_size, comm,
                       parts, overlap, head_doc, num_seqs, output_final_state, cu_seqlens?)
      -> (o, final_state, local_records, prefix_states, maps, head_maps, segment_states)
  lasp2::lasp2_backward(q, k, v, g?, decay?, doc_start?, initial_state?, scale, chunk_size, comm,
                        parts, head_doc, num_seqs, do, d_final_state?, local_records,
                        prefix_states, maps, head_maps, segment_states, need_dg, need_dinitial,
                        cu_seqlens?)
      -> (dq, dk, dv, dg, d_decay, d_initial_state)
segment_states: what the CUDA kernels keep from the forward for the dq pass (the
segments' exit-weighted states, batch x heads x segments x dk x dv floats, the segments
chosen from the device's SM count: _C.lasp2_saved_states_floats; the fake function
applies the same rule in Python to _C.lasp2_saved_states_plan's constants, and a GPU
test holds the two equal); empty on the CPU.
Packed documents come planned (doc_start, and head_doc with states: an SPContext's,
read when it was built) or as a per-call cu_seqlens tensor (then doc_start is None and
head_doc []): the op reads its values and plans the documents itself, as the delta-rule
ops do (lasp2/ops/_documents.py), so a compiled graph takes per-call documents without
a graph break. final_state is [N, H, Dk, Dv] float32 (N = B, or num_seqs documents
carrying states), an empty tensor when not asked for. State gradients follow "the loss
is the sum of the ranks' losses": d_final_state is this rank's (summed over the group
inside the backward AllGather), d_initial_state this rank's share.

A communicator is not a tensor or a schema type, so it travels as an int handle
(0: one device; lasp2.ops._opaque keeps the object alive); communicators are cached per
group by lasp2.distributed.communicator, so the registry does not grow per call.
In plain eager mode the entry point runs the same functions through a
torch.autograd.Function instead of the registered op (lasp2.ops._eager: the custom
op's Python dispatch is most of the host time at small T); a one-device call without
documents or states goes to the binding's C++ autograd node instead
(lasp2_one_device, csrc/torch/lasp2_eager_node.cpp: the same kernels, of the saved
buffers only the segment states, the one a one-device call reads; no Python in the
backward).
The value checks that need tensor contents (positive gates on CPU) run inside the
real kernel, so traced / compiled graphs keep them without a graph break. So does,
under torch.compile over a group, the per-call cross-rank consistency check (as the
delta-rule ops run it, lasp2/ops/_delta_library.py): `check` is the group's handle
(_delta_library.group_handle; 0: no check in the op), `consistency` the row's size
fields and the digests of its host values taken while tracing (compiled_check); the
eager entry point runs the check in Python before the op (lasp2.linear_attention).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops._delta_library import _assume_constant_result, group_handle
from lasp2.ops._documents import final_state_grad, local_document_starts
from lasp2.ops._eager import eager_call, eager_function, reject_functorch, under_functorch
from lasp2.ops._group_consistency import (Digest, digest_host, report_local_failure,
                                          verify_group_consistency)
from lasp2.ops._opaque import handle_of, resolve
from lasp2.options import PROVIDERS

OP = "lasp2.linear_attention"
# what the size fields of the per-call consistency check are (in the order linear_attention sends them)
CHECK_NAMES = ("batch size", "local sequence length", "heads", "key head dim", "value head dim", "dtype",
               "decay mode (none/decay/g)", "split", "use of cu_seqlens", f"provider {PROVIDERS}",
               "use of initial_state", "output_final_state", "dtype of `g` (-1: no g)",
               "building a backward (grad mode and an input requiring grad)")
# its host values after `scale` (in the op: digested while tracing)
HOST_NAMES = ("`cu_seqlens` contents", "`layout`", "`overlap`")


def compiled_check(group, device, signature, host_values) -> dict:
    """The op's `check` / `consistency` arguments that run the cross-rank check inside
    the custom op (under torch.compile): constants of the traced graph."""
    return dict(check=group_handle(group, device), consistency=[*map(int, signature), *_digests(*host_values)])


@_assume_constant_result
def _digests(*values) -> tuple:
    return tuple(digest_host(list(v) if isinstance(v, tuple) else v) for v in values)


def _check_in_op(q, g, decay, scale, check: int, consistency: List[int], initial_state=None):
    """The cross-rank check of a compiled call over a group, at its real kernel: the
    eager check's row and errors (the device values compared at the call). A rank whose
    gates are bad still takes part, so no rank waits for it."""
    group = resolve(check)[1]
    try:
        C.check_log_gates(OP, "g", g)
        C.check_log_gates(OP, "decay", decay)
    except ValueError:
        report_local_failure(OP, group, q)
        raise
    n = len(CHECK_NAMES)
    verify_group_consistency(
        OP, group, consistency[:n], CHECK_NAMES, q.device,
        host_values=[("`scale`", float(scale)), *zip(HOST_NAMES, map(Digest, consistency[n:]))],
        **device_checks(g, decay, initial_state), lag=False)


def device_checks(g, decay, initial_state=None) -> dict:
    """The check row's device values and positive-gate flags (the eager call's and the op's).
    `initial_state` is a device value, not a host one: every rank must pass the same states
    (LASP-2 combines them on every rank), and on CUDA its digest then rides the lagged slots
    ("NaN at the call") instead of reading the state back to the host at every call."""
    return dict(device_values=[("`decay` values", decay), ("`initial_state` values", initial_state)],
                positive=[(f"`{name}` holds positive log gates/decays (they must be <= 0)", x)
                          for name, x in (("g", g), ("decay", decay)) if x is not None])


def _communicator(handle: int):
    """The communicator of an op's `comm`: handle_of(communicator), or (compiled over a
    group) group_handle's handle of (communicator, group)."""
    obj = resolve(handle)
    return obj[0] if isinstance(obj, tuple) else obj


def _world(handle: int) -> int:
    return 1 if handle == 0 else int(_communicator(handle).size)


def _forward_impl(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, overlap, head_doc,
                  num_seqs, output_final_state, cu_seqlens=None, check=0, consistency=None):
    if check:
        _check_in_op(q, g, decay, scale, check, consistency, initial_state)
    else:
        C.check_log_gates(OP, "g", g)
        C.check_log_gates(OP, "decay", decay)
    o, final, *saved = _forward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts,
                                      overlap, head_doc, num_seqs, output_final_state, cu_seqlens)
    # a custom op's outputs must be deterministic (opcheck, AOT tracing): zero what the
    # schedule leaves unwritten (one device without states: every buffer but the segment
    # states, backward reads none of them; the head maps without packed documents' states)
    if comm == 0 and not _states_used(initial_state, output_final_state):
        for buffer in saved[:4]:
            buffer.zero_()
    elif not _packed_states(doc_start, head_doc, cu_seqlens, initial_state, output_final_state):
        saved[3].zero_()
    return (o, final if final is not None else q.new_empty(0, dtype=torch.float32), *saved)


def _forward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, overlap, head_doc,
                   num_seqs, output_final_state, cu_seqlens=None):
    """The forward as the eager entry point runs it: its one caller, lasp2.linear_attention,
    has checked the gates' signs already, and the saved buffers are internal outputs (never
    returned to the user), so what the schedule leaves unwritten in them is never read and
    needs no zeroing (four fills per call on one device); final_state is None unless asked for."""
    args = _args(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                 cu_seqlens, initial_state is not None or output_final_state)
    try:  # C.named_errors' rule without a context manager's calls (host time at small T)
        o, final, saved = _C.lasp2_forward(args, overlap, output_final_state)
    except RuntimeError as exc:
        C.reraise_named(OP, exc)
    return (o, final, *saved)


@torch.library.custom_op("lasp2::lasp2_forward", mutates_args=())
def lasp2_forward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                  doc_start: Optional[Tensor], initial_state: Optional[Tensor], scale: float, chunk_size: int,
                  comm: int, parts: int, overlap: bool, head_doc: List[int], num_seqs: int,
                  output_final_state: bool, cu_seqlens: Optional[Tensor] = None, check: int = 0,
                  consistency: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                                                    Tensor]:
    return _forward_impl(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, overlap,
                         head_doc, num_seqs, output_final_state, cu_seqlens, check, consistency)


def _args(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
          cu_seqlens, with_states):
    if cu_seqlens is not None:  # per-call documents: read and planned here, inside the op
        communicator = _communicator(comm)
        rank, world = (0, 1) if communicator is None else (communicator.rank, communicator.size)
        doc_start, head_doc = local_document_starts(OP, cu_seqlens, q.shape[1], rank, world, parts, q.device,
                                                    with_states)
    # the non-tensor half comes from a small cache: binding LinearAttentionArgs' 13 keyword
    # arguments costs about twice its with_tensors (host time, twice per fwd + bwd)
    key = (scale, chunk_size, comm, parts, tuple(head_doc), num_seqs)
    config = _CONFIGS.get(key)
    if config is None:
        config = _C.LinearAttentionArgs(q, k, v, scale=scale, comm=None if comm == 0 else _communicator(comm),
                                        parts_per_rank=parts, chunk_size=chunk_size, head_doc=list(head_doc),
                                        num_seqs=num_seqs).config()
        if scale != 0:  # -0.0 == 0.0 as a key: a zero scale is never cached
            if len(_CONFIGS) >= 64:  # e.g. per-batch head_doc values: start afresh, keep caching
                _CONFIGS.clear()
            _CONFIGS[key] = config
    return config.with_tensors([q, k, v, g, decay, doc_start, initial_state])


_CONFIGS: dict = {}  # (scale, chunk_size, comm handle, parts, head_doc, num_seqs) -> LinearAttentionArgs.config()


def _states_used(initial_state, output_final_state) -> bool:
    return initial_state is not None or output_final_state


def _packed_states(doc_start, head_doc, cu_seqlens, initial_state, output_final_state) -> bool:
    """Packed documents carrying their own states (N = the number of documents; the
    schedule fills the head maps): planned ones come with head_doc, per-call ones with
    cu_seqlens."""
    if cu_seqlens is not None:
        return _states_used(initial_state, output_final_state)
    return doc_start is not None and len(head_doc) > 0


@lasp2_forward.register_fake
def _(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, overlap, head_doc, num_seqs,
      output_final_state, cu_seqlens=None, check=0, consistency=None):
    # sizes of csrc/core/sp/lasp2.cpp's Lasp2Saved for the scalar-decay family
    B, _, H, dk = q.shape
    dv = v.shape[3]
    bh = B * H
    f32 = dict(dtype=torch.float32, device=q.device)
    packed = _packed_states(doc_start, head_doc, cu_seqlens, initial_state, output_final_state)
    n = num_seqs if packed else B
    total = _world(comm) * parts
    seg_states = _segment_states_floats(q, v, parts if comm else 1)  # no communicator: one part
    return (torch.empty_like(v),  # the kernel's output keeps v's strides (at::empty_like)
            q.new_empty((n, H, dk, dv) if output_final_state else (0,), **f32),
            q.new_empty(parts * (bh * dk * dv + bh), **f32),
            q.new_empty(parts * bh * dk * dv, **f32),
            q.new_empty((total + 2) * bh, **f32),
            q.new_empty(max(total * bh if packed else 0, 1), **f32),
            q.new_empty(seg_states, **f32))


def _segment_states_floats(q: Tensor, v: Tensor, parts: int):
    """The size of the forward's segment states (ScalarDecay::saved_states_floats: its
    largest of one slot per local part and one for the whole local sequence), from
    sizes that may be symbolic (torch.compile with dynamic shapes): the kernels' plan
    (KernelBackend::SavedStatesPlan, constant per dtype, head dims and device) applied
    here as the CUDA backend applies it (make_geom); a GPU test holds it to the
    kernels' own size."""
    B, T, H, dk = q.shape
    dv = v.shape[3]
    target, forced = _C.lasp2_saved_states_plan(q.dtype, int(dk), int(dv), q.device)
    bh = B * H
    if target == 0 or bh == 0:
        return 0

    def part(n):
        chunks = (n + 63) // 64
        if forced > 0:
            seg = forced
        else:
            want = torch.sym_max(1, target // bh)
            seg = torch.sym_max(4, (chunks + want - 1) // want)
        seg = torch.sym_max(1, torch.sym_min(seg, torch.sym_max(1, chunks)))
        nseg = (chunks + seg - 1) // seg
        return bh * nseg * dk * dv if nseg > 1 else 0

    whole = part(T)
    return whole if parts == 1 else torch.sym_max(whole, parts * part(T // parts))


def _decay_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if (q.device.type == "cpu" and q.dtype == torch.float64) else torch.float32


def _backward_impl(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                   do, d_final_state, records, prefixes, maps, head_maps, seg_states, need_dg, need_dinitial,
                   cu_seqlens=None):
    dq, dk, dv, dg, d_decay, d_initial = _backward_eager(
        q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs, do,
        d_final_state, records, prefixes, maps, head_maps, seg_states, need_dg, need_dinitial, cu_seqlens)
    # dg ([B, T, H], for g) and d_decay ([H], for decay, summed over tokens) in their
    # inputs' dtypes; an empty tensor stands for "not asked for"
    return dq, dk, dv, _or_empty(dg, q), _or_empty(d_decay, q), _or_empty(d_initial, q)


def _backward_eager(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                    do, d_final_state, records, prefixes, maps, head_maps, seg_states, need_dg, need_dinitial,
                    cu_seqlens=None):
    """The backward's gradients, None where not asked for (the eager path; the custom op
    returns empty tensors instead). Per-call documents are planned again from cu_seqlens
    (checked by the forward)."""
    args = _args(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs,
                 cu_seqlens, _states_used(initial_state, d_final_state is not None))
    try:
        return _C.lasp2_backward(args, [records, prefixes, maps, head_maps, seg_states], do, need_dg,
                                 d_final_state=d_final_state, need_dinitial=need_dinitial)
    except RuntimeError as exc:
        C.reraise_named(OP, exc)


@torch.library.custom_op("lasp2::lasp2_backward", mutates_args=())
def lasp2_backward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                   doc_start: Optional[Tensor], initial_state: Optional[Tensor], scale: float, chunk_size: int,
                   comm: int, parts: int, head_doc: List[int], num_seqs: int, do: Tensor,
                   d_final_state: Optional[Tensor], records: Tensor, prefixes: Tensor, maps: Tensor,
                   head_maps: Tensor, seg_states: Tensor, need_dg: bool, need_dinitial: bool,
                   cu_seqlens: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_impl(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc,
                          num_seqs, do, d_final_state, records, prefixes, maps, head_maps, seg_states, need_dg,
                          need_dinitial, cu_seqlens)


@lasp2_backward.register_fake
def _(q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs, do,
      d_final_state, records, prefixes, maps, head_maps, seg_states, need_dg, need_dinitial, cu_seqlens=None):
    dg = q.new_empty(q.shape[:3], dtype=g.dtype) if (need_dg and g is not None) else None
    d_decay = q.new_empty(decay.shape, dtype=decay.dtype) if (need_dg and decay is not None) else None
    d_initial = torch.empty_like(initial_state) if (need_dinitial and initial_state is not None) else None
    dg, d_decay, d_initial = _or_empty(dg, q), _or_empty(d_decay, q), _or_empty(d_initial, q)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dg, d_decay, d_initial


def _or_empty(grad: Optional[Tensor], q: Tensor) -> Tensor:
    """A custom op returns tensors only: an empty one (a fresh one each time, outputs
    must not alias) stands for a gradient not asked for."""
    return q.new_empty(0, dtype=_decay_dtype(q)) if grad is None else grad


def _setup_context(ctx, inputs, output):
    (q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, _overlap, head_doc, num_seqs,
     output_final_state, cu_seqlens, *_check) = inputs
    _, _, records, prefixes, maps, head_maps, seg_states = output
    ctx.save_for_backward(q, k, v, g, decay, doc_start, initial_state, cu_seqlens, records, prefixes, maps, head_maps,
                          seg_states)
    ctx.config = (scale, chunk_size, comm, parts, list(head_doc), num_seqs, output_final_state)


def _backward(ctx, do, d_final, _d_records, _d_prefixes, _d_maps, _d_head_maps, _d_seg_states):
    (q, k, v, g, decay, doc_start, initial_state, cu_seqlens, records, prefixes, maps, head_maps,
     seg_states) = ctx.saved_tensors
    scale, chunk_size, comm, parts, head_doc, num_seqs, output_final_state = ctx.config
    need_g, need_decay = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
    need_dinitial = initial_state is not None and ctx.needs_input_grad[6]
    if output_final_state:
        packed = _packed_states(doc_start, head_doc, cu_seqlens, initial_state, output_final_state)
        d_final = final_state_grad(d_final, output_final_state, q, v, num_seqs if packed else q.shape[0])
    else:
        d_final = None
    if do is None:  # the eager Function does not materialise gradients: o took no part in the loss
        do = torch.zeros_like(v)
    run = _backward_eager if eager_call(do, q) else lasp2_backward
    args = (q, k, v, g, decay, doc_start, initial_state, scale, chunk_size, comm, parts, head_doc, num_seqs, do,
            d_final, records, prefixes, maps, head_maps, seg_states, bool(need_g or need_decay), bool(need_dinitial),
            cu_seqlens)
    # grad mode is off in a backward unless create_graph=True: no no_grad() context's
    # Python calls (a dozen) on the usual path
    create_graph = torch.is_grad_enabled()
    if create_graph:
        with torch.no_grad():
            dq, dk, dv, dg, d_decay, d_initial = run(*args)
    else:
        dq, dk, dv, dg, d_decay, d_initial = run(*args)
    grads = (dq, dk, dv, dg if need_g else None, d_decay if need_decay else None, d_initial if need_dinitial else None)
    if create_graph:
        grads = C.guard_double_backward(OP, grads)
    return (*grads[:5], None, grads[5], *([None] * 11))


torch.library.register_autograd("lasp2::lasp2_forward", _backward, setup_context=_setup_context)
# the eager Function takes (q, k, v, g, decay, doc_start, initial_state, the rest as one
# tuple): only those seven may need gradients (_eager.eager_function's leading_inputs)
_TENSOR_INPUTS = 7
_EagerForward = eager_function("Lasp2Forward", _forward_eager, _setup_context, _backward,
                               internal_outputs=(2, 3, 4, 5, 6), leading_inputs=_TENSOR_INPUTS)


def lasp2_linear_attention(q, k, v, g, decay, doc_start, scale: float, chunk_size: int, comm, parts: int,
                           overlap: bool, initial_state=None, output_final_state: bool = False,
                           head_doc: Sequence[int] = (), num_seqs: int = 0, cu_seqlens: Optional[Tensor] = None,
                           check: int = 0, consistency: Optional[Sequence[int]] = None):
    """The LASP-2 schedule (or one device when comm is None) through the custom op:
    o, or (o, final_state) with output_final_state. Documents: planned (doc_start,
    head_doc) or per call (cu_seqlens, global boundaries the op reads; num_seqs its
    number of documents when they carry states). check / consistency: compiled_check's
    (compiled calls over a group only)."""
    reject_functorch(OP)
    # compiled over a group: the communicator goes in as the check's group handle (a constant
    # of the graph; handle_of would register it only after the trace)
    handle = int(check) if check else (0 if comm is None else handle_of(comm))
    args = (q, k, v, g, decay, doc_start, initial_state, float(scale), int(chunk_size), handle, int(parts),
            bool(overlap), [int(d) for d in head_doc] if head_doc else [], int(num_seqs), bool(output_final_state),
            cu_seqlens)
    if check:  # compiled over a group: the op checks the ranks
        out = lasp2_forward(*args, int(check), list(consistency))
    elif eager_call(q, k, v, g, decay, doc_start, initial_state, cu_seqlens):
        out = _EagerForward.apply(*args[:_TENSOR_INPUTS], args[_TENSOR_INPUTS:])
    else:
        out = lasp2_forward(*args)
    return (out[0], out[1]) if output_final_state else out[0]


def lasp2_one_device(q, k, v, g, decay, scale: float, chunk_size: int, overlap: bool):
    """o of one device without documents or states (what lasp2_linear_attention computes
    for comm=None, doc_start=None): in plain eager mode through the binding's C++
    autograd node (lasp2_eager_node.h: forward and backward cross from Python once each,
    the backward runs without Python), else through the custom op. The caller has
    checked the arguments and, on the CPU, the gates' signs."""
    # forward-mode AD (a dual level open): the Python Function, whose missing jvp raises
    # NotImplementedError (a C++ node raises a RuntimeError of its own)
    if eager_call(q, k, v, g, decay) and not under_functorch() and _forward_ad._current_level < 0:
        try:  # C.named_errors' rule without a context manager's calls
            return _C.lasp2_one_device(q, k, v, g, decay, scale, chunk_size, overlap)
        except RuntimeError as exc:
            C.reraise_named(OP, exc)
    return lasp2_linear_attention(q, k, v, g, decay, None, scale, chunk_size, None, 1, overlap)


def custom_op_names() -> Sequence[str]:
    return ("lasp2::lasp2_forward", "lasp2::lasp2_backward")
