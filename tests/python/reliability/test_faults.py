"""Issue 13.6: a peer that exits or stalls while this rank is inside the C++ schedule
(backward's AllGather, LASP-1's ring) or a rank that skips the call gives a Python
RuntimeError naming the collective / op and the group, after at most the group's
timeout; the process is not aborted and stays usable."""

import os
import time

import pytest
import torch
import torch.distributed as dist

import lasp2
from rel_helpers import run_world

PG_TIMEOUT = 6.0


def _leave_once_rank_0_is_done(done_path, longest):
    """Rank 1's stall or absence: it stays, never calling the op, until rank 0 has raised (and
    made done_path) or `longest` seconds have passed, then leaves. A fixed sleep of `longest`
    (2 or 3 group timeouts) kept every test waiting that long after rank 0 had its answer."""
    deadline = time.monotonic() + longest
    while not os.path.exists(done_path) and time.monotonic() < deadline:
        time.sleep(0.05)
    os._exit(0)


def _rank_0_done(done_path):
    open(done_path, "w").close()


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 8, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _still_usable():
    q, k, v = _qkv(5)
    return bool(torch.isfinite(lasp2.linear_attention(q, k, v)).all())


def _peer_fails_in_backward(rank, world, provider, how, done_path):
    q, k, v = _qkv(rank)
    o = lasp2.linear_attention(q, k, v, group=dist.group.WORLD, provider=provider)
    if rank == 1:
        if how == "exit":
            os._exit(0)
        _leave_once_rank_0_is_done(done_path, PG_TIMEOUT * 3)  # stalls past the group's timeout
    try:
        o.sum().backward()
    except RuntimeError as e:
        return str(e), _still_usable()
    finally:
        _rank_0_done(done_path)
    return "no error", _still_usable()


@pytest.mark.parametrize("provider,how", [("lasp2", "exit"), ("lasp2", "stall"), ("lasp1", "exit")])
def test_peer_failure_inside_backward_raises(provider, how, tmp_path):
    results = run_world(2, _peer_fails_in_backward, provider, how, str(tmp_path / "rank0_done"), timeout=90,
                        pg_timeout=PG_TIMEOUT)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert "over process group" in message and "failed" in message, message
    assert usable


def _rank_skips_call(rank, world, op_name, done_path):
    if rank == 1:
        _leave_once_rank_0_is_done(done_path, PG_TIMEOUT * 2)  # never calls the op
    q, k, v = _qkv()
    op = getattr(lasp2, op_name)
    try:
        op(q, k, v, group=dist.group.WORLD)
    except RuntimeError as e:
        return str(e), _still_usable()
    finally:
        _rank_0_done(done_path)
    return "no error", _still_usable()


@pytest.mark.parametrize("op_name", ["linear_attention", "softmax_attention"])
def test_rank_that_skips_the_call(op_name, tmp_path):
    start = time.monotonic()
    results = run_world(2, _rank_skips_call, op_name, str(tmp_path / "rank0_done"), timeout=90, pg_timeout=PG_TIMEOUT)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert f"lasp2.{op_name}" in message and "process group" in message, message
    assert usable
    assert time.monotonic() - start < 80
