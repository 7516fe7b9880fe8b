"""All-to-all ("Ulysses") sequence parallelism for linear attention.

Each rank holds a contiguous share [B, T/P, H, D] of the sequence. One all-to-all
per tensor re-shards q, k, v (and g) by heads, [B, T, H/P, D]: every rank then holds
the whole sequence for H/P heads and runs single-device causal linear attention; one
more all-to-all brings o back to sequence sharding. Backward runs the adjoint
all-to-alls. Communication is O(T) activations per layer (4 all-to-alls forward, 4
backward with g's), against LASP-2's O(1) states; heads must divide by P.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

# Looked up at call time, so benchmarks can time or replace the exchange.
all_to_all_single = dist.all_to_all_single


def seq_to_head(x: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, T/P, H, D] sequence-sharded -> [B, T, H/P, D] head-sharded (not differentiable)."""
    B, Tl, H, D = x.shape
    send = x.reshape(B, Tl, world, H // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens, my heads
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * Tl, H // world, D)


def head_to_seq(y: torch.Tensor, group, world: int) -> torch.Tensor:
    """[B, T, H/P, D] head-sharded -> [B, T/P, H, D] sequence-sharded (not differentiable)."""
    B, T, Hp, D = y.shape
    send = y.reshape(B, world, T // world, Hp, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    all_to_all_single(recv, send, group=group)  # recv[i]: my tokens, rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // world, world * Hp, D)


class SeqToHead(torch.autograd.Function):
    """seq_to_head with head_to_seq as its adjoint (the all-to-all is a permutation)."""

    @staticmethod
    def forward(ctx, x, group, world):
        ctx.group, ctx.world = group, world
        return seq_to_head(x, group, world)

    @staticmethod
    def backward(ctx, grad):
        return head_to_seq(grad, ctx.group, ctx.world), None, None


class HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, group, world):
        ctx.group, ctx.world = group, world
        return head_to_seq(y, group, world)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_head(grad, ctx.group, ctx.world), None, None


def ulysses_linear_attention(q, k, v, g: Optional[torch.Tensor], decay: Optional[torch.Tensor],
                             doc_start: Optional[torch.Tensor], scale: float, chunk_size: int, group,
                             rank: int, world: int) -> torch.Tensor:
    """Validated [B, T/P, H, D] views in, o [B, T/P, H, Dv] out; `doc_start` covers the
    global sequence (the whole sequence is local after the all-to-all)."""
    from lasp2.ops.linear_attention import _Lasp2LinearAttention  # avoids an import cycle

    heads_per_rank = q.shape[2] // world
    qh, kh, vh = (SeqToHead.apply(x, group, world) for x in (q, k, v))
    gh = SeqToHead.apply(g.unsqueeze(-1), group, world).squeeze(-1) if g is not None else None
    decay_h = decay[rank * heads_per_rank:(rank + 1) * heads_per_rank] if decay is not None else None
    o = _Lasp2LinearAttention.apply(qh, kh, vh, gh, decay_h, doc_start, scale, chunk_size, None, 1, True)
    return HeadToSeq.apply(o, group, world)
