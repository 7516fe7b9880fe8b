"""Splitting a batch along the sequence across an SP group, and undoing it.

Two layouts, shared by linear attention (LASP-2) and softmax attention (LASP-2H):
  "contiguous": rank r holds tokens [r*T/P, (r+1)*T/P).
  "balanced":   the sequence is cut into 2P parts; rank r holds parts r and
                2P-1-r (concatenated), which evens out causal attention work.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.communicator import check_group, group_rank_and_size
from lasp2.options import SPLITS


def _parts_per_rank(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return 1 if split == "contiguous" else 2


def local_parts(local_len: int, rank: int, world_size: int, parts_per_rank: int) -> List[Tuple[int, int, int]]:
    """(local start, length, global start) of each part a rank holds (1 or 2 parts a rank)."""
    if parts_per_rank == 1:
        return [(0, local_len, rank * local_len)]
    half = local_len // 2
    return [(0, half, rank * half), (half, half, (2 * world_size - 1 - rank) * half)]


def _check_int(name: str, value, low: int):
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {value}")


def _check_rank(rank, world_size):
    _check_int("world_size", world_size, 1)
    _check_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"`rank` must lie in [0, world_size={world_size}), got {rank}")


def _check_dim(x, dim) -> int:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"`x` must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"`dim` must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"`dim` {dim} is out of range for a tensor of {x.dim()} dimensions")
    return dim % x.dim()


def global_token_index(local_len: int, rank: int, world_size: int, split: str = "contiguous",
                       device=None) -> torch.Tensor:
    """Global positions of a rank's local tokens, as an int64 tensor of length local_len."""
    parts = _parts_per_rank(split)
    _check_int("local_len", local_len, 0)
    _check_rank(rank, world_size)
    if local_len % parts:
        raise ValueError(f"the balanced split needs an even local length, got {local_len}")
    part_len = local_len // parts
    local = torch.arange(local_len, device=device)
    part = local // part_len
    if parts == 1:
        global_part = torch.full_like(part, rank)
    else:
        global_part = torch.where(part == 0, rank, 2 * world_size - 1 - rank)
    return global_part * part_len + local % part_len


def split_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                   split: str = "contiguous", dim: int = 1, rank: Optional[int] = None,
                   world_size: Optional[int] = None) -> torch.Tensor:
    """This rank's share of a full-sequence tensor along `dim`."""
    parts = _parts_per_rank(split)
    dim = _check_dim(x, dim)
    if (rank is None) != (world_size is None):
        raise ValueError("pass both `rank` and `world_size`, or neither (then they come from `group`)")
    if rank is None or world_size is None:
        check_group("lasp2.split_sequence", group)  # e.g. new_group's placeholder on a non-member: name `group`
        rank, world_size = group_rank_and_size(group)
    _check_rank(rank, world_size)
    total = x.shape[dim]
    if total % (world_size * parts):
        raise ValueError(
            f"sequence length {total} (dim {dim}) must divide into {world_size * parts} equal parts "
            f"for the {split!r} split over {world_size} ranks")
    index = global_token_index(total // world_size, rank, world_size, split, device=x.device)
    return x.index_select(dim, index)


GATHER = "lasp2.gather_sequence"
GATHER_CHECK_NAMES = ("number of dims of `x`", "`dim`", "local sequence length", "split")


def gather_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                    split: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of split_sequence: the full sequence on every rank.
    Ranks that pass different shapes, dtypes, splits or dims all raise the same ValueError
    (one small cross-rank check before the all-gather, which with mismatched sizes aborted
    the process inside gloo, and with mismatched splits or dims reassembled a wrong sequence).

    Differentiable as split_sequence's adjoint: the gradient reaching `x` is this rank's rows
    of the gradient of the gathered tensor. That is the one-process gradient when every rank
    computes the same loss from the gathered sequence and the parameters' gradients are summed
    over the group (as Megatron's data x context-parallel reduction does), and what a group of
    one returns (`x` itself). (Before session 22 the gathered tensor had no gradient at all
    with more than one rank, while a group of one passed it: a loss through it trained on one
    device and silently lost that gradient under sequence parallelism.)"""
    check_group(GATHER, group)
    rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        _parts_per_rank(split)
        _check_dim(x, dim)
        return x
    from lasp2.ops._group_consistency import group_device, raised_on_every_rank, verify_group_consistency

    with raised_on_every_rank(GATHER, group, x):  # the other ranks raise too, never wait for this one
        parts = _parts_per_rank(split)
        dim = _check_dim(x, dim)
        if x.shape[dim] % parts:
            raise ValueError(f"the balanced split needs an even local length, `x` has {x.shape[dim]} (dim {dim})")
    verify_group_consistency(GATHER, group, [x.dim(), dim, x.shape[dim], parts], GATHER_CHECK_NAMES,
                             group_device(group, x),
                             host_values=[("`x` shape", list(x.shape)), ("`x` dtype", str(x.dtype))])
    return _GatherSequence.apply(x, group, split, dim, rank, world_size)


class _GatherSequence(torch.autograd.Function):
    """The all-gather of gather_sequence; backward keeps this rank's rows (split_sequence)."""

    @staticmethod
    def forward(ctx, x, group, split, dim, rank, world_size):
        pieces = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(pieces, x.contiguous(), group=group)
        local_len = x.shape[dim]
        out_shape = list(x.shape)
        out_shape[dim] = local_len * world_size
        out = x.new_empty(out_shape)
        for r, piece in enumerate(pieces):
            out.index_copy_(dim, global_token_index(local_len, r, world_size, split, device=x.device), piece)
        ctx.dim = dim
        ctx.save_for_backward(global_token_index(local_len, rank, world_size, split, device=x.device))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (own_rows,) = ctx.saved_tensors
        return grad_out.index_select(ctx.dim, own_rows), None, None, None, None, None
