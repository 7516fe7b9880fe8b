"""The per-call check that every rank of an SP group calls an op the same way.

Collectives with mismatched sizes hang or corrupt memory, and ranks that agree on
sizes but not on values (cu_seqlens, scale, decay, provider) compute a silently
wrong result. So EVERY call all-gathers one fixed-size int64 row per rank, made of

  - a code of the op and of the number of fields (so two different ops, or two
    versions of one op, never exchange rows of different meaning),
  - the small integer arguments (shapes, dtype, options),
  - digests of host values (scale as its float64 bits, cu_seqlens contents, ...),
  - digests of small device tensors (decay), computed on the device without a sync,
  - flags computed on the device (e.g. "g has a positive entry here"), which lets
    a CUDA caller validate tensor values without an extra host sync,

and every rank compares the same gathered table, so all ranks raise the same
ValueError naming the first disagreeing argument, or none does. The row is 32
int64 (256 bytes); the collective is the only cost (measured in docs/reliability.md).
A rank that never calls the op (or exits) makes the gather fail after the group's
timeout; that surfaces as a RuntimeError naming the op and the group.
"""

from __future__ import annotations

import struct
import zlib
from array import array
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import all_gather_single

ROW = 32  # int64 slots per rank: header (2) + fields
_HEADER = 2
_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


def digest_host(value) -> int:
    """A deterministic int64 of a host value (identical across processes, unlike hash())."""
    if value is None:
        payload = b"none"
    elif isinstance(value, bool):
        payload = b"bool" + bytes([value])
    elif isinstance(value, int):
        payload = b"int" + str(value).encode()
    elif isinstance(value, float):
        payload = b"float" + struct.pack("<d", value)
    elif isinstance(value, str):
        payload = b"str" + value.encode()
    elif isinstance(value, torch.Tensor):
        payload = b"tensor" + value.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()
    elif isinstance(value, (list, tuple)) and all(type(v) is int for v in value):
        payload = b"ints" + array("q", value).tobytes()  # cu_seqlens lists: one pass, no per-item digests
    elif isinstance(value, (list, tuple)):
        payload = b"seq" + b",".join(str(digest_host(v)).encode() for v in value)
    else:
        raise TypeError(f"cannot digest a {type(value).__name__}")
    return _signed(zlib.crc32(payload) << 32 | zlib.adler32(payload))


_WEIGHTS: dict = {}


def digest_device(t: Optional[torch.Tensor], device: torch.device) -> torch.Tensor:
    """An int64 scalar on `device` from the exact bits of a small float tensor (no host sync)."""
    if t is None:
        return torch.full((), digest_host(None), dtype=torch.int64, device=device)
    bits = t.detach().reshape(-1).to(device=device, dtype=torch.float64).view(torch.int64)
    n = bits.numel()
    key = (n, str(device))
    w = _WEIGHTS.get(key)
    if w is None:  # fixed odd multipliers: position-sensitive, wrap-around int64 arithmetic
        w = (torch.arange(n, dtype=torch.int64) * 2654435761 + 40503) | 1
        w = _WEIGHTS[key] = w.to(device)
    mixed = bits ^ (bits >> 29)
    return (mixed * w).sum() + n * 1000003


def verify_group_consistency(op: str, group, signature: Sequence[int], names: Sequence[str],
                             device: torch.device, host_values: Sequence[Tuple[str, object]] = (),
                             device_values: Sequence[Tuple[str, Optional[torch.Tensor]]] = (),
                             flags: Sequence[Tuple[str, torch.Tensor]] = ()):
    """Raises the same ValueError on every rank of `group` when the ranks disagree.

    signature/names: small ints and what they are; host_values: (name, value) pairs
    compared by digest; device_values: (name, small tensor) compared bit-exactly by
    digest; flags: (message, bool/int device scalar) raised if any rank sets it.
    """
    fields = len(signature) + len(host_values) + len(device_values) + len(flags)
    if fields + _HEADER > ROW:
        raise AssertionError(f"{op}: {fields} consistency fields exceed the row of {ROW}")
    host = [digest_host(op), fields, *(int(x) for x in signature),
            *(digest_host(v) for _, v in host_values)]
    world = dist.get_world_size(group)
    mine, gathered, staging = _buffers(device, world)
    staging.zero_()
    staging[:len(host)] = torch.tensor(host, dtype=torch.int64)
    # absent device values are digested on the host (no kernel); present ones and the
    # flags are written into the row with one stack + copy
    for i, (_, t) in enumerate(device_values):
        if t is None:
            staging[len(host) + i] = digest_host(None)
    mine.copy_(staging, non_blocking=True)
    extra = [(len(host) + i, digest_device(t, device)) for i, (_, t) in enumerate(device_values) if t is not None]
    extra += [(len(host) + len(device_values) + i, f.to(device=device, dtype=torch.int64).reshape(()))
              for i, (_, f) in enumerate(flags)]
    if extra:
        first = extra[0][0]
        if [slot for slot, _ in extra] == list(range(first, first + len(extra))):
            mine[first:first + len(extra)] = torch.stack([x for _, x in extra])
        else:
            for slot, x in extra:
                mine[slot] = x
    try:
        all_gather_single(gathered, mine, group=group)
        # the one host sync of the check: every rank must know the verdict before the op's
        # own collectives, whose sizes may be what the ranks disagree on
        rows = gathered.view(world, ROW).tolist()
    except RuntimeError as e:
        raise RuntimeError(
            f"{op}: the cross-rank consistency check over process group {_group_label(group)} failed "
            f"(did a rank skip this call, exit, or time out?): {e}") from e
    flag_start = len(host) + len(device_values)
    if all(row == rows[0] for row in rows) and not any(rows[0][flag_start:flag_start + len(flags)]):
        return  # the common case: every rank sent the same row and raised no flag
    _compare(op, torch.tensor(rows, dtype=torch.int64),
             list(names) + [f"{n}" for n, _ in host_values] + [f"{n}" for n, _ in device_values],
             len(signature), flag_start, [m for m, _ in flags])


_BUFFERS: dict = {}


def _buffers(device: torch.device, world: int):
    """This rank's row, the gathered table and a host staging row, reused across calls:
    each check ends with a host sync, so no call reuses a buffer still in flight."""
    key = (str(device), world)
    hit = _BUFFERS.get(key)
    if hit is None:
        on_gpu = device.type != "cpu"
        staging = torch.zeros(ROW, dtype=torch.int64, pin_memory=on_gpu and torch.cuda.is_available())
        mine = staging if not on_gpu else torch.zeros(ROW, dtype=torch.int64, device=device)
        hit = _BUFFERS[key] = (mine, torch.empty(world * ROW, dtype=torch.int64, device=device), staging)
    return hit


_FAILED = -1  # the "fields" slot of a rank whose own argument checks failed


def group_device(group, hint=None) -> torch.device:
    """Where the check's tensor lives: the group's device (CUDA for NCCL)."""
    if isinstance(hint, torch.Tensor) and hint.device.type in ("cpu", "cuda"):
        if hint.device.type == "cuda" or dist.get_backend(group) == "gloo":
            return hint.device
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def usable_group(group) -> bool:
    try:
        return (isinstance(group, dist.ProcessGroup) and dist.is_initialized()
                and dist.get_rank(group) >= 0 and dist.get_world_size(group) > 1)
    except Exception:  # noqa: BLE001 - an unusable group is reported by the argument checks
        return False


def report_local_failure(op: str, group, hint=None):
    """This rank's arguments failed its own checks: take part in the check's collective
    with a failure row, so the other ranks raise too instead of waiting in a collective
    this rank never reaches. The caller re-raises its own error afterwards."""
    if not usable_group(group):
        return
    device = group_device(group, hint)
    mine = torch.zeros(ROW, dtype=torch.int64)
    mine[0], mine[1] = digest_host(op), _FAILED
    mine = mine.to(device)
    gathered = torch.empty(dist.get_world_size(group) * ROW, dtype=torch.int64, device=device)
    try:
        all_gather_single(gathered, mine, group=group)
    except RuntimeError:
        pass  # the caller's own error is the one to report


def _group_label(group) -> str:
    try:
        name = dist.get_process_group_ranks(group)
        return f"'{getattr(group, 'group_name', '?')}' (global ranks {name})"
    except Exception:  # noqa: BLE001 - only used to word an error
        return repr(group)


def _compare(op: str, table: torch.Tensor, names, n_ints: int, flag_start: int, flag_messages):
    failed = [r for r, x in enumerate(table[:, 1].tolist()) if x == _FAILED]
    if failed:
        raise ValueError(
            f"{op}: rank(s) {failed} of `group` rejected their arguments (their error names the argument); "
            "every rank of the sequence-parallel group must pass valid, matching arguments")
    if len(set(table[:, 0].tolist())) != 1 or len(set(table[:, 1].tolist())) != 1:
        raise ValueError(
            f"{op}: ranks of `group` are calling different lasp2 ops (or lasp2 versions) at the same "
            "point; every rank of the sequence-parallel group must make the same calls in the same order")
    for column, name in enumerate(names):
        values = table[:, _HEADER + column].tolist()
        if len(set(values)) != 1:
            shown = values if column < n_ints else "differing digests"
            raise ValueError(
                f"{op}: ranks of `group` disagree on {name}: {shown} (rank order). Every rank of the "
                "sequence-parallel group must call with the same shapes, dtype, options and small arguments.")
    for i, message in enumerate(flag_messages):
        raised = [r for r, x in enumerate(table[:, flag_start + i].tolist()) if x]
        if raised:
            raise ValueError(f"{op}: {message} (on rank(s) {raised} of `group`)")
