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

and every rank compares the same gathered table.

Three modes (docs/reliability.md, "Guaranteed across the ranks of a group"):

* auto (the default): one C++ call (csrc/torch/group_check.h, GroupCheck.exchange)
  sends the row and compares the table on the host, at the call, for everything but
  device values; those (decay bits, positive CUDA gates) are computed on the op's
  stream into the row's last LAGGED slots (GroupCheck.stage) and sent with the NEXT
  exchange on the group: the next call, or the backward of this call's outputs (a
  hook), so the host never waits for the GPU's queue; every rank raises the same
  ValueError there. On CPU groups they go with their own call's row.
* synchronous (LASP2_CONSISTENCY_CHECK=sync; auto under torch.compile / CUDA-graph
  capture): the host reads the table before the op's collectives, and every rank
  raises the same ValueError naming the first disagreeing argument, or none does.
* deferred (CUDA): the host does not wait for the table. The ranks keep a common
  history of the size rows of the calls on the group and predict the next call's
  size row from it (the row that followed the previous call's row last time). A rank
  whose size row is the predicted one goes asynchronous: the table is compared on
  the device, a disagreement puts NaN into every output vector (`seal`) and the table
  is copied to pinned memory; the host raises the named ValueError at the backward of those
  outputs (before the op's backward collectives) and at the next call on the group
  (before its collective), on every rank. A rank whose size row is NOT the predicted
  one (its sizes changed, or the history is too short) reads the table synchronously;
  if it finds ranks that went asynchronous at the predicted sizes, it runs the op's
  forward at those sizes on zeros (`replay`, recorded when this rank made that call)
  so their collectives complete, raises, and raises again at its next call on the
  group, in step with them. Predictions are common to all ranks because the history
  only grows by calls whose table every rank has seen agree (an asynchronous call's
  table is settled at the start of the next call on the group).

On CUDA the check runs on a side stream (`_side_stream`), beside the op's kernels.

A rank that never calls the op (or exits) makes the gather fail after the group's
timeout; that surfaces as a RuntimeError naming the op and the group.
"""

from __future__ import annotations

import contextlib
import os
import struct
import zlib
from array import array
from collections import OrderedDict
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import all_gather_single
from lasp2.ops._checks import positive_flag

ROW = 32  # int64 slots per rank: header (3) + fields
_HEADER = 3  # op code, number of fields (or _FAILED), mode (_SYNC / _ASYNC) + 2 * number of size fields
_SYNC, _ASYNC = 0, 1
_FAILED = -1  # the "fields" slot of a rank whose own argument checks failed
_MASK64 = (1 << 64) - 1

# "auto" (default): the C++ check below (_check_fast). "sync": the Python check reading
# every value at the call. "deferred" is the sync-free mode (device-side comparison,
# errors at backward / the next call); it is opt-in because on one H200 it measured
# slower than the synchronous check (docs/reliability.md, "Cost of the per-call check").
# Tests use "deferred" to run the device-style comparison on CPU tensors too. Every rank
# must use the same mode (a rank in another mode shows up as a disagreement).
MODE = os.environ.get("LASP2_CONSISTENCY_CHECK", "auto")
# "auto": the C++ check (csrc/torch/group_check.h), one call per op call: the row's host
# part is compared at the call; device values (decay bits, positive gates) are computed
# on the op's stream into the row's last LAGGED slots and sent with the NEXT exchange on
# the group (the next call, or the backward of this call's outputs), so the host never
# waits for the GPU's queue. LAG_ON_CPU applies that lag to CPU groups too (tests; on
# the CPU the values are otherwise compared at their own call).
LAGGED = 4
LAG_ON_CPU = False
# counters for tests and benchmarks: host reads of the table during a call ("sync"),
# calls left to the device ("deferred"), forward replays at peers' sizes ("replays")
STATS = {"sync": 0, "deferred": 0, "replays": 0}
# "auto": exchanges made by the backward of a call's outputs (its device values unsent till then)
LAGGED_SETTLES = [0]
# CUDA: run the check on a side stream beside the op (0: on the op's stream)
SIDE_STREAM = os.environ.get("LASP2_CONSISTENCY_SIDE_STREAM", "1") != "0"
_REPLAY_SLOTS = 32  # remembered size rows per group (LRU)


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


_TENSOR_DIGEST: list = [None, -1, 0]  # the last tensor digested (kept alive, so its id stays its own), version, digest
_OP_CODES: dict = {}


def _digest_cached(value) -> int:
    """digest_host, remembering the last tensor (an SPContext's cu_seqlens is passed to
    every layer of a step: digest it once)."""
    if isinstance(value, torch.Tensor):
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
    """The outcome of one call's check. `seal(*outputs)` returns the outputs, NaN where
    the (deferred) comparison found a disagreement, with a backward hook that raises the
    named error before the op's backward runs."""

    __slots__ = ("bad", "_table", "_event", "_world", "_layout", "_message", "_done")

    def __init__(self, bad=None, table=None, event=None, world=1, layout=None, message=None):
        self.bad, self._table, self._event, self._world, self._layout = bad, table, event, world, layout
        self._message, self._done = message, table is None

    def message(self) -> Optional[str]:
        """The named error, or None: waits for this call's table (normally long there)."""
        if not self._done:
            if self._event is not None:
                self._event.synchronize()
            rows = self._table.view(self._world, ROW).tolist()
            self._table = self._event = None
            self._done = True
            if not _agree(rows, self._layout):
                self._message = _disagreement(rows, self._layout) + (
                    " [found by the asynchronous check of an earlier call on this group, whose outputs were set "
                    "to NaN; raised on every rank]")
        return self._message

    def raise_if_bad(self):
        message = self.message()
        if message is not None:
            raise ValueError(message)

    def _hook(self, grad):
        self.raise_if_bad()
        return grad

    def seal(self, *outputs):
        """The op's outputs; if the (deferred) comparison found a disagreement, the first
        value of every output vector (last dim) is NaN, so any projection, norm or
        reduction over it is NaN; with a backward hook that raises the named error before
        the op's backward runs."""
        if self.bad is not None:
            if self._event is not None:  # CUDA: `bad` is made on the check's side stream
                torch.cuda.current_stream(self.bad.device).wait_event(self._event)
            for t in outputs:
                _poison(self.bad, t)
            if torch.is_grad_enabled():
                for t in outputs:
                    if isinstance(t, torch.Tensor) and t.requires_grad:
                        t.register_hook(self._hook)
        return outputs[0] if len(outputs) == 1 else outputs


def _poison(bad: torch.Tensor, t):
    """NaN into t[..., 0] where `bad` (a device bool scalar), in place and outside autograd
    (`.data`: an op may have saved t for its backward, which the hook stops first when
    bad). One strided column: poisoning every element would cost a full pass over the
    output, about 1% of a step on its own."""
    if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() and t.numel():
        t.data[..., :1].masked_fill_(bad, float("nan"))


NO_CHECK = Verdict()  # one device, a synchronous check that passed, or a replay


class _GroupState:
    """Per group: the common history of size rows, the pending deferred verdict, the
    replays and the reused buffers."""

    def __init__(self, group):
        self.group = group
        self.world, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.last: Optional[tuple] = None  # size row of the last call known to agree on every rank
        self.follows: dict = {}  # size row -> the size row that followed it last time
        self.replays: "OrderedDict[tuple, Callable]" = OrderedDict()
        self.pending: Optional[Verdict] = None
        self.buffers: dict = {}
        self.rows: dict = {}  # (device, world, host part) -> this rank's row on the device
        self.staged: Optional[_Staged] = None  # device values of the last call, not sent yet ("auto")

    def predicted(self) -> Optional[tuple]:
        return None if self.last is None else self.follows.get(self.last)

    def advance(self, size_row: tuple):
        if self.last is not None:
            self.follows[self.last] = size_row
            if len(self.follows) > 4 * _REPLAY_SLOTS:
                self.follows.pop(next(iter(self.follows)))
        self.last = size_row

    def remember(self, size_row: tuple, replay):
        if replay is None or size_row in self.replays:
            return
        self.replays[size_row] = _replayer(*replay)
        if len(self.replays) > _REPLAY_SLOTS:
            self.replays.popitem(last=False)

    def settle(self):
        """Raise the previous call's disagreement (every rank holds the same table)."""
        pending, self.pending = self.pending, None
        if pending is not None and pending.message() is not None:
            self.last = None
            raise ValueError(pending.message())


_STATES: dict = {}


def _state(group) -> _GroupState:
    st = _STATES.get(id(group))
    if st is None or st.group is not group:
        st = _STATES[id(group)] = _GroupState(group)
    return st


_REPLAYING = [False]


def _deferred(device: torch.device) -> bool:
    if MODE == "sync" or torch.compiler.is_compiling():
        return False
    return MODE == "deferred" and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def verify_group_consistency(op: str, group, signature: Sequence[int], names: Sequence[str],
                             device: torch.device, host_values: Sequence[Tuple[str, object]] = (),
                             device_values: Sequence[Tuple[str, Optional[torch.Tensor]]] = (),
                             flags: Sequence[Tuple[str, torch.Tensor]] = (), *,
                             replay: Optional[tuple] = None,
                             positive: Sequence[Tuple[str, Optional[torch.Tensor]]] = ()) -> Verdict:
    """Checks that every rank of `group` calls `op` the same way; returns a Verdict whose
    `seal(*outputs)` the caller applies to the op's outputs.

    signature/names: the size fields (small ints) and what they are; host_values:
    (name, value) pairs compared by digest; device_values: (name, small tensor) compared
    bit-exactly by digest; flags: (message, bool device scalar) raised if any rank sets it.
    replay: (fn, args, kwargs) that makes this call again (tensors are replaced by zeros of
    their shape); with it the call may be checked asynchronously (deferred mode), without it
    the check is synchronous.
    positive: (message, tensor or None) raised if any rank's tensor holds a positive entry
    (device tensors only: CPU tensors are checked on the host by the op).
    """
    if _REPLAYING[0]:
        return NO_CHECK  # the peers' check ran in the call being replayed
    st = _state(group)
    st.settle()
    if MODE == "auto" and _fast_ok(device, len(device_values) + len(positive) + len(flags)):
        return _check_fast(st, op, signature, names, device, host_values, device_values, flags, positive)
    if st.staged is not None:  # this call is checked the synchronous way: send the waiting values first
        _settle_lagged(st, st.staged, at_backward=False)
    flags = list(flags) + [(m, f) for m, t in positive if (f := positive_flag(t)) is not None]
    fields = len(signature) + len(host_values) + len(device_values) + len(flags)
    if fields + _HEADER > ROW:
        raise AssertionError(f"{op}: {fields} consistency fields exceed the row of {ROW}")
    size_row = (_op_code(op), fields, *map(int, signature))
    capable = replay is not None and _deferred(device)
    predicted = st.predicted()
    go_async = capable and size_row == predicted
    # the device-value and flag slots are written on the device below (0 here); an
    # absent device value is digested on the host
    row = [size_row[0], fields, (_ASYNC if go_async else _SYNC) + 2 * len(signature), *size_row[2:],
           *(_digest_cached(v) for _, v in host_values),
           *(0 if t is not None else digest_host(None) for _, t in device_values)]
    row += [0] * (ROW - len(row))
    layout = _Layout(op, names, host_values, device_values, flags)
    side = _side_stream(device, device_values, flags)
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        mine, gathered, table, first = _row_buffers(st, device, st.world, row)
        slot = _HEADER + len(signature) + len(host_values)
        for _, t in device_values:
            if t is not None:
                mine[slot].copy_(digest_device(t, device))
            slot += 1
        for _, f in flags:  # rank + 1 where set: a flag on every rank still makes the rows differ
            torch.mul(f.reshape(()), st.rank + 1, out=mine[slot])
            slot += 1
        _gather(op, group, gathered, mine)
        if go_async:
            bad = (table != first).any()
            copy, event = _host_copy(st, gathered, device)
        else:
            rows = table.tolist()  # the host sync (of the side stream, on CUDA)
    st.remember(size_row, replay)
    if go_async:
        STATS["deferred"] += 1
        if side is not None:
            bad.record_stream(torch.cuda.current_stream(device))  # the seal reads it on this stream
        st.pending = Verdict(bad, copy, event, st.world, layout)
        st.advance(size_row)
        return st.pending
    STATS["sync"] += 1
    if _agree(rows, layout):
        st.advance(size_row)
        return NO_CHECK
    _after_disagreement(st, rows, _disagreement(rows, layout))
    raise AssertionError("unreachable")


_KIND_DIGEST, _KIND_MAX = 0, 1  # csrc/torch/group_check.h, GroupCheck::Kind


class _Staged:
    """The device values one call staged into the lagged slots of its group's row (their
    names and kinds; the values stay on the device until the next exchange sends them)."""

    __slots__ = ("op", "entries", "check")

    def __init__(self, op, entries, check):
        self.op, self.entries, self.check = op, entries, check  # entries: [(name or message, kind)]

    def max_slots(self):
        first = ROW - LAGGED
        return [first + i for i, (_, kind) in enumerate(self.entries) if kind == _KIND_MAX]


class _LaggedVerdict(Verdict):
    """A call whose device values wait in the lagged slots: the backward of its outputs
    sends them (if no later call on the group did) before the op's backward runs."""

    __slots__ = ("_st", "_token")

    def __init__(self, st, token):
        super().__init__()
        self._st, self._token = st, token

    def _hook(self, grad):
        _settle_lagged(self._st, self._token)
        return grad

    def seal(self, *outputs):
        if torch.is_grad_enabled():
            for t in outputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(self._hook)
        return outputs[0] if len(outputs) == 1 else outputs


def _fast_ok(device: torch.device, n_device_values: int) -> bool:
    """The C++ check ("auto") handles this call: eager (not compiling, not capturing a
    CUDA graph) and room for its device values in the lagged slots."""
    if n_device_values > LAGGED or torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        return not torch.cuda.is_current_stream_capturing()
    return device.type == "cpu"


def _group_check(st: "_GroupState", device: torch.device):
    key = ("group_check", device)
    gc = st.buffers.get(key)
    if gc is None:
        from lasp2._extension import _C

        gc = st.buffers[key] = _C.GroupCheck(st.group, device, ROW, LAGGED)
    return gc


def _check_fast(st, op, signature, names, device, host_values, device_values, flags, positive) -> Verdict:
    """One C++ exchange (csrc/torch/group_check.h): the host part of this call's row is
    compared now; its device values are staged for the next exchange on the group (on
    CUDA, or LAG_ON_CPU) or, on the CPU, sent with this call's row."""
    entries = [(name, t, _KIND_DIGEST) for name, t in device_values]
    entries += [(m, t if t is not None and t.device.type != "cpu" else None, _KIND_MAX) for m, t in positive]
    entries += [(m, f, _KIND_MAX) for m, f in flags]
    values = [t for _, t, _ in entries]
    present = any(t is not None for t in values)
    head = [_op_code(op), len(signature) + len(host_values) + len(entries), _SYNC + 2 * len(signature),
            *map(int, signature), *(_digest_cached(v) for _, v in host_values)]
    if len(head) > ROW - LAGGED:
        raise AssertionError(f"{op}: {len(head)} consistency slots exceed the row's {ROW - LAGGED}")
    gc = _group_check(st, device)
    if st.staged is not None and st.staged.check is not gc:  # values waiting in another device's row
        _settle_lagged(st, st.staged, at_backward=False)
    kinds = [k for _, _, k in entries]
    token = _Staged(op, [(n, k) for n, _, k in entries], gc) if present else None
    lag = device.type == "cuda" or LAG_ON_CPU
    if token is not None and not lag:
        gc.stage(values, kinds)  # CPU: computed at once, sent with this row
        sent = token
    else:
        sent = st.staged  # the previous call's device values (or None)
    st.staged = None
    col = _exchange(op, st, gc, head, sent)
    if col >= 0:
        raise ValueError(_fast_message(gc.table().tolist(), _Layout(op, names, host_values, (), ()), sent,
                                       current=sent is token))
    if token is not None and lag:
        gc.stage(values, kinds)
        st.staged = token
        return _LaggedVerdict(st, token)
    return NO_CHECK


def _drop_staged(st):
    if st.staged is not None:
        st.staged.check.discard()
        st.staged = None


def _exchange(op, st, gc, head, sent) -> int:
    STATS["sync"] += 1
    try:
        return gc.exchange(head, [] if sent is None else sent.max_slots())
    except RuntimeError as e:
        raise RuntimeError(
            f"{op}: the cross-rank consistency check over process group {_group_label(st.group)} failed "
            f"(did a rank skip this call, exit, or time out?): {e}") from e


def _settle_lagged(st, token: _Staged, at_backward: bool = True):
    """The backward of a call whose device values no later exchange sent: send them now
    (every rank reaches this hook at the same point of its backward). Also before a call
    that is checked the synchronous way (under torch.compile, say)."""
    if st.staged is not token:
        return  # a later call on the group compared them
    st.staged = None
    LAGGED_SETTLES[0] += 1
    col = _exchange(token.op, st, token.check, [_op_code("lasp2.settle"), 0, _SYNC], token)
    if col >= 0:
        raise ValueError(_fast_message(token.check.table().tolist(), None, token, current=False,
                                       backward=at_backward))


def _fast_message(rows, layout: Optional[_Layout], sent: Optional[_Staged], current: bool,
                  backward: bool = False) -> str:
    first = ROW - LAGGED
    if layout is not None and any(row[:first] != rows[0][:first] for row in rows):
        return _disagreement(rows, layout)
    where = ""
    if backward:
        where = " (found at the backward of its outputs, before the op's backward ran; raised on every rank)"
    elif not current:
        where = (" (values of the previous call on this group, compared at this call without waiting for the GPU; "
                 "raised on every rank)")
    for i, (name, kind) in enumerate(sent.entries if sent is not None else ()):
        column = [row[first + i] for row in rows]
        if kind == _KIND_MAX:
            raised = [r for r, bits in enumerate(column) if struct.unpack("<d", struct.pack("<q", bits))[0] > 0]
            if raised:
                return f"{sent.op}: {name} (on rank(s) {raised} of `group`){where}"
        elif len(set(column)) != 1:
            return (f"{sent.op}: ranks of `group` disagree on {name}: differing digests (rank order){where}. Every "
                    "rank of the sequence-parallel group must call with the same shapes, dtype, options and small "
                    "arguments.")
    return ("lasp2: ranks of `group` sent different consistency rows (different lasp2 versions or "
            "LASP2_CONSISTENCY_CHECK modes?)")


_SIDE: dict = {}


def _side_stream(device: torch.device, device_values, flags):
    """CUDA: the stream the check runs on, beside the op's kernels instead of between them
    (its small kernels and the all-gather then cost the op's stream nothing but the
    seal's wait). It waits for the current stream only when the row reads tensors made
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
    them is ordered after the collective that read them on the current stream (a
    synchronous collective makes the current stream wait for it), and an asynchronous
    verdict's table is copied out first."""
    key = (str(device), world)
    bufs = st.buffers.get(key)
    if bufs is None:
        gathered = torch.empty(world * ROW, dtype=torch.int64, device=device)
        table = gathered.view(world, ROW)
        bufs = st.buffers[key] = (gathered, table, table[:1])
    gathered, table, first = bufs
    row_key = (key, tuple(row))
    mine = st.rows.get(row_key)
    if mine is None:
        staging = torch.tensor(row, dtype=torch.int64)
        if device.type == "cuda":
            staging = staging.pin_memory()  # the caching host allocator keeps it until the copy ran
        mine = st.rows[row_key] = torch.empty(ROW, dtype=torch.int64, device=device)
        mine.copy_(staging, non_blocking=True)
        if len(st.rows) > _REPLAY_SLOTS:
            st.rows.pop(next(iter(st.rows)))
    return mine, gathered, table, first


def _host_copy(st: _GroupState, gathered: torch.Tensor, device: torch.device):
    """The gathered table on the host without a sync: a pinned buffer and an event (CUDA),
    or a copy (CPU). One per group suffices: it is read at the next call on the group (or
    at the backward) before the next copy is enqueued."""
    if device.type != "cuda":
        return gathered.clone(), None
    key = ("host", gathered.numel())
    hit = st.buffers.get(key)
    if hit is None:
        hit = st.buffers[key] = (torch.empty(gathered.numel(), dtype=torch.int64, pin_memory=True),
                                 torch.cuda.Event())
    pinned, event = hit
    pinned.copy_(gathered, non_blocking=True)
    event.record()
    return pinned, event


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


def _size_row(row) -> tuple:
    """The size row (op code, fields, size fields) a gathered row was sent with."""
    return (row[0], row[1], *row[_HEADER:_HEADER + row[2] // 2])


def _after_disagreement(st: _GroupState, rows, message: str):
    """A synchronous reader found a disagreement. Ranks that went asynchronous run the
    op's collectives at the predicted sizes: run them too (on zeros), so nobody hangs;
    then raise now and again at the next call on the group, when they raise."""
    st.last = None
    asynchronous = [row for row in rows if row[1] != _FAILED and row[2] % 2 == _ASYNC]
    if asynchronous:
        replay = st.replays.get(_size_row(asynchronous[0]))  # what they run (the common prediction)
        if replay is not None:
            STATS["replays"] += 1
            try:
                replay()
            except Exception as e:  # noqa: BLE001 - the disagreement is the error to report
                message += f" (replaying the peers' call at their sizes failed too: {type(e).__name__}: {e})"
        st.pending = Verdict(message=message + " [raised on every rank; the ranks that checked asynchronously "
                                               "raise at this call's backward and at their next call on the group]")
    raise ValueError(message)


def _replayer(fn, args, kwargs):
    """A callable that makes the call fn(*args, **kwargs) again on zeros of the same shapes,
    dtypes and devices (and requires_grad, grad mode), without checking: the same collectives.
    Keeps no reference to the call's tensors (only to small ones such as an SPContext)."""
    grad_mode = torch.is_grad_enabled()

    def meta(x):
        if isinstance(x, torch.Tensor):
            return ("tensor", tuple(x.shape), x.dtype, x.device, x.requires_grad)
        return ("value", x)

    spec_args = [meta(a) for a in args]
    spec_kwargs = {k: meta(v) for k, v in kwargs.items()}

    def build(m):
        if m[0] == "tensor":
            return torch.zeros(m[1], dtype=m[2], device=m[3]).requires_grad_(m[4])
        return m[1]

    def run():
        _REPLAYING[0] = True
        try:
            with torch.set_grad_enabled(grad_mode):
                fn(*(build(m) for m in spec_args), **{k: build(m) for k, m in spec_kwargs.items()})
        finally:
            _REPLAYING[0] = False

    return run


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
    this rank never reaches (ranks that went asynchronous get a replay of their call).
    The caller re-raises its own error afterwards."""
    if _REPLAYING[0] or not usable_group(group):
        return
    st = _state(group)
    st.settle()
    _drop_staged(st)  # every rank raises at this call: the last call's device values go unsent
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
    rows = gathered.view(-1, ROW).tolist()
    try:
        _after_disagreement(st, rows, _failure_message(op, rows))
    except ValueError:
        pass  # the caller raises its own error (the peers get _failure_message)


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
    modes = [row[2] % 2 for row in rows]
    return (f"{op}: ranks of `group` used different consistency-check modes {modes} (rank order; 1 = "
            "asynchronous): set LASP2_CONSISTENCY_CHECK alike on every rank")
