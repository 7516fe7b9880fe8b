"""Packed documents as the C++ schedules see them: each rank's document starts and,
when documents carry their own initial / final states, the head documents of the parts
(csrc/core/include/lasp2/lasp2.h: SequenceStates). The custom ops plan them here from a
cu_seqlens tensor (the delta rule always, linear attention for per-call documents on one
device), reading its values inside the op, where torch.compile does not trace."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from lasp2.distributed.context import check_cu_seqlens, document_starts
from lasp2.distributed.sequence_split import global_token_index


def head_docs(values: Sequence[int], global_len: int, total_parts: int) -> List[int]:
    """Per global part, the document whose end is the end of the part's head (its tokens
    before its first document start); -1 when no document starts inside the part.
    `values` are the global cu_seqlens (strictly increasing)."""
    starts = values[1:-1]
    part_len = global_len // total_parts
    out: List[int] = []
    for part in range(total_parts):
        begin, end = part * part_len, (part + 1) * part_len
        first = next((s for s in starts if begin <= s < end), None)
        # the document holding token first - 1: the number of starts at or before it
        out.append(-1 if first is None else sum(1 for s in starts if s <= first - 1))
    return out


def check_nonempty_documents(owner: str, bounds: Sequence[int], when: str = ""):
    """ValueError naming cu_seqlens if two of its (python int) boundaries are equal."""
    if any(a == b for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"{owner}: `cu_seqlens` must be strictly increasing (no empty documents){when}, "
                         f"got {list(bounds)}")


# the ops' condition for strictly increasing cu_seqlens when documents carry states (linear
# attention's; the delta rule always needs them)
WITH_STATES = " with `initial_state` / `output_final_state`"


def global_documents(owner: str, cu_seqlens: torch.Tensor, global_len: int, nonempty_when: Optional[str]):
    """Reads the values of cu_seqlens once: (the boundaries as python ints, the global
    document starts). ValueError naming it unless they run from 0 to the global length,
    non-decreasing (strictly increasing, with `nonempty_when` in the message, unless that
    is None)."""
    values = check_cu_seqlens(owner, cu_seqlens, global_len)
    bounds = values.tolist()
    if nonempty_when is not None:
        check_nonempty_documents(owner, bounds, nonempty_when)
    return bounds, document_starts(values, global_len)


def _local_index(local_len: int, rank: int, world: int, parts_per_rank: int) -> torch.Tensor:
    return global_token_index(local_len, rank, world, "balanced" if parts_per_rank == 2 else "contiguous")


def local_documents(owner: str, cu_seqlens: torch.Tensor, local_len: int, rank: int, world: int,
                    parts_per_rank: int, device: torch.device):
    """This rank's view of the global packed documents: (doc_start uint8 [T_local],
    doc_id int32 [T_local], head_doc per global part, the boundaries as python ints).
    Reads the values of cu_seqlens once (ValueError naming it when they are not strictly
    increasing from 0 to the global length), so the ops call it inside their kernels,
    where torch.compile does not trace."""
    global_len = local_len * world
    bounds, starts = global_documents(owner, cu_seqlens, global_len, "")
    doc_of = torch.cumsum(starts.to(torch.int64), 0)  # document of each global token
    index = _local_index(local_len, rank, world, parts_per_rank)
    return (starts[index].to(device), doc_of[index].to(torch.int32).to(device),
            head_docs(bounds, global_len, world * parts_per_rank), bounds)


def local_document_starts(owner: str, cu_seqlens: torch.Tensor, local_len: int, rank: int, world: int,
                          parts_per_rank: int, device: torch.device, with_states: bool):
    """(doc_start uint8 [T_local], head_doc per global part) of this rank: what the
    linear-attention schedules take, as an SPContext gives them (bit for bit), planned
    from cu_seqlens inside a custom op. Documents may be empty unless they carry states
    (`with_states`); head_doc is [] without states."""
    global_len = local_len * world
    bounds, starts = global_documents(owner, cu_seqlens, global_len, WITH_STATES if with_states else None)
    head = head_docs(bounds, global_len, world * parts_per_rank) if with_states else []
    return starts[_local_index(local_len, rank, world, parts_per_rank)].to(device), head


def final_state_grad(d_final: Optional[torch.Tensor], output_final_state: bool, q: torch.Tensor, v: torch.Tensor,
                     num_states: int) -> Optional[torch.Tensor]:
    """The final-state gradient an op's backward passes to its schedule: None when no
    final states were returned; zeros [N, H, Dk, Dv] (N = num_states) when they were but
    took no part in the loss (the same schedule runs, so every rank makes the same
    collectives)."""
    if not output_final_state:
        return None
    if d_final is None:
        d_final = q.new_zeros((num_states, q.shape[2], q.shape[3], v.shape[3]), dtype=torch.float32)
    return d_final
