"""Packed documents as the C++ schedules see them when documents carry their own
initial / final states (csrc/core/include/lasp2/lasp2.h: SequenceStates)."""

from __future__ import annotations

from typing import List

import torch


def head_docs(values: torch.Tensor, global_len: int, total_parts: int) -> List[int]:
    """Per global part, the document whose end is the end of the part's head (its tokens
    before its first document start); -1 when no document starts inside the part.
    `values` are the global cu_seqlens (CPU int64, strictly increasing)."""
    starts = values[1:-1].tolist()
    part_len = global_len // total_parts
    out: List[int] = []
    for part in range(total_parts):
        begin, end = part * part_len, (part + 1) * part_len
        first = next((s for s in starts if begin <= s < end), None)
        # the document holding token first - 1: the number of starts at or before it
        out.append(-1 if first is None else sum(1 for s in starts if s <= first - 1))
    return out
