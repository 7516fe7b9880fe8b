"""lasp2.linear_attention: causal linear attention, sequence-parallel with LASP-2
(or, with `provider=`, LASP-1's P2P ring or an all-to-all over heads)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lasp2._extension import has_cuda_kernels
from lasp2.distributed.context import SPContext, per_call_documents, resolve_sp_context
from lasp2.ops import _checks as C
from lasp2.ops._compiled import outside_graph, own_communication
from lasp2.ops._documents import WITH_STATES, check_nonempty_documents, head_docs
from lasp2.ops._group_consistency import NO_CHECK, report_local_failure, verify_group_consistency
from lasp2.ops._library import CHECK_NAMES, compiled_check, device_checks, lasp2_linear_attention, lasp2_one_device
from lasp2.ops.providers import LINEAR_ATTENTION, get_provider
from lasp2.ops.providers.base import CPU_CHUNK_SIZE
from lasp2.options import PROVIDERS

OP = "lasp2.linear_attention"


def _validate(q, k, v, g, decay, scale, layout):
    """Checks the tensors and scale; returns (scale, the sequence dim)."""
    C.check_layout(OP, layout)
    C.check_qkv(OP, q, k, v)
    C.check_device_supported(OP, q, has_cuda_kernels())
    C.check_linear_qkv_shapes(OP, q, k, v, layout)
    seq_dim = 1 if layout == "bthd" else 0
    bth = [q.shape[0], q.shape[1], q.shape[2]]
    if g is not None and decay is not None:
        C.fail(OP, "pass either `g` (per-token gates) or `decay` (per-head decay), not both")
    if g is not None:
        C.check_tensor(OP, "g", g, 3, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if list(g.shape) != bth:
            C.fail(OP, f"`g` must have shape {bth} (the first three dims of `q`, {layout}), got {list(g.shape)}")
        if g.device != q.device:
            C.fail(OP, f"`g` is on {g.device} but `q` is on {q.device}")
    if decay is not None:
        C.check_tensor(OP, "decay", decay, 1, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if decay.shape[0] != q.shape[2]:
            C.fail(OP, f"`decay` must have shape [{q.shape[2]}] (one log decay per head), got {list(decay.shape)}")
        if decay.device != q.device:
            C.fail(OP, f"`decay` is on {decay.device} but `q` is on {q.device}")
    scale = C.check_scale(OP, scale)
    C.check_nonempty(OP, q, seq_dim)
    return scale, seq_dim


_PLAIN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # what the CUDA kernels take


def _rows_dense(x):
    """x, or a contiguous copy where its last dim is strided (the kernels read whole rows)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _plain_cuda_tensors(q, k, v, g, decay) -> bool:
    """True when _validate would pass q, k, v and g / decay of a CUDA call (plain tensors,
    4-d q, k, v of one dtype on q's device, k shaped like q, v like q in its first three
    dims, head dims in [1, MAX_HEAD_DIM], no empty dim; g [B, T, H] or decay [H], float,
    on q's device, not both), decided in one expression: linear_attention's fast path.
    False sends the call through every check, for their messages. Device indices instead
    of torch.device objects; CUDA only, so the CPU's sign check of the gates is never
    skipped (CUDA tensors skip it anyway)."""
    T = torch.Tensor
    if not (type(q) is T and type(k) is T and type(v) is T and q.is_cuda and q.dim() == 4 and v.dim() == 4
            and q.dtype in _PLAIN_DTYPES and k.dtype == q.dtype and v.dtype == q.dtype and has_cuda_kernels()):
        return False
    dev, shape = q.get_device(), q.shape
    if not (k.get_device() == dev and v.get_device() == dev and k.shape == shape and v.shape[:3] == shape[:3]
            and shape[0] >= 1 and shape[1] >= 1 and shape[2] >= 1 and 1 <= shape[3] <= C.MAX_HEAD_DIM
            and 1 <= v.shape[3] <= C.MAX_HEAD_DIM):
        return False
    if g is not None:
        return (decay is None and type(g) is T and g.dim() == 3 and g.dtype in C.FLOAT_DTYPES
                and g.shape == shape[:3] and g.get_device() == dev)
    return decay is None or (type(decay) is T and decay.dim() == 1 and decay.dtype in C.FLOAT_DTYPES
                             and decay.shape[0] == shape[2] and decay.get_device() == dev)


def _validate_states(initial_state, output_final_state, q, v, ctx, provider, num_docs):
    """Checks initial_state / output_final_state; returns (N, head_doc): the number of
    sequences (B, or the documents of cu_seqlens) and, with the context's documents and
    states, the document ending in each global part's head (lasp2/ops/_documents.py).
    num_docs: the number of per-call documents, planned inside the op (None: none)."""
    C.check_bool(OP, "output_final_state", output_final_state)
    if initial_state is None and not output_final_state:
        return q.shape[0], []
    if ctx.world_size > 1 and not get_provider(OP, LINEAR_ATTENTION, provider).takes_states:
        C.fail(OP, f"`initial_state` / `output_final_state` are supported by providers \"lasp2\" and \"lasp1\" "
                   f"only, got provider={provider!r}")
    head_doc, n = [], q.shape[0]
    if num_docs is not None:
        n = num_docs  # the op checks the values and plans head_doc
    elif ctx.cu_seqlens is not None:
        values = ctx.cu_seqlens_list  # python ints, known before a compiled graph runs
        check_nonempty_documents(OP, values, WITH_STATES)
        n = len(values) - 1
        head_doc = head_docs(values, values[-1], ctx.world_size * ctx.parts_per_rank)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            C.fail(OP, f"`initial_state` must be a torch.Tensor or None, got {type(initial_state).__name__}")
        if initial_state.dtype not in (torch.float32, torch.float64, q.dtype):
            C.fail(OP, f"`initial_state` must be float32, float64 or the dtype of `q` ({q.dtype}), "
                       f"got {initial_state.dtype}")
        if initial_state.device != q.device:
            C.fail(OP, f"`initial_state` is on {initial_state.device} but `q` is on {q.device}")
        want = [n, q.shape[2], q.shape[3], v.shape[3]]
        if list(initial_state.shape) != want:
            what = "documents in `cu_seqlens`" if num_docs is not None or ctx.cu_seqlens is not None else "batch rows"
            C.fail(OP, f"`initial_state` must have shape {want} ([N, H, Dk, Dv], N = number of {what}), "
                       f"got {list(initial_state.shape)}")
    return n, head_doc


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    decay: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "bthd",
    split: str = "contiguous",
    cu_seqlens: Optional[torch.Tensor] = None,
    overlap: Optional[bool] = None,
    provider: str = "lasp2",
    sp_context: Optional[SPContext] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
):
    r"""Causal linear attention over a sequence that may be split across `group`.

    Computes, per batch row and head, ``S_t = a_t S_{t-1} + k_t v_t^T`` and
    ``o_t = scale * q_t^T S_t`` with ``a_t = 1`` (no decay), ``exp(decay[h])`` or
    ``exp(g[..., t, h])``. With a process group of size P each rank passes its local
    share of the sequence (see ``lasp2.split_sequence``) and receives the same output
    rows a single device would compute: LASP-2 gathers one d_k x d_v state per part
    in forward and one state gradient per part in backward.

    Args:
        q, k: ``[B, T, H, Dk]`` (``layout="bthd"``) or ``[T, B, H, Dk]`` (``"tbhd"``,
            Megatron's order). v: the same with ``Dv``.
        g: optional log gates ``[B, T, H]`` (``[T, B, H]`` for "tbhd"), typically
            ``logsigmoid(...)``; values <= 0.
        decay: optional per-head log decay ``[H]`` (<= 0), e.g. lightning attention's
            ``-slope``. Mutually exclusive with ``g``.
        scale: multiplies q; default ``Dk ** -0.5``.
        group: the sequence-parallel process group (e.g. Megatron's context-parallel
            group); None means one device. The group is used, never created.
        split: how the sequence is laid out over the group, "contiguous" or "balanced"
            (rank r holds parts r and 2P-1-r; with B = 1 LASP-2 runs the two as one pass,
            docs/providers.md).
        cu_seqlens: optional cumulative document lengths of the *global* packed
            sequence (B must be 1), int32/int64, starting at 0 and ending at the
            global length: documents never attend across boundaries.
        overlap: LASP-2's forward schedule. True: the state AllGather runs while the
            local attention computes, and the prefix term is added in an extra pass
            over q and o. False: wait for the AllGather and run one fused pass with the
            prefix as the entering state. None (default): False on CUDA, where the
            gather takes tens of microseconds but the extra pass about a millisecond at
            64K tokens (measured on H100, see docs/results.md), True on the CPU. The
            backward always overlaps its AllGather with the dq pass. LASP-2 only.
        provider: the sequence-parallel algorithm, all computing the same result:
            "lasp2" (default; one AllGather of states per direction), "lasp1" (a ring
            of P2P state passes, P-1 serial hops, 2(P-1) for the balanced split) or "ulysses"
            (all-to-all to head sharding and back; contiguous split only, the number
            of heads must be divisible by the group size). See docs/providers.md.
        sp_context: the batch's ``lasp2.build_sp_context(...)``, built once and passed
            to every layer, in place of ``group``, ``split`` and ``cu_seqlens``.
        initial_state: optional ``[N, H, Dk, Dv]``, N = B, or the number of documents
            with ``cu_seqlens``: sequence n starts from ``initial_state[n]`` (its first
            token's decay applies to it, as in fla) wherever that token lives. Every
            rank of a group passes the same values (as the final states it usually
            comes from are): ranks whose copies differ all raise ValueError naming
            `initial_state` (compared by a digest computed on the device: on CPU at
            this call, on CUDA up to a few calls later, as for `decay`;
            docs/reliability.md).
            Its gradient on a rank is that rank's share: summed over the group (as the
            data/context-parallel gradient reduction does) it is one process's.
            Providers "lasp2" and "lasp1" (and one device).
        output_final_state: also return the ``[N, H, Dk, Dv]`` end state of every
            sequence / document, the same on every rank (float32, or the dtype of
            ``initial_state``); gradients arriving at the ranks' copies are summed
            (the loss is the sum of the ranks' losses). Providers "lasp2" and "lasp1"
            (which spends one more AllGather per direction on them) and one device.

    Returns:
        o with the shape of v, in the layout of the inputs; ``(o, final_state)`` with
        ``output_final_state=True`` (fla's pair; o alone otherwise, so existing callers
        keep their return type).
    """
    if (group is None and sp_context is None and cu_seqlens is None and initial_state is None
            and output_final_state is False and overlap is None and scale is None and layout == "bthd"
            and split == "contiguous" and provider == "lasp2" and not torch.compiler.is_compiling()
            and _plain_cuda_tensors(q, k, v, g, decay)):
        # One CUDA device, nothing to plan: every check below would pass and the call would
        # end in the one-device op with these arguments. In a synchronized step the host
        # time before the first launch is GPU idle time; these checks were most of it
        # (docs/history/kernels-log.md, "Session 14: fixed decay beside fla at 64K"). torch.compile
        # traces the checked path, as before.
        q, k, v = _rows_dense(q), _rows_dense(k), _rows_dense(v)
        return lasp2_one_device(q, k, v, g, decay, q.shape[3] ** -0.5, CPU_CHUNK_SIZE, False)
    group_hint = sp_context.group if isinstance(sp_context, SPContext) else group
    try:
        C.check_optional_bool(OP, "overlap", overlap)
        scale, seq_dim = _validate(q, k, v, g, decay, scale, layout)
        if not torch.compiler.is_compiling():  # compiled graphs: checked inside the custom op
            C.check_log_gates(OP, "g", g)
            C.check_log_gates(OP, "decay", decay)
        impl = get_provider(OP, LINEAR_ATTENTION, provider)
        local_len, batch = q.shape[seq_dim], q.shape[1 - seq_dim]
        # one device: per-call documents go into the custom op unread (no graph break when compiled)
        num_docs = per_call_documents(OP, sp_context, group, cu_seqlens, batch)
        ctx = resolve_sp_context(OP, sp_context, group, split, cu_seqlens if num_docs is None else None, local_len,
                                 batch, q.device)
        impl.check(OP, heads=q.shape[2], split=ctx.split, world_size=ctx.world_size)
        num_seqs, head_doc = _validate_states(initial_state, output_final_state, q, v, ctx, provider, num_docs)
    except (ValueError, TypeError):
        report_local_failure(OP, group_hint, q)  # the other ranks raise too, never wait for this one
        raise
    if scale is None:
        scale = q.shape[3] ** -0.5
    check, in_op_check = NO_CHECK, {}
    if ctx.world_size > 1 and torch.compiler.is_compiling():
        why = own_communication(ctx) or (None if impl.checks_in_op else
                                         f"provider {provider!r} (its op checks the ranks in Python)")
        if why:
            return outside_graph(OP, why, linear_attention, q, k, v, g, decay, scale, group, layout, split,
                                 cu_seqlens, overlap, provider, sp_context, initial_state, output_final_state)
    if ctx.world_size > 1:
        signature = [batch, local_len, q.shape[2], q.shape[3], v.shape[3], C.DTYPE_CODES[q.dtype],
                     0 if g is None and decay is None else (1 if decay is not None else 2), ctx.parts_per_rank,
                     int(ctx.cu_seqlens is not None), PROVIDERS.index(provider), int(initial_state is not None),
                     int(output_final_state),
                     # g's dtype sets the size of provider "ulysses"' all-to-all of it (float32
                     # gates on one rank beside float64 ones aborted the process in gloo)
                     -1 if g is None else C.DTYPE_CODES[g.dtype],
                     C.builds_backward(q, k, v, g, decay, initial_state)]
        if torch.compiler.is_compiling():  # the provider's custom op checks the ranks
            cu_list = ctx.cu_seqlens_list
            in_op_check = compiled_check(ctx.group, q.device, signature,
                                         (None if cu_list is None else tuple(cu_list), layout, overlap))
        else:
            check = verify_group_consistency(
                OP, ctx.group, signature, CHECK_NAMES, q.device,
                host_values=[("`scale`", float(scale)), ("`cu_seqlens` contents", ctx.cu_seqlens),
                             ("`layout`", layout), ("`overlap`", overlap)],
                **device_checks(g, decay, initial_state))
    else:
        impl = get_provider(OP, LINEAR_ATTENTION, "lasp2")  # one device: every provider is the plain op

    if layout == "tbhd":
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        if g is not None:
            g = g.transpose(0, 1)
    q, k, v = _rows_dense(q), _rows_dense(k), _rows_dense(v)  # three calls, not a generator: every call runs this
    if overlap is None:
        overlap = not q.is_cuda
    if ctx.world_size == 1 and sp_context is None and num_docs is None and ctx.cu_seqlens is None and \
            initial_state is None and not output_final_state:
        # one device, no documents, no states: what provider "lasp2" would call, without its
        # per-call KernelCall / SPContext look-ups (host time at small T); eager: a C++ autograd node
        o = lasp2_one_device(q, k, v, g, decay, float(scale), CPU_CHUNK_SIZE, bool(overlap))
        final = None
    elif num_docs is not None:  # one device (the plain op), the documents planned inside it
        out = lasp2_linear_attention(q, k, v, g, decay, None, float(scale), CPU_CHUNK_SIZE, None, 1, bool(overlap),
                                     initial_state, output_final_state, num_seqs=num_seqs,
                                     # a private copy: the backward plans the documents from it again,
                                     # and a caller's buffer edited in place (numpy views bump no version)
                                     # gave a gradient of other documents than the output's
                                     cu_seqlens=cu_seqlens.clone())
        o, final = out if output_final_state else (out, None)
    elif initial_state is not None or output_final_state:
        o, final = impl.apply_with_states(
            q, k, v, g, decay, initial_state, scale=float(scale), sp_context=ctx, overlap=bool(overlap),
            output_final_state=output_final_state, head_doc=head_doc, num_seqs=num_seqs, **in_op_check)
    else:
        o = impl.apply(q, k, v, g, decay, scale=float(scale), sp_context=ctx, overlap=bool(overlap), **in_op_check)
        final = None
    if layout == "tbhd":
        o = o.transpose(0, 1)
    if not output_final_state:
        return check.seal(o)  # the backward compares this call's device values first, if no later call did
    return check.seal(o, final.to(initial_state.dtype) if initial_state is not None else final)
