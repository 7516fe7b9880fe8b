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


def _qkv(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 8, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _still_usable():
    q, k, v = _qkv(5)
    return bool(torch.isfinite(lasp2.linear_attention(q, k, v)).all())


def _peer_fails_in_backward(rank, world, provider, how):
    q, k, v = _qkv(rank)
    o = lasp2.linear_attention(q, k, v, group=dist.group.WORLD, provider=provider)
    if rank == 1:
        if how == "exit":
            os._exit(0)
        time.sleep(PG_TIMEOUT * 3)  # stalls past the group's timeout, then leaves
        os._exit(0)
    try:
        o.sum().backward()
    except RuntimeError as e:
        return str(e), _still_usable()
    return "no error", _still_usable()


@pytest.mark.parametrize("provider,how", [("lasp2", "exit"), ("lasp2", "stall"), ("lasp1", "exit")])
def test_peer_failure_inside_backward_raises(provider, how):
    results = run_world(2, _peer_fails_in_backward, provider, how, timeout=90, pg_timeout=PG_TIMEOUT)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert "over process group" in message and "failed" in message, message
    assert usable


def _rank_skips_call(rank, world, op_name):
    if rank == 1:
        time.sleep(PG_TIMEOUT * 2)  # never calls the op
        os._exit(0)
    q, k, v = _qkv()
    op = getattr(lasp2, op_name)
    try:
        op(q, k, v, group=dist.group.WORLD)
    except RuntimeError as e:
        return str(e), _still_usable()
    return "no error", _still_usable()


@pytest.mark.parametrize("op_name", ["linear_attention", "softmax_attention"])
def test_rank_that_skips_the_call(op_name):
    start = time.monotonic()
    results = run_world(2, _rank_skips_call, op_name, timeout=90, pg_timeout=PG_TIMEOUT)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert f"lasp2.{op_name}" in message and "process group" in message, message
    assert usable
    assert time.monotonic() - start < 80
