"""A depthwise short causal convolution (fla's ShortConvolution) whose result is the
same with or without sequence parallelism.

Token t of a part needs the previous kernel_size - 1 tokens of the *global*
sequence, which for the first tokens of a part live on the rank holding the
previous part. One AllGather of every part's last kernel_size - 1 tokens (the
halo) brings them; in backward one AllGather of the halo gradients returns each
part's share to the rank that owns the tokens. Packed documents (cu_seqlens) are
respected: no output mixes tokens of two documents.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lasp2.distributed.collectives import all_gather_single
from lasp2.distributed.communicator import group_rank_and_size
from lasp2.distributed.context import check_cu_seqlens
from lasp2.distributed.sequence_split import global_token_index


class _GatherHalo(torch.autograd.Function):
    """tails [parts, B, W-1, C] of this rank's parts -> the same for every rank, stacked
    [world * parts, ...] in rank order; backward returns to each rank the summed
    gradients of its own tails."""

    @staticmethod
    def forward(ctx, tails, group):
        world = dist.get_world_size(group)
        out = tails.new_empty((world * tails.shape[0],) + tuple(tails.shape[1:]))
        all_gather_single(out, tails.contiguous(), group=group)
        ctx.group, ctx.parts = group, tails.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        group, parts = ctx.group, ctx.parts
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        gathered = grad.new_empty((world * grad.shape[0],) + tuple(grad.shape[1:]))
        all_gather_single(gathered, grad.contiguous(), group=group)
        # every rank's gradient for this rank's tails, summed
        gathered = gathered.view((world,) + tuple(grad.shape))
        mine = gathered[:, rank * parts:(rank + 1) * parts].sum(0)
        return mine, None


def _global_doc_ids(cu_seqlens, global_len):
    starts = torch.zeros(global_len, dtype=torch.int64)
    if cu_seqlens is not None:  # checked: unchecked values would index out of range or mislabel tokens
        starts[check_cu_seqlens("ShortConvolution", cu_seqlens, global_len)[1:-1]] = 1
    return torch.cumsum(starts, 0)


def causal_conv_sp(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   group=None, split: str = "contiguous", cu_seqlens: Optional[torch.Tensor] = None):
    """y_t = sum_i weight[c, i] x_{t - (W-1) + i} (+ bias) per channel, over the global
    sequence; x is this rank's share [B, T_local, C]."""
    B, T, Cn = x.shape
    W = weight.shape[1]
    rank, world = group_rank_and_size(group)
    parts = 2 if split == "balanced" and world > 1 else 1
    n = T // parts
    halo = W - 1
    if world > 1 and halo > n:
        raise ValueError(f"causal_conv_sp: each part holds {n} tokens, fewer than kernel_size - 1 = {halo}; "
                         "use a shorter kernel or longer local sequences")
    global_len = T * world
    position = global_token_index(T, rank, world, "balanced" if parts == 2 else "contiguous")
    doc = _global_doc_ids(cu_seqlens, global_len)
    xs = x.view(B, parts, n, Cn)
    if world > 1 and halo > 0:
        tails = xs[:, :, n - halo:].permute(1, 0, 2, 3)  # [parts, B, halo, C]
        every = _GatherHalo.apply(tails, group)          # [world * parts, B, halo, C], rank order
    outputs = []
    for i in range(parts):
        first = int(position[i * n])  # global position of the part's first token
        if halo == 0:
            ext = xs[:, i]
        elif world == 1:
            ext = F.pad(xs[:, i], (0, 0, halo, 0))
        else:
            # The sequence's first part reads some other part's tail too, masked to zero
            # below (positions < 0): every rank's output then depends on the gathered
            # halo, so every rank joins the collective of its backward.
            prev_part = max(first // n - 1, 0)  # global part index of the predecessor
            owner = prev_part if prev_part < world else 2 * world - 1 - prev_part
            slot = owner * parts + (0 if parts == 1 or prev_part < world else 1)
            ext = torch.cat([every[slot], xs[:, i]], dim=1)
        # positions of ext rows: first - halo ... first + n - 1
        pos = torch.arange(first - halo, first + n)
        doc_ext = torch.where(pos >= 0, doc[pos.clamp_min(0)], torch.full_like(pos, -1))
        y = 0
        for j in range(W):  # tap j reads x_{t - (W-1) + j}
            src = ext[:, j:j + n]
            same_doc = (doc_ext[j:j + n] == doc_ext[halo:halo + n]).to(x.dtype).to(x.device)
            y = y + src * weight[:, j] * same_doc[None, :, None]
        if bias is not None:
            y = y + bias
        outputs.append(y)
    return torch.cat(outputs, dim=1)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution of width kernel_size with an optional SiLU, over
    [B, T_local, C] inputs, the same with or without `group`."""

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: `kernel_size` must be >= 1, got {kernel_size}")
        if activation not in ("silu", None, "identity"):
            raise ValueError(f"ShortConvolution: `activation` must be 'silu' or None, got {activation!r}")
        self.kernel_size, self.activation = kernel_size, activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if bias else None
        bound = kernel_size ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, group=None, split="contiguous", cu_seqlens=None):
        y = causal_conv_sp(x, self.weight, self.bias, group, split, cu_seqlens)
        return F.silu(y) if self.activation == "silu" else y
