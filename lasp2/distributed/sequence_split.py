"""Splitting a batch along the sequence across an SP group, and undoing it.

Two layouts, shared by linear attention (LASP-2) and softmax attention (LASP-2H):
  "contiguous": rank r holds tokens [r*T/P, (r+1)*T/P).
  "balanced":   the sequence is cut into 2P parts; rank r holds parts r and
                2P-1-r (concatenated), which evens out causal attention work.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lasp2.distributed.communicator import group_rank_and_size
from lasp2.options import SPLITS


def _parts_per_rank(split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return 1 if split == "contiguous" else 2


def global_token_index(local_len: int, rank: int, world_size: int, split: str = "contiguous",
                       device=None) -> torch.Tensor:
    """Global positions of a rank's local tokens, as an int64 tensor of length local_len."""
    parts = _parts_per_rank(split)
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
    if rank is None or world_size is None:
        rank, world_size = group_rank_and_size(group)
    total = x.shape[dim]
    if total % (world_size * parts):
        raise ValueError(
            f"sequence length {total} (dim {dim}) must divide into {world_size * parts} equal parts "
            f"for the {split!r} split over {world_size} ranks")
    index = global_token_index(total // world_size, rank, world_size, split, device=x.device)
    return x.index_select(dim, index)


def gather_sequence(x: torch.Tensor, group: Optional[dist.ProcessGroup] = None,
                    split: str = "contiguous", dim: int = 1) -> torch.Tensor:
    """Inverse of split_sequence: the full sequence on every rank (not differentiable)."""
    rank, world_size = group_rank_and_size(group)
    if world_size == 1:
        return x
    pieces = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(pieces, x.contiguous(), group=group)
    local_len = x.shape[dim]
    out_shape = list(x.shape)
    out_shape[dim] = local_len * world_size
    out = x.new_empty(out_shape)
    for r, piece in enumerate(pieces):
        index = global_token_index(local_len, r, world_size, split, device=x.device)
        out.index_copy_(dim, index, piece)
    return out
