"""All-to-all ("Ulysses") sequence parallelism for linear attention.

Each rank holds a contiguous share [B, T/P, H, D] of the sequence. One all-to-all
per tensor re-shards q, k, v (and g) by heads, [B, T, H/P, D]: every rank then holds
the whole sequence for H/P heads and runs single-device causal linear attention; one
more all-to-all brings o back to sequence sharding. Backward runs the adjoint
all-to-alls. Communication is O(T) activations per layer (4 all-to-alls forward, 4
backward with g's), against LASP-2's O(1) states; heads must divide by P.
"""

from __future__ import annotations

import torch

from lasp2.ops.providers.base import KernelCall, Provider
from lasp2.ops.providers.lasp2 import Lasp2LinearAttention


def seq_to_head(x: torch.Tensor, sp_context) -> torch.Tensor:
    """[B, T/P, H, D] sequence-sharded -> [B, T, H/P, D] head-sharded (not differentiable)."""
    world = sp_context.world_size
    B, Tl, H, D = x.shape
    send = x.reshape(B, Tl, world, H // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    sp_context.collectives.all_to_all_single(recv, send, group=sp_context.group)  # recv[i]: rank i's tokens
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * Tl, H // world, D)


def head_to_seq(y: torch.Tensor, sp_context) -> torch.Tensor:
    """[B, T, H/P, D] head-sharded -> [B, T/P, H, D] sequence-sharded (not differentiable)."""
    world = sp_context.world_size
    B, T, Hp, D = y.shape
    send = y.reshape(B, world, T // world, Hp, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    sp_context.collectives.all_to_all_single(recv, send, group=sp_context.group)  # recv[i]: rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // world, world * Hp, D)


class SeqToHead(torch.autograd.Function):
    """seq_to_head with head_to_seq as its adjoint (the all-to-all is a permutation)."""

    @staticmethod
    def forward(ctx, x, sp_context):
        ctx.sp_context = sp_context
        return seq_to_head(x, sp_context)

    @staticmethod
    def backward(ctx, grad):
        return head_to_seq(grad, ctx.sp_context), None


class HeadToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, sp_context):
        ctx.sp_context = sp_context
        return head_to_seq(y, sp_context)

    @staticmethod
    def backward(ctx, grad):
        return seq_to_head(grad, ctx.sp_context), None


class UlyssesProvider(Provider):
    name = "ulysses"
    splits = ("contiguous",)

    def check(self, owner: str, *, heads: int, split: str, world_size: int) -> None:
        super().check(owner, heads=heads, split=split, world_size=world_size)
        if world_size > 1 and heads % world_size:
            raise ValueError(f"{owner}: provider \"ulysses\" shards heads over the group: the number of heads "
                             f"({heads}) must be divisible by the group size ({world_size})")

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap):
        """[B, T/P, H, D] views in, o [B, T/P, H, Dv] out: single-device LASP-2 on the whole
        sequence for this rank's H/P heads (document starts of the global sequence)."""
        heads = q.shape[2] // sp_context.world_size
        rank = sp_context.rank
        qh, kh, vh = (SeqToHead.apply(x, sp_context) for x in (q, k, v))
        gh = SeqToHead.apply(g.unsqueeze(-1), sp_context).squeeze(-1) if g is not None else None
        decay_h = decay[rank * heads:(rank + 1) * heads] if decay is not None else None
        starts = sp_context.global_doc_start
        call = KernelCall(scale, None if starts is None else starts.to(q.device), None)
        return HeadToSeq.apply(Lasp2LinearAttention.apply(qh, kh, vh, gh, decay_h, call), sp_context)
