"""Communicators for the caller's sequence-parallel group.

lasp2 never creates process groups: the group is whatever the caller passes
(e.g. Megatron's context-parallel group). Two implementations of the core's
communicator interface:
  "torch": the group itself (gloo on CPU, NCCL on GPU through ProcessGroupNCCL,
           which already runs collectives on its own stream);
  "nccl":  a native NCCL communicator for the same ranks, made once per group from
           a unique id broadcast over the group, with its own stream and events.
LASP2_COMMUNICATOR=torch|nccl picks one for CUDA tensors (default "torch" until
the native path has been run on several GPUs; see docs/). Communicators are
cached per (group, device, kind) and keep their group alive.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from lasp2._extension import _C

_COMMUNICATORS: dict = {}
KINDS = ("torch", "nccl")


def check_group(owner: str, group) -> None:
    """Raises ValueError naming `group` unless it is None or a process group holding this process."""
    if group is None:
        return
    if not isinstance(group, dist.ProcessGroup):
        raise ValueError(f"{owner}: `group` must be a torch.distributed ProcessGroup or None, "
                         f"got {type(group).__name__}")
    if not dist.is_initialized():
        raise ValueError(f"{owner}: `group` was given but torch.distributed is not initialized")
    if dist.get_rank(group) < 0:
        raise ValueError(f"{owner}: `group` does not contain this process (dist.get_rank(group) < 0)")


def group_rank_and_size(group: Optional[dist.ProcessGroup]) -> Tuple[int, int]:
    """(rank in group, group size); (0, 1) for no group."""
    if group is None:
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def default_kind(device: torch.device) -> str:
    kind = os.environ.get("LASP2_COMMUNICATOR", "torch")
    if kind not in KINDS:
        raise ValueError(f"LASP2_COMMUNICATOR must be one of {KINDS}, got {kind!r}")
    if kind == "nccl" and (device.type != "cuda" or not _C.has_nccl_communicator()):
        return "torch"
    return kind


def _native_nccl(group: dist.ProcessGroup, device: torch.device):
    """A NcclCommunicator over the ranks of `group` (collective: all ranks call)."""
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    id_bytes = [bytes(_C.nccl_unique_id()) if rank == 0 else None]
    dist.broadcast_object_list(id_bytes, group_src=0, group=group, device=device)
    return _C.NcclCommunicator(id_bytes[0], size, rank, device.index, timeout_seconds=_group_timeout(group, device))


def _group_timeout(group: dist.ProcessGroup, device: torch.device) -> float:
    """The group's collective timeout in seconds (the native communicator's watchdog
    honours it); torch's default when the group does not say."""
    try:
        return group._get_backend(device).options._timeout.total_seconds()
    except (AttributeError, RuntimeError):
        return dist.default_pg_timeout.total_seconds()


def get_communicator(group: Optional[dist.ProcessGroup], device: torch.device, kind: Optional[str] = None):
    """The lasp2 communicator for `group` on `device` (None for no group or size 1)."""
    if group is None or dist.get_world_size(group) == 1:
        return None
    kind = kind or default_kind(device)
    key = (id(group), device.type, device.index, kind)
    entry = _COMMUNICATORS.get(key)
    if entry is None or entry[0] is not group:
        comm = _native_nccl(group, device) if kind == "nccl" else _C.ProcessGroupCommunicator(group, device)
        entry = (group, comm)
        _COMMUNICATORS[key] = entry
    return entry[1]
