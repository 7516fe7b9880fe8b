"""lasp2.softmax_attention: causal softmax attention, sequence-parallel with LASP-2H.

The softmax-attention layers of a hybrid model under the same sequence split as
its linear-attention (LASP-2) layers. Per layer and rank:

forward   pack this rank's K and V into one buffer and start ONE async AllGather
          over the SP group; while it runs, attend each local query part to its own
          keys (the square causal "diagonal" block); then attend the part to the
          earlier keys of the gathered sequence (a "full" block, no mask) and merge
          the two with their log-sum-exp. Keys after a part's last query are never
          touched, so causal work is not wasted.
backward  recompute each block from the saved q, gathered K/V, merged output and
          LSE; dQ stays local, dK/dV of the gathered keys go back to their owners
          with ONE reduce-scatter (packed dK|dV), overlapped with the diagonal
          blocks' backward, whose dK/dV are local.

With cu_seqlens (global, B = 1) a part is cut at document starts: each piece
attends causally within itself and, if its document began earlier, fully to the
earlier keys of that document; nothing crosses a boundary and no block needs an
explicit mask. See docs/lasp2h.md.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import Collectives
from lasp2.distributed.context import SPContext, resolve_sp_context
from lasp2.distributed.sequence_split import global_token_index, local_parts
from lasp2.ops import _checks as C
from lasp2.ops import _softmax_blocks as K
from lasp2.ops._group_consistency import report_local_failure, verify_group_consistency

OP = "lasp2.softmax_attention"


@dataclass(frozen=True)
class Block:
    """Local query rows [q_lo, q_hi) against keys [k_lo, k_hi).

    local=True: the keys are this rank's own rows [q_lo, q_hi) (square causal block,
    computable before the AllGather ends). local=False: global key positions of the
    gathered sequence, every query sees every key (full block).
    """
    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    local: bool

    @property
    def rows(self) -> slice:
        return slice(self.q_lo, self.q_hi)


def plan_blocks(local_len: int, rank: int, world: int, parts: int, causal: bool,
                cu: Optional[List[int]]) -> List[Block]:
    """The blocks of one rank's attention; local (diagonal) blocks first."""
    total = local_len * world
    local_blocks, remote_blocks = [], []
    for lstart, length, gstart in local_parts(local_len, rank, world, parts):
        gend = gstart + length
        cuts = [gstart] + ([c for c in cu if gstart < c < gend] if cu else []) + [gend]
        cuts = sorted(set(cuts))
        for a, b in zip(cuts[:-1], cuts[1:]):
            lo, hi = lstart + a - gstart, lstart + b - gstart
            if cu:
                i = bisect.bisect_right(cu, a) - 1
                doc_start, doc_end = cu[i], cu[i + 1]
            else:
                doc_start, doc_end = 0, total
            if causal:
                local_blocks.append(Block(lo, hi, a, b, True))
                if doc_start < a:
                    remote_blocks.append(Block(lo, hi, doc_start, a, False))
            else:
                remote_blocks.append(Block(lo, hi, doc_start, doc_end, False))
    return local_blocks + remote_blocks


_PERMS: dict = {}


def _rank_major_positions(local_len: int, world: int, split: str, device) -> Tuple[torch.Tensor, torch.Tensor]:
    """perm[i] = global position of row i of the rank-major gathered buffer; inv = its inverse."""
    key = (local_len, world, split, str(device))
    hit = _PERMS.get(key)
    if hit is None:
        perm = torch.cat([global_token_index(local_len, r, world, split) for r in range(world)])
        hit = (perm.to(device), torch.argsort(perm).to(device))
        _PERMS[key] = hit
    return hit


@dataclass
class _Config:
    blocks: List[Block]
    scale: float
    backend: str
    group: Optional[dist.ProcessGroup]
    world: int
    split: str
    key_end: int  # keys [0, key_end) of the gathered sequence are used by remote blocks
    causal: bool
    collectives: Collectives


class _SoftmaxAttention(torch.autograd.Function):
    """q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] views (bthd)."""

    @staticmethod
    def forward(ctx, q, k, v, cfg: _Config):
        acc = K.acc_dtype(q.dtype)
        b, t, h, _ = q.shape
        d, dv_dim = k.shape[3], v.shape[3]
        work, gathered = None, None
        if cfg.world > 1:
            # one buffer [T_local, B, Hkv, D + Dv] per rank: the gathered rows are rank-major
            packed = q.new_empty(t, b, k.shape[2], d + dv_dim)
            packed[..., :d].copy_(k.transpose(0, 1))
            packed[..., d:].copy_(v.transpose(0, 1))
            gathered = packed.new_empty(cfg.world * t, *packed.shape[1:])
            work = cfg.collectives.all_gather_single(gathered, packed, group=cfg.group, async_op=True)

        # every row's first block is copied in (causal: its diagonal; bidirectional: its only block)
        o_acc = torch.empty(b, t, h, dv_dim, dtype=acc, device=q.device)
        lse_acc = torch.empty(b, h, t, dtype=acc, device=q.device)
        aux = {}
        kv_global = None
        for i, blk in enumerate(cfg.blocks):  # local blocks come first: they overlap the AllGather
            if not blk.local and work is not None:
                work.wait()
                work = None
                kv_global = _global_kv(gathered, t, cfg)
            kk, vv = _block_kv(blk, k, v, kv_global, cfg)
            o_b, lse_b, aux[i] = K.block_forward(cfg.backend, q[:, blk.rows], kk, vv, cfg.scale, blk.local)
            if blk.local or not cfg.causal:
                o_acc[:, blk.rows] = o_b
                lse_acc[:, :, blk.rows] = lse_b
            else:
                K.merge_into(o_acc, lse_acc, blk.rows, o_b, lse_b)
        if work is not None:  # no remote block on this rank, which still takes part
            work.wait()
        del gathered
        o = o_acc.to(q.dtype)
        ctx.save_for_backward(q, k, v, o, lse_acc, *([kv_global] if kv_global is not None else []))
        ctx.cfg, ctx.aux = cfg, aux
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, *rest = ctx.saved_tensors
        cfg, aux = ctx.cfg, ctx.aux
        kv_global = rest[0] if rest else None
        acc = K.acc_dtype(q.dtype)
        b, t, h, d = q.shape
        hkv, dv_dim = k.shape[2], v.shape[3]
        do = do.contiguous() if do.stride(-1) != 1 else do
        dq = torch.zeros(b, t, h, d, dtype=acc, device=q.device)
        dk = torch.zeros(b, t, hkv, d, dtype=acc, device=q.device)
        dv = torch.zeros(b, t, hkv, dv_dim, dtype=acc, device=q.device)
        work = received = None
        order = [i for i, blk in enumerate(cfg.blocks) if not blk.local] + \
                [i for i, blk in enumerate(cfg.blocks) if blk.local]
        need_kv_grads = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        d_kv_global = None
        if cfg.world > 1 and need_kv_grads:
            d_kv_global = torch.zeros(t * cfg.world, b, hkv, d + dv_dim, dtype=acc, device=q.device)
        for i in order:
            blk = cfg.blocks[i]
            if blk.local and work is None and d_kv_global is not None:
                work, received = _start_reduce_scatter(d_kv_global, t, cfg)
            kk, vv = _block_kv(blk, k, v, kv_global, cfg)
            g_q, g_k, g_v = K.block_backward(cfg.backend, do[:, blk.rows], q[:, blk.rows], kk, vv,
                                             o[:, blk.rows], lse[:, :, blk.rows], cfg.scale, blk.local, aux[i])
            dq[:, blk.rows] += g_q
            if blk.local:
                dk[:, blk.rows] += g_k
                dv[:, blk.rows] += g_v
            elif cfg.world > 1:
                if d_kv_global is None:
                    continue  # k and v need no gradient
                target = d_kv_global[blk.k_lo:blk.k_hi].transpose(0, 1)  # [B, keys, Hkv, D + Dv]
                target[..., :d] += g_k
                target[..., d:] += g_v
            else:  # one process: global key positions are local rows
                dk[:, blk.k_lo:blk.k_hi] += g_k
                dv[:, blk.k_lo:blk.k_hi] += g_v
        if d_kv_global is not None:
            if work is None:
                work, received = _start_reduce_scatter(d_kv_global, t, cfg)
            work.wait()
            mine = received.transpose(0, 1)  # [B, T, Hkv, D + Dv]
            dk += mine[..., :d]
            dv += mine[..., d:]
        return C.guard_double_backward(OP, (dq.to(q.dtype) if ctx.needs_input_grad[0] else None,
                                            dk.to(k.dtype) if ctx.needs_input_grad[1] else None,
                                            dv.to(v.dtype) if ctx.needs_input_grad[2] else None,
                                            None))


def _global_kv(gathered: torch.Tensor, local_len: int, cfg: _Config) -> torch.Tensor:
    """Keys|values at global positions [0, key_end) from the rank-major gathered rows."""
    _, inv = _rank_major_positions(local_len, cfg.world, cfg.split, gathered.device)
    return gathered.index_select(0, inv[:cfg.key_end])  # [key_end, B, Hkv, D + Dv]


def _block_kv(blk: Block, k, v, kv_global, cfg: _Config):
    """The keys and values of a block as [B, S, Hkv, D] views."""
    if blk.local:
        return k[:, blk.rows], v[:, blk.rows]
    if cfg.world == 1:  # one process: global positions are local rows
        return k[:, blk.k_lo:blk.k_hi], v[:, blk.k_lo:blk.k_hi]
    rows = kv_global[blk.k_lo:blk.k_hi].transpose(0, 1)
    d = k.shape[3]
    return rows[..., :d], rows[..., d:]


def _start_reduce_scatter(d_kv_global: torch.Tensor, local_len: int, cfg: _Config):
    """Sum every rank's dK|dV of the gathered keys into each key's owner (one collective)."""
    perm, _ = _rank_major_positions(local_len, cfg.world, cfg.split, d_kv_global.device)
    send = d_kv_global.index_select(0, perm)  # rank-major: owner r's rows are block r
    received = send.new_empty(local_len, *send.shape[1:])
    work = cfg.collectives.reduce_scatter_single(received, send, op=dist.ReduceOp.SUM, group=cfg.group,
                                                async_op=True)
    return work, received


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
    if k.shape[2] < 1 or q.shape[2] % k.shape[2]:
        C.fail(OP, f"`k` has {k.shape[2]} heads, which must divide the {q.shape[2]} heads of `q` (GQA)")
    C.check_head_dim(OP, "q", q.shape[3])
    C.check_head_dim(OP, "v", v.shape[3])
    if q.shape[seq_dim] < 1:
        C.fail(OP, "`q` has an empty sequence dimension")
    if q.shape[1 - seq_dim] < 1:
        C.fail(OP, "`q` has an empty batch dimension")
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
        ctx = resolve_sp_context(OP, sp_context, group, split, cu_seqlens, local_len, batch, q.device)
    except (ValueError, TypeError):
        report_local_failure(OP, group_hint, q)  # the other ranks raise too, never wait for this one
        raise
    rank, world, parts, cu = ctx.rank, ctx.world_size, ctx.parts_per_rank, ctx.cu_seqlens_list
    if world > 1:
        verify_group_consistency(
            OP, ctx.group,
            [batch, local_len, q.shape[2], k.shape[2], q.shape[3], v.shape[3], C.DTYPE_CODES[q.dtype], parts,
             int(causal), -1 if cu is None else len(cu), int(q.requires_grad), int(k.requires_grad),
             int(v.requires_grad), int(torch.is_grad_enabled())],
            ["batch size", "local sequence length", "query heads", "key/value heads", "key head dim",
             "value head dim", "dtype", "split", "causal", "number of cu_seqlens entries",
             "q.requires_grad", "k.requires_grad", "v.requires_grad", "grad mode"],
            q.device,
            host_values=[("`scale`", float(scale)), ("`cu_seqlens` contents", cu), ("`layout`", layout)])

    if layout == "tbhd":
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
    blocks = plan_blocks(local_len, rank, world, parts, causal, cu)
    key_end = max([blk.k_hi for blk in blocks if not blk.local], default=0)
    cfg = _Config(blocks, float(scale), K.resolve_backend(backend, q, v.shape[3], float(scale)), ctx.group, world,
                  ctx.effective_split, key_end, causal, ctx.collectives)
    o = _SoftmaxAttention.apply(q, k, v, cfg)
    return o.transpose(0, 1) if layout == "tbhd" else o
