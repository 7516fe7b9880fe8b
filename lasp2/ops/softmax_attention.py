"""lasp2.softmax_attention: causal softmax attention, sequence-parallel with LASP-2H.

The softmax-attention layers of a hybrid model under the same sequence split as
its linear-attention (LASP-2) layers. Per layer and rank,

ONE AllGather of K|V forward, ONE reduce-scatter of dK|dV backward, each overlapped
with the local causal blocks; packed documents (cu_seqlens) never attend across a
boundary. The algorithm is lasp2/ops/_lasp2h.py; it runs as the torch.library custom
ops of lasp2/ops/_softmax_library.py (so torch.compile / export see one opaque op).
This module checks the arguments and that every rank calls the op the same way
(under torch.compile the custom op runs that check, so a group call compiles with
fullgraph=True).
See docs/lasp2h.md.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lasp2.distributed.context import SPContext, per_call_documents, resolve_sp_context
from lasp2.ops import _checks as C
from lasp2.ops import _softmax_blocks as K
from lasp2.ops._compiled import outside_graph, own_communication
from lasp2.ops._group_consistency import NO_CHECK, report_local_failure, verify_group_consistency
from lasp2.ops._lasp2h import Block, plan_blocks  # noqa: F401  (the plan is part of this op's story)
from lasp2.ops._softmax_library import CHECK_NAMES, host_digests, lasp2h_attention

OP = "lasp2.softmax_attention"


def _validate(q, k, v, scale, layout, causal, backend):
    C.check_layout(OP, layout)
    C.check_tensor(OP, "q", q, 4)
    C.check_tensor(OP, "k", k, 4)
    C.check_tensor(OP, "v", v, 4)
    C.check_same_device_dtype(OP, "q", q, k=k, v=v)
    if q.device.type not in ("cpu", "cuda"):
        C.fail(OP, f"`q` is on {q.device}; lasp2 runs on CPU and CUDA devices")
    seq_dim = 1 if layout == "bthd" else 0
    names = "[B, T, H, D]" if layout == "bthd" else "[T, B, H, D]"
    if k.shape[0] != q.shape[0] or k.shape[1] != q.shape[1]:
        C.fail(OP, f"`k` must match `q` in batch and sequence dims {list(q.shape[:2])} ({layout}, {names}), "
                   f"got {list(k.shape)}")
    if k.shape[3] != q.shape[3]:
        C.fail(OP, f"`k` must have the head dim of `q` ({q.shape[3]}), got {k.shape[3]}")
    if v.shape[:3] != k.shape[:3]:
        C.fail(OP, f"`v` must match `k` in its first three dims {list(k.shape[:3])}, got {list(v.shape)}")
    C.check_nonempty(OP, q, seq_dim)
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        C.fail(OP, f"`k` has {k.shape[2]} heads, which must divide the {q.shape[2]} heads of `q` (GQA)")
    C.check_head_dim(OP, "q", q.shape[3])
    C.check_head_dim(OP, "v", v.shape[3])
    scale = C.check_scale(OP, scale)
    if not isinstance(causal, bool):
        C.fail(OP, f"`causal` must be a bool, got {type(causal).__name__}")
    if backend not in K.BACKENDS:
        C.fail(OP, f"`backend` must be one of {K.BACKENDS}, got {backend!r}")
    return scale, seq_dim


def softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "bthd",
    split: str = "contiguous",
    cu_seqlens: Optional[torch.Tensor] = None,
    causal: bool = True,
    backend: str = "auto",
    sp_context: Optional[SPContext] = None,
) -> torch.Tensor:
    r"""Softmax attention over a sequence that may be split across `group` (LASP-2H).

    ``o_t = sum_s softmax_s(scale * q_t . k_s) v_s`` over keys ``s <= t`` (``causal``)
    or all keys, within the document of ``t`` when ``cu_seqlens`` is given. With a
    process group of size P each rank passes its local share of the sequence (see
    ``lasp2.split_sequence``) and gets the output rows a single device would compute:
    K and V are all-gathered once per layer in forward, and their gradients
    reduce-scattered once in backward.

    Args:
        q: ``[B, T, H, D]`` (``layout="bthd"``) or ``[T, B, H, D]`` (``"tbhd"``,
            Megatron's order). k: the same with ``Hkv`` heads, ``Hkv`` dividing ``H``
            (grouped-query attention). v: like k, with its own head dim.
        scale: multiplies the scores; default ``D ** -0.5``.
        group: the sequence-parallel process group (e.g. Megatron's context-parallel
            group); None means one device. The group is used, never created.
        layout: "bthd" or "tbhd".
        split: how the sequence is laid out over the group, "contiguous" or
            "balanced" (rank r holds parts r and 2P-1-r of 2P: even causal work).
        cu_seqlens: optional cumulative document lengths of the *global* packed
            sequence (B must be 1), int32/int64, from 0 to the global length.
        causal: causal (default) or bidirectional attention.
        backend: "auto" (PyTorch's fused SDPA kernels where they apply, otherwise
            "plain"), "sdpa" (the same) or "plain" (explicit matrix products with
            float32 / float64 accumulation).
        sp_context: the batch's ``lasp2.build_sp_context(...)``, built once and passed
            to every layer, in place of ``group``, ``split`` and ``cu_seqlens``.

    Returns:
        o with the shape of ``q`` but the head dim of ``v``, in the layout of the inputs.
    """
    group_hint = sp_context.group if isinstance(sp_context, SPContext) else group
    try:
        scale, seq_dim = _validate(q, k, v, scale, layout, causal, backend)
        if scale is None:
            scale = q.shape[3] ** -0.5
        local_len = q.shape[seq_dim]
        batch = q.shape[1 - seq_dim]
        # one device: per-call documents go into the custom op unread (no graph break when compiled)
        per_call = per_call_documents(OP, sp_context, group, cu_seqlens, batch) is not None
        ctx = resolve_sp_context(OP, sp_context, group, split, None if per_call else cu_seqlens, local_len, batch,
                                 q.device)
    except (ValueError, TypeError):
        report_local_failure(OP, group_hint, q)  # the other ranks raise too, never wait for this one
        raise
    rank, world, parts = ctx.rank, ctx.world_size, ctx.parts_per_rank
    cu = None if ctx.cu_seqlens is None else ctx.cu_seqlens_list
    check, consistency = NO_CHECK, None
    if world > 1 and torch.compiler.is_compiling():
        why = own_communication(ctx, communicator=False)
        if why:
            return outside_graph(OP, why, softmax_attention, q, k, v, scale, group, layout, split, cu_seqlens,
                                 causal, backend, sp_context)
    if world > 1:
        signature = [batch, local_len, q.shape[2], k.shape[2], q.shape[3], v.shape[3], C.DTYPE_CODES[q.dtype], parts,
                     int(causal), -1 if cu is None else len(cu), int(q.requires_grad), int(k.requires_grad),
                     int(v.requires_grad), int(torch.is_grad_enabled())]
        if torch.compiler.is_compiling():  # the custom op checks the ranks (constants of the graph)
            consistency = [*signature, *host_digests(None if cu is None else tuple(cu), layout)]
        else:
            check = verify_group_consistency(
                OP, ctx.group, signature, CHECK_NAMES, q.device,
                host_values=[("`scale`", float(scale)), ("`cu_seqlens` contents", cu), ("`layout`", layout)])

    if layout == "tbhd":
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    o = lasp2h_attention(q, k, v, float(scale), K.resolve_backend(backend, q, v.shape[3], float(scale)), ctx.group,
                         ctx.collectives, rank, world, parts, ctx.effective_split, causal, cu,
                         # a private copy: the backward plans the documents from it again, and a
                         # caller's buffer edited in place (numpy views bump no version) changed them
                         cu_seqlens.clone() if per_call else None, consistency)
    return check.seal(o.transpose(0, 1) if layout == "tbhd" else o)
