"""The per-call check that every rank of an SP group calls an op the same way.

Collectives with mismatched sizes hang or corrupt memory, and ranks that agree on
sizes but not on values (cu_seqlens, scale, decay, provider) compute a silently
wrong result. So EVERY call all-gathers one fixed-size int64 row per rank, made of

  - a header: a code of the op, the number of fields, and the check's mode,
  - SIZE fields (`signature`): the small integers that set the sizes and kinds of the
    op's collectives (batch, local length, heads, head dims, dtype, split, provider, ...),
  - VALUE fields: digests of host values (scale as its float64 bits, cu_seqlens
    contents, ...), digests of small device tensors (decay) and flags computed on the
    device (e.g. "g has a positive entry here"), none of which needs a host sync,

and every rank compares the same gathered table (docs/reliability.md, "Guaranteed
across the ranks of a group"). Two modes (LASP2_CONSISTENCY_CHECK, alike on every rank):

* auto (the default): one C++ call (csrc/torch/group_check.h, GroupCheck.exchange)
  sends the row and compares the table on the host, at the call, before the op's
  collectives: sizes, options and host values. Device values (decay bits, positive
  CUDA gates) are computed on the op's stream into a ring of DEPTH entries
  (GroupCheck.stage) and sent DEPTH calls later on the group, or at the backward of
  the call's outputs (a hook, before the op's backward), whichever comes first: the
  host then waits only for GPU work DEPTH calls old, never for the op's queue, and
  every rank raises the same ValueError there. On CPU groups they go with their own
  call's row (no queue to wait for). Meanwhile the call's outputs are never a silent
  wrong answer: the exchange ARMS the staged values for the op that follows, whose
  LASP-2 AllGather carries them and whose outputs become NaN on every rank at once when
  they fail (csrc/core/include/lasp2/call_check.h; no host sync).
* sync (and auto under torch.compile / CUDA-graph capture): the Python check reads the
  whole table, device values included, before the op's collectives. Compiled calls over
  a group run the check inside their custom op's real kernel instead (the delta-rule
  ops always, linear_attention under torch.compile: lasp2/ops/_library.py), in auto
  with the C++ exchange, the device values compared at the call (lag=False).

A rank that never calls the op (or exits) makes the gather fail after the group's
timeout; that surfaces as a RuntimeError naming the op and the group.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from array import array
from collections import deque
from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import all_gather_single
from lasp2.distributed.communicator import check_group
from lasp2.ops._checks import DTYPE_CODES, positive_flag

ROW = 32  # int64 slots per rank: header (3) + fields
_HEADER = 3  # op code, number of fields (or _FAILED), mode + 2 * number of size fields
MODES = ("sync", "auto")  # slot 2 of the header holds the index (mod 2)
_SYNC, _AUTO = 0, 1
_FAILED = -1  # the "fields" slot of a rank whose own argument checks failed
_MASK64 = (1 << 64) - 1

MODE = os.environ.get("LASP2_CONSISTENCY_CHECK", "auto")
if MODE not in MODES:
    raise ValueError(f"LASP2_CONSISTENCY_CHECK must be one of {MODES}, got {MODE!r}")
# "auto": device values (decay bits, positive gates) take LAGGED slots of a row; a call's
# are sent DEPTH calls later (or at the backward of its outputs), so the host may run
# DEPTH calls ahead of the GPU. A group's GroupCheck takes DEPTH when it is made.
LAGGED = 4
DEPTH = 4
# LAG_ON_CPU applies the lag to CPU groups too (tests; on the CPU the values are otherwise
# compared at their own call)
LAG_ON_CPU = False
# counters for tests and benchmarks: host reads of a gathered table (one per exchange)
STATS = {"sync": 0}
# "auto": exchanges made by the backward of a call's outputs (its device values unsent till then)
LAGGED_SETTLES = [0]
# CUDA, "sync": run the check on a side stream beside the op (0: on the op's stream)
SIDE_STREAM = os.environ.get("LASP2_CONSISTENCY_SIDE_STREAM", "1") != "0"
_SETTLE_HEAD = 5  # a settling exchange's head: op code, 0, mode, entries sent, first sequence number


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= 1 << 63 else x


class Digest(int):
    """A host value's digest_host, taken earlier (e.g. while torch.compile traced the
    call): a row slot holds it as it is."""


def digest_host(value) -> int:
    """A deterministic int64 of a host value (identical across processes, unlike hash())."""
    if type(value) is Digest:
        return int(value)
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


def tensor_bits_digest(x: Optional[torch.Tensor]):
    """A host digest of a tensor's values, bit for bit (None for None): for a state every
    rank must pass alike (`initial_state`), compared as a host value of the cross-rank
    check. Two position-weighted sums of the raw bits, reduced on the tensor's device (a
    CUDA tensor's read waits for its stream: only calls that pass such a tensor pay it)."""
    if x is None:
        return None
    flat = x.detach().contiguous().view(-1)
    bits = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[flat.element_size()])
    bits = bits.to(torch.int64)
    index = torch.arange(bits.numel(), device=bits.device, dtype=torch.int64)
    # int64 products wrap: still a fixed function of the bits, the same on every rank
    sums = torch.stack(((bits * (2 * index + 1)).sum(), ((bits ^ (index * 0x5851F42D4C957F2D)) * 0x2545F4914F6CDD1D).sum()))
    return [*map(int, sums.tolist()), *x.shape, DTYPE_CODES.get(x.dtype, -1)]


_TENSOR_DIGEST: list = [None, -1, 0]  # the last tensor digested (kept alive, so its id stays its own), version, digest
_OP_CODES: dict = {}
_SCALAR_DIGESTS: dict = {}  # (type, value) -> digest of the scalars calls pass again and again (scale, layout)
_MEMO_TYPES = (type(None), bool, int, float, str)


def _digest_cached(value) -> int:
    """digest_host, remembering the last tensor (an SPContext's cu_seqlens is passed to
    every layer of a step: digest it once) and the scalars seen (a call's scale, layout
    and options repeat at every layer)."""
    kind = type(value)
    if kind in _MEMO_TYPES:
        if kind is float and value == 0.0:  # 0.0 and -0.0 are one dict key but two digests
            return digest_host(value)
        key = (kind, value)
        digest = _SCALAR_DIGESTS.get(key)
        if digest is None:
            if len(_SCALAR_DIGESTS) > 4096:  # a caller passing ever new values: start afresh
                _SCALAR_DIGESTS.clear()
            digest = _SCALAR_DIGESTS[key] = digest_host(value)
        return digest
    if isinstance(value, torch.Tensor):
        if torch.is_inference(value):
            # no version counter to key the memo on (reading it raised, so every module over a
            # group failed under torch.inference_mode with packed documents): digest each time
            return digest_host(value)
        held, version, digest = _TENSOR_DIGEST
        if held is value and version == value._version:
            return digest
        digest = digest_host(value)
        _TENSOR_DIGEST[:] = [value, value._version, digest]
        return digest
    return digest_host(value)


def _op_code(op: str) -> int:
    code = _OP_CODES.get(op)
    if code is None:
        code = _OP_CODES[op] = digest_host(op)
    return code


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


class _Layout:
    """What the columns of one call's row mean (to word an error); the names are only
    put together when an error is worded."""

    __slots__ = ("op", "_names", "_host_values", "_device_values", "n_ints", "flag_start", "flag_messages")

    def __init__(self, op, names, host_values, device_values, flags):
        self.op, self._names, self._host_values, self._device_values = op, names, host_values, device_values
        self.n_ints = len(names)
        self.flag_start = _HEADER + len(names) + len(host_values) + len(device_values)
        self.flag_messages = [m for m, _ in flags]

    @property
    def names(self):
        return list(self._names) + [n for n, _ in self._host_values] + [n for n, _ in self._device_values]


class Verdict:
    """The outcome of one call's check: `seal(*outputs)` returns the op's outputs (with a
    backward hook where the call's device values are still to be compared)."""

    __slots__ = ()

    def seal(self, *outputs):
        return outputs[0] if len(outputs) == 1 else outputs


NO_CHECK = Verdict()  # one device, or a check with nothing left to compare


class _Staged:
    """The device values one call staged into a ring entry of its group's GroupCheck:
    their names and kinds (the values stay on the device until an exchange sends them)."""

    __slots__ = ("op", "entries", "check", "seq", "call", "lost")

    def __init__(self, op, entries, check):
        self.op, self.entries, self.check = op, entries, check  # entries: [(name or message, kind)]
        self.seq, self.call, self.lost = -1, -1, False  # ring sequence number, index of the call


class _GroupState:
    """Per group: the staged entries not sent yet (oldest first) and reused buffers."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.pending: "deque[_Staged]" = deque()
        self.calls = 0  # "auto" calls checked on the group
        self.buffers: dict = {}
        self.checks: dict = {}  # device -> its GroupCheck ("auto")
        self.depth = DEPTH  # the ring depth of its GroupChecks (taken when they are made)
        self.rows: dict = {}  # (device, world, host part) -> this rank's row on the device ("sync")


_STATES: dict = {}


def _state(group) -> _GroupState:
    st = _STATES.get(id(group))
    if st is None or st.group is not group:
        st = _STATES[id(group)] = _GroupState(group)
    return st


def verify_group_consistency(op: str, group, signature: Sequence[int], names: Sequence[str],
                             device: torch.device, host_values: Sequence[Tuple[str, object]] = (),
                             device_values: Sequence[Tuple[str, Optional[torch.Tensor]]] = (),
                             flags: Sequence[Tuple[str, torch.Tensor]] = (), *,
                             positive: Sequence[Tuple[str, Optional[torch.Tensor]]] = (),
                             lag: bool = True) -> Verdict:
    """Checks that every rank of `group` calls `op` the same way; returns a Verdict whose
    `seal(*outputs)` the caller applies to the op's outputs.

    signature/names: the size fields (small ints) and what they are; host_values:
    (name, value) pairs compared by digest; device_values: (name, small tensor) compared
    bit-exactly by digest; flags: (message, bool device scalar) raised if any rank sets it;
    positive: (message, tensor or None) raised if any rank's tensor holds a positive entry
    (device tensors only: CPU tensors are checked on the host by the op).
    lag=False: the device values are compared at this call too (a custom op's real
    kernel, whose outputs take no backward hook): the sync check where they would lag.
    """
    st = _state(group)
    n_values = len(device_values) + len(positive) + len(flags)
    lags = n_values and (device.type == "cuda" or LAG_ON_CPU)
    if MODE == "auto" and _fast_ok(device, n_values) and (lag or not lags):
        return _check_fast(st, op, signature, names, device, host_values, device_values, flags, positive)
    return _check_sync(st, op, signature, names, device, host_values, device_values, flags, positive)


def settle_consistency_checks(group=None) -> None:
    """Compares now the device values (`decay` digests, positive-gate flags) of the last
    calls on `group` (every group used so far when None) that still wait in the check's
    ring: with the default check they are compared up to DEPTH calls later or at the
    backward of their outputs, so a forward-only run (evaluation, inference) should call
    this at its end. Raises the same ValueError on every rank if they disagree. A
    collective when something waits: call it on every rank of the group at the same point
    (every rank made the same calls, so they agree on what waits)."""
    check_group("lasp2.settle_consistency_checks", group)
    states = [_state(group)] if group is not None else list(_STATES.values())
    for st in states:
        if st.pending:
            _settle(st, st.pending[-1], at_backward=False)


_KIND_DIGEST, _KIND_MAX = 0, 1  # csrc/torch/group_check.h, GroupCheck::Kind


def _fast_ok(device: torch.device, n_device_values: int) -> bool:
    """The C++ check ("auto") handles this call: eager (not compiling, not capturing a
    CUDA graph) and room for its device values in the lagged slots."""
    if n_device_values > LAGGED or torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return device.type == "cpu"


def _group_check(st: "_GroupState", device: torch.device):
    gc = st.checks.get(device)
    if gc is None:
        from lasp2._extension import _C

        gc = st.checks[device] = _C.GroupCheck(st.group, device, ROW, LAGGED, DEPTH)
        st.depth = gc.depth
    return gc


def _check_fast(st, op, signature, names, device, host_values, device_values, flags, positive) -> Verdict:
    """One C++ exchange: the host part of this call's row is compared now. Its device
    values are staged into the ring and sent DEPTH calls later on the group (on CUDA, or
    LAG_ON_CPU), so an exchange waits for GPU work that old only; on the CPU they go with
    this call's row."""
    gc = _group_check(st, device)
    pending = st.pending
    if pending and pending[0].check is not gc:  # values waiting in another device's ring
        _settle(st, pending[-1], at_backward=False)
    token = None
    n_values = len(device_values) + len(positive) + len(flags)
    if n_values:
        values = [t for _, t in device_values]
        values += [t if t is not None and t.device.type != "cpu" else None for _, t in positive]
        values += [f for _, f in flags]
        kinds = [_KIND_DIGEST] * len(device_values) + [_KIND_MAX] * (n_values - len(device_values))
        if any(t is not None for t in values):
            token = _Staged(op, [(n, _KIND_DIGEST) for n, _ in device_values] + [(m, _KIND_MAX) for m, _ in positive]
                            + [(m, _KIND_MAX) for m, _ in flags], gc)
    lag = device.type == "cuda" or LAG_ON_CPU
    sends = ()
    if token is not None and not lag:
        token.seq = gc.stage(values, kinds)  # CPU: computed at once, sent with this row
        sends = (token,)
    elif pending and (st.calls - pending[0].call >= gc.depth or len(pending) >= gc.depth):
        sends = (pending.popleft(),)  # the oldest, DEPTH calls back (each call stages at most one)
    st.calls += 1
    head = [_op_code(op), len(signature) + len(host_values) + n_values, _AUTO + 2 * len(signature),
            *map(int, signature), *[_digest_cached(v) for _, v in host_values],
            len(sends), sends[0].seq if sends else -1]
    if len(head) > ROW - LAGGED:
        raise AssertionError(f"{op}: {len(head)} consistency slots exceed the row's {ROW - LAGGED}")
    stage_now = token is not None and lag
    col, seq = _exchange(op, st, gc, head, sends, (values, kinds) if stage_now else None)
    if col >= 0:
        rows = gc.table().tolist()
        layout = _Layout(op, names, host_values, _LAG_FIELDS, ())
        _drop_pending(st, sends)
        raise ValueError(_fast_message(rows, layout, len(head), sends, current=token is not None and not lag))
    if stage_now:
        token.seq, token.call = seq, st.calls - 1
        pending.append(token)
        return _LaggedVerdict(st, token)
    return NO_CHECK


# the fast row's two columns after the host values (to word an error)
_LAG_FIELDS = (("the number of lagged device-value entries sent", None), ("their sequence number", None))


def _exchange(op, st, gc, head, sends, stage=None):
    """gc.exchange (with `stage` = (values, kinds): exchange_then_stage, the call's own values
    staged once its row agreed) -> (first differing column or -1, staged sequence number or -1)."""
    STATS["sync"] += 1
    max_slots = []
    first = ROW - LAGGED * len(sends)
    for i, token in enumerate(sends):
        max_slots += [first + i * LAGGED + j for j, (_, kind) in enumerate(token.entries) if kind == _KIND_MAX]
    try:
        if stage is not None:
            return gc.exchange_then_stage(head, [t.seq for t in sends], max_slots, *stage)
        return gc.exchange(head, [t.seq for t in sends], max_slots), -1
    except RuntimeError as e:
        # never compared: the sent entries and every one still waiting (their outputs'
        # backward must not run); the ring's slots are free again, so later calls on the
        # group stage as on a fresh ring instead of failing on entries nobody will send
        _drop_pending(st, sends)
        gc.discard()
        raise RuntimeError(
            f"{op}: the cross-rank consistency check over process group {_group_label(st.group)} failed "
            f"(did a rank skip this call, exit, or time out?): {e}") from e


def _drop_pending(st, also=()):
    """Every rank raised at the same exchange: the entries still waiting (and those it
    sent) are not compared any more. Their outputs' backward raises instead (`lost`), so
    no gradient of a call with uncompared values is computed."""
    for token in (*also, *st.pending):
        token.lost = True
    if st.pending:
        st.pending[0].check.discard()
    st.pending.clear()


def _settle(st, token: _Staged, at_backward: bool = True):
    """Sends every waiting entry (oldest first, several per exchange) if `token` is among
    them: at the backward of its outputs, before the op's backward (every rank reaches
    this hook at the same point of its backward), or before a call checked another way."""
    if token not in st.pending:
        return  # a later call on the group sent it
    per_exchange = (ROW - _SETTLE_HEAD) // LAGGED
    while st.pending:
        sends = [st.pending.popleft() for _ in range(min(per_exchange, len(st.pending)))]
        LAGGED_SETTLES[0] += 1
        col, _ = _exchange(token.op, st, token.check,
                           [_op_code("lasp2.settle"), 0, _AUTO, len(sends), sends[0].seq], sends)
        if col >= 0:
            _drop_pending(st, sends)  # every rank raises here: nothing left is compared any more
            raise ValueError(_fast_message(token.check.table().tolist(), None, _SETTLE_HEAD, sends, current=False,
                                           backward=at_backward))


class _LaggedVerdict(Verdict):
    """A call whose device values wait in the ring: the backward of its outputs sends
    them (if no later call on the group did) before the op's backward runs."""

    __slots__ = ("_st", "_token")

    def __init__(self, st, token):
        self._st, self._token = st, token

    def _hook(self, grad):
        if self._token.lost:
            raise ValueError(
                f"{self._token.op}: the device values of this call (decay, gate signs) were never compared across "
                "the ranks (a later call on the group raised first), so its backward does not run; raised on every "
                "rank")
        _settle(self._st, self._token)
        return grad

    def seal(self, *outputs):
        if torch.is_grad_enabled():
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._hook)
        return outputs[0] if len(outputs) == 1 else outputs


def _fast_message(rows, layout: Optional[_Layout], head_len: int, sends, current: bool,
                  backward: bool = False) -> str:
    if any(row[1] == _FAILED for row in rows):  # a peer's own argument checks failed
        return _failure_message(layout.op if layout is not None else sends[0].op if sends else "lasp2", rows)
    if layout is not None and any(row[:head_len] != rows[0][:head_len] for row in rows):
        return _disagreement(rows, layout)
    where = ""
    if backward:
        where = " (found at the backward of its outputs, before the op's backward ran; raised on every rank)"
    elif not current:
        where = (f" (values of an earlier call on this group, up to {DEPTH} calls back, compared at this call "
                 "without waiting for the GPU; raised on every rank)")
    first = ROW - LAGGED * len(sends)
    for i, token in enumerate(sends):
        for j, (name, kind) in enumerate(token.entries):
            column = [row[first + i * LAGGED + j] for row in rows]
            if kind == _KIND_MAX:
                raised = [r for r, bits in enumerate(column) if struct.unpack("<d", struct.pack("<q", bits))[0] > 0]
                if raised:
                    return f"{token.op}: {name} (on rank(s) {raised} of `group`){where}"
            elif len(set(column)) != 1:
                return (f"{token.op}: ranks of `group` disagree on {name}: differing digests (rank order){where}. "
                        "Every rank of the sequence-parallel group must call with the same shapes, dtype, options "
                        "and small arguments.")
    return ("lasp2: ranks of `group` sent different consistency rows (different lasp2 versions or "
            "LASP2_CONSISTENCY_CHECK modes?)")


def _check_sync(st, op, signature, names, device, host_values, device_values, flags, positive) -> Verdict:
    """The Python check: every value, device ones included, read at the call."""
    _disarm()  # values an earlier "auto" call armed are not this call's (its op may never have taken them)
    if st.pending:  # values of earlier "auto" calls wait: send them first
        _settle(st, st.pending[-1], at_backward=False)
    flags = list(flags) + [(m, f) for m, t in positive if (f := positive_flag(t)) is not None]
    fields = len(signature) + len(host_values) + len(device_values) + len(flags)
    if fields + _HEADER > ROW:
        raise AssertionError(f"{op}: {fields} consistency fields exceed the row of {ROW}")
    # the device-value and flag slots are written on the device below (0 here); an
    # absent device value is digested on the host
    row = [_op_code(op), fields, _SYNC + 2 * len(signature), *map(int, signature),
           *(_digest_cached(v) for _, v in host_values),
           *(0 if t is not None else digest_host(None) for _, t in device_values)]
    row += [0] * (ROW - len(row))
    layout = _Layout(op, names, host_values, device_values, flags)
    side = _side_stream(device, device_values, flags)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        mine, gathered, table = _row_buffers(st, device, st.world, row)
        slot = _HEADER + len(signature) + len(host_values)
        for _, t in device_values:
            if t is not None:
                mine[slot].copy_(digest_device(t, device))
            slot += 1
        for _, f in flags:  # rank + 1 where set: a flag on every rank still makes the rows differ
            torch.mul(f.reshape(()), st.rank + 1, out=mine[slot])
            slot += 1
        _gather(op, st.group, gathered, mine)
        rows = table.tolist()  # the host sync (of the side stream, on CUDA)
    STATS["sync"] += 1
    if _agree(rows, layout):
        return NO_CHECK
    raise ValueError(_disagreement(rows, layout))


def _disarm():
    from lasp2._extension import _C

    _C.GroupCheck.disarm_call_check()


_SIDE: dict = {}


def _side_stream(device: torch.device, device_values, flags):
    """CUDA: the stream the synchronous check runs on, beside the op's kernels instead of
    between them. It waits for the current stream only when the row reads tensors made
    there (device values, flags), so a row of host values alone is compared as soon as
    it is sent, whatever the queue ahead of it."""
    if not SIDE_STREAM or device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return None
    side = _SIDE.get(device.index)
    if side is None:
        side = _SIDE[device.index] = torch.cuda.Stream(device)
    tensors = [t for _, t in device_values if t is not None] + [f for _, f in flags]
    if tensors:
        side.wait_stream(torch.cuda.current_stream(device))
        for t in tensors:
            t.record_stream(side)  # made on the current stream, read on the side one
    return side


def _row_buffers(st: _GroupState, device: torch.device, world: int, row: list):
    """This rank's row on the device (one per distinct host part, so alternating ops copy
    nothing either) and the gathered table, reused across calls: every later write to
    them is ordered after the collective that read them (the host read the table)."""
    key = (str(device), world)
    bufs = st.buffers.get(key)
    if bufs is None:
        gathered = torch.empty(world * ROW, dtype=torch.int64, device=device)
        bufs = st.buffers[key] = (gathered, gathered.view(world, ROW))
    gathered, table = bufs
    row_key = (key, tuple(row))
    mine = st.rows.get(row_key)
    if mine is None:
        staging = torch.tensor(row, dtype=torch.int64)
        if device.type == "cuda":
            staging = staging.pin_memory()  # the caching host allocator keeps it until the copy ran
        mine = st.rows[row_key] = torch.empty(ROW, dtype=torch.int64, device=device)
        mine.copy_(staging, non_blocking=True)
        if len(st.rows) > 32:
            st.rows.pop(next(iter(st.rows)))
    return mine, gathered, table


def _gather(op, group, gathered, mine):
    try:
        all_gather_single(gathered, mine, group=group)
    except RuntimeError as e:
        raise RuntimeError(
            f"{op}: the cross-rank consistency check over process group {_group_label(group)} failed "
            f"(did a rank skip this call, exit, or time out?): {e}") from e


def _agree(rows, layout: _Layout) -> bool:
    return (all(row == rows[0] for row in rows)
            and not any(rows[0][layout.flag_start:layout.flag_start + len(layout.flag_messages)]))


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
    st = _state(group)
    _drop_pending(st)  # every rank raises at this call (the peers drop theirs on seeing this row)
    device = group_device(group, hint)
    mine = torch.zeros(ROW, dtype=torch.int64)
    mine[0], mine[1] = _op_code(op), _FAILED
    mine = mine.to(device)
    gathered = torch.empty(dist.get_world_size(group) * ROW, dtype=torch.int64, device=device)
    try:
        all_gather_single(gathered, mine, group=group)
    except RuntimeError:
        return  # the caller's own error is the one to report
    STATS["sync"] += 1



@contextlib.contextmanager
def raised_on_every_rank(op: str, group, hint=None):
    """Runs this rank's own argument checks: a ValueError / TypeError from them is
    reported to the group (report_local_failure: one all-gather of a failure row, none
    when the checks pass) and re-raised, so the peers raise at their next check instead
    of waiting. For checks outside the ops' traced paths (modules, sequence helpers)."""
    try:
        yield
    except (ValueError, TypeError):
        report_local_failure(op, group, hint)
        raise

def _failure_message(op, rows) -> str:
    failed = [r for r, row in enumerate(rows) if row[1] == _FAILED]
    return (f"{op}: rank(s) {failed} of `group` rejected their arguments (their error names the argument); "
            "every rank of the sequence-parallel group must pass valid, matching arguments")


def _group_label(group) -> str:
    try:
        name = dist.get_process_group_ranks(group)
        return f"'{getattr(group, 'group_name', '?')}' (global ranks {name})"
    except Exception:  # noqa: BLE001 - only used to word an error
        return repr(group)


def _disagreement(rows, layout: _Layout) -> str:
    """The error message for a table whose rows differ (or raise a flag)."""
    op = layout.op
    if any(row[1] == _FAILED for row in rows):
        return _failure_message(op, rows)
    if len({row[0] for row in rows}) != 1 or len({row[1] for row in rows}) != 1:
        return (f"{op}: ranks of `group` are calling different lasp2 ops (or lasp2 versions) at the same "
                "point; every rank of the sequence-parallel group must make the same calls in the same order")
    for column, name in enumerate(layout.names):
        values = [row[_HEADER + column] for row in rows]
        if len(set(values)) != 1:
            shown = values if column < layout.n_ints else "differing digests"
            return (f"{op}: ranks of `group` disagree on {name}: {shown} (rank order). Every rank of the "
                    "sequence-parallel group must call with the same shapes, dtype, options and small arguments.")
    for i, message in enumerate(layout.flag_messages):
        raised = [r for r, row in enumerate(rows) if row[layout.flag_start + i]]
        if raised:
            return f"{op}: {message} (on rank(s) {raised} of `group`)"
    modes = [MODES[row[2] % 2] for row in rows]
    return (f"{op}: ranks of `group` used different consistency-check modes {modes} (rank order): set "
            "LASP2_CONSISTENCY_CHECK alike on every rank")
