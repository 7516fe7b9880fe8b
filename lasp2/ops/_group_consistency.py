"""One cheap check that every rank of an SP group calls with matching shapes.

A collective with mismatched sizes can hang or corrupt memory, so the first call
for each (group, signature) all-gathers a few integers and raises the same clear
error on every rank if they differ. Later calls with that signature skip it.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import all_gather_single

_VERIFIED: dict = {}


def verify_group_consistency(op: str, group, signature: Sequence[int], names: Sequence[str],
                             device: torch.device):
    key = (id(group), tuple(signature))
    entry = _VERIFIED.get(key)
    if entry is not None and entry is group:
        return
    mine = torch.tensor(list(signature), dtype=torch.int64, device=device)
    world = dist.get_world_size(group)
    gathered = torch.empty(world * mine.numel(), dtype=torch.int64, device=device)
    all_gather_single(gathered, mine, group=group)
    table = gathered.view(world, -1).cpu()
    for column, name in enumerate(names):
        values = table[:, column].tolist()
        if len(set(values)) != 1:
            raise ValueError(
                f"{op}: ranks of `group` disagree on {name}: {values} (rank order). Every rank of "
                "the sequence-parallel group must call with the same shapes, dtype and options.")
    _VERIFIED[key] = group
