"""Packed documents as the C++ schedules see them when documents carry their own
initial / final states (csrc/core/include/lasp2/lasp2.h: SequenceStates)."""

from __future__ import annotations

from typing import List, Optional, Sequence

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


def final_state_grad(d_final: Optional[torch.Tensor], output_final_state: bool, q: torch.Tensor, v: torch.Tensor,
                     doc_start: Optional[torch.Tensor], head_doc: Sequence[int],
                     num_seqs: int) -> Optional[torch.Tensor]:
    """The final-state gradient an op's backward passes to its schedule: None when no
    final states were returned; zeros [N, H, Dk, Dv] when they were but took no part in
    the loss (the same schedule runs, so every rank makes the same collectives)."""
    if not output_final_state:
        return None
    if d_final is None:
        n = num_seqs if doc_start is not None and head_doc else q.shape[0]
        d_final = q.new_zeros((n, q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)
    return d_final
