"""Packed sequences: from global cu_seqlens to this rank's document-start flags."""

from __future__ import annotations

import torch

from lasp2.distributed.sequence_split import global_token_index


def check_cu_seqlens(op: str, cu_seqlens, batch: int, global_len: int) -> torch.Tensor:
    """Validates cu_seqlens and returns it as an int64 CPU tensor."""
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"{op}: `cu_seqlens` must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: `cu_seqlens` must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"{op}: `cu_seqlens` must be 1-D with at least 2 entries, got shape {list(cu_seqlens.shape)}")
    if batch != 1:
        raise ValueError(f"{op}: `cu_seqlens` needs packed input with batch size 1, got batch {batch}")
    values = cu_seqlens.detach().to("cpu", torch.int64)
    if values[0].item() != 0:
        raise ValueError(f"{op}: `cu_seqlens` must start at 0, got {values[0].item()}")
    if bool((values[1:] < values[:-1]).any()):
        raise ValueError(f"{op}: `cu_seqlens` must be non-decreasing, got {values.tolist()}")
    if values[-1].item() != global_len:
        raise ValueError(
            f"{op}: `cu_seqlens` must end at the global sequence length {global_len} "
            f"(local length x group size), got {values[-1].item()}")
    return values


def doc_starts_from_cu_seqlens(op: str, cu_seqlens, batch: int, local_len: int, rank: int, world: int,
                               split: str, device) -> torch.Tensor:
    """uint8 [local_len]: 1 where a local token begins a document (other than token 0)."""
    values = check_cu_seqlens(op, cu_seqlens, batch, local_len * world)
    starts = torch.zeros(local_len * world + 1, dtype=torch.uint8)
    starts[values[1:-1]] = 1
    global_index = global_token_index(local_len, rank, world, split)
    return starts[global_index].to(device)
