"""LASP-2H, the algorithm: one rank's causal softmax attention over a sequence split
across an SP group, as a plan of blocks and the forward / backward that run it.

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
explicit mask. See docs/lasp2h.md. The public op (argument checks, the custom op
that makes it traceable) is lasp2/ops/softmax_attention.py.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import Collectives
from lasp2.distributed.sequence_split import global_token_index, local_parts
from lasp2.ops import _softmax_blocks as K


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
class Config:
    """One rank's LASP-2H problem: the block plan and how to run and communicate it."""
    blocks: List[Block]
    scale: float
    backend: str
    group: Optional[dist.ProcessGroup]
    world: int
    split: str
    key_end: int  # keys [0, key_end) of the gathered sequence are used by remote blocks
    causal: bool
    collectives: Collectives


def lasp2h_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: Config):
    """(o, lse, kv_global) of one rank; q [B, T, H, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv]
    (bthd views). kv_global holds the gathered keys|values [key_end, B, Hkv, D + Dv] that
    the remote blocks used (backward reuses them), empty when there are none."""
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
    kv_global = None
    for blk in cfg.blocks:  # local blocks come first: they overlap the AllGather
        if not blk.local and work is not None:
            work.wait()
            work = None
            kv_global = _global_kv(gathered, t, cfg)
        kk, vv = _block_kv(blk, k, v, kv_global, cfg)
        o_b, lse_b = K.block_forward(cfg.backend, q[:, blk.rows], kk, vv, cfg.scale, blk.local)
        if blk.local or not cfg.causal:
            o_acc[:, blk.rows] = o_b
            lse_acc[:, :, blk.rows] = lse_b
        else:
            K.merge_into(o_acc, lse_acc, blk.rows, o_b, lse_b)
    if work is not None:  # no remote block on this rank, which still takes part
        work.wait()
    if kv_global is None:
        kv_global = q.new_empty(0, b, k.shape[2], d + dv_dim)
    return o_acc.to(q.dtype), lse_acc, kv_global


def lasp2h_backward(do, q, k, v, o, lse, kv_global, cfg: Config, need_kv_grads: bool):
    """(dq, dk, dv) in the inputs' dtypes: dQ stays local, dK/dV of the gathered keys
    go back to their owners with ONE reduce-scatter overlapped with the local blocks."""
    acc = K.acc_dtype(q.dtype)
    b, t, h, d = q.shape
    hkv, dv_dim = k.shape[2], v.shape[3]
    do = do.contiguous() if do.stride(-1) != 1 else do
    dq = torch.zeros(b, t, h, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, t, hkv, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, t, hkv, dv_dim, dtype=acc, device=q.device)
    work = received = None
    order = [blk for blk in cfg.blocks if not blk.local] + [blk for blk in cfg.blocks if blk.local]
    d_kv_global = None
    if cfg.world > 1 and need_kv_grads:
        d_kv_global = torch.zeros(t * cfg.world, b, hkv, d + dv_dim, dtype=acc, device=q.device)
    for blk in order:
        if blk.local and work is None and d_kv_global is not None:
            work, received = _start_reduce_scatter(d_kv_global, t, cfg)
        kk, vv = _block_kv(blk, k, v, kv_global, cfg)
        g_q, g_k, g_v = K.block_backward(cfg.backend, do[:, blk.rows], q[:, blk.rows], kk, vv,
                                         o[:, blk.rows], lse[:, :, blk.rows], cfg.scale, blk.local)
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
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def key_end(blocks: List[Block]) -> int:
    """Keys [0, key_end) of the gathered sequence are all the remote blocks read."""
    return max([blk.k_hi for blk in blocks if not blk.local], default=0)


def _global_kv(gathered: torch.Tensor, local_len: int, cfg: Config) -> torch.Tensor:
    """Keys|values at global positions [0, key_end) from the rank-major gathered rows."""
    _, inv = _rank_major_positions(local_len, cfg.world, cfg.split, gathered.device)
    return gathered.index_select(0, inv[:cfg.key_end])  # [key_end, B, Hkv, D + Dv]


def _block_kv(blk: Block, k, v, kv_global, cfg: Config):
    """The keys and values of a block as [B, S, Hkv, D] views."""
    if blk.local:
        return k[:, blk.rows], v[:, blk.rows]
    if cfg.world == 1:  # one process: global positions are local rows
        return k[:, blk.k_lo:blk.k_hi], v[:, blk.k_lo:blk.k_hi]
    rows = kv_global[blk.k_lo:blk.k_hi].transpose(0, 1)
    d = k.shape[3]
    return rows[..., :d], rows[..., d:]


def _start_reduce_scatter(d_kv_global: torch.Tensor, local_len: int, cfg: Config):
    """Sum every rank's dK|dV of the gathered keys into each key's owner (one collective)."""
    perm, _ = _rank_major_positions(local_len, cfg.world, cfg.split, d_kv_global.device)
    send = d_kv_global.index_select(0, perm)  # rank-major: owner r's rows are block r
    received = send.new_empty(local_len, *send.shape[1:])
    work = cfg.collectives.reduce_scatter_single(received, send, op=dist.ReduceOp.SUM, group=cfg.group,
                                                async_op=True)
    return work, received
