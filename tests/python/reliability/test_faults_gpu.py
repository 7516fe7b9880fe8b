"""Issue 13.6 on GPUs: with the native NCCL communicator (LASP2_COMMUNICATOR=nccl)
a peer that exits while this rank's collectives are in flight no longer leaves the
stream stuck forever: the communicator's watchdog aborts it after the group's
timeout, stream syncs return, and the next use raises an error naming the
collective. Run on a machine with 2+ GPUs:
    PYTHONPATH=$PWD python -m pytest tests/python/reliability/test_faults_gpu.py -q
"""

import datetime
import os
import threading

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.multigpu]

PG_TIMEOUT = 15.0


def _worker(rank, world, port, results):
    import torch.distributed as dist

    import lasp2
    from lasp2._extension import _C
    from lasp2.distributed.communicator import get_communicator

    os.environ["LASP2_COMMUNICATOR"] = "nccl"
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT))
    device = torch.device("cuda", rank)
    q, k, v = (torch.randn(1, 256, 2, 64, device=device, requires_grad=True) for _ in range(3))
    o = lasp2.linear_attention(q, k, v, group=dist.group.WORLD)
    torch.cuda.synchronize()
    if rank == 1:
        os._exit(0)  # gone while rank 0's backward AllGather waits for it
    o.sum().backward()  # enqueued; the host goes on
    done = threading.Event()
    threading.Thread(target=lambda: (torch.cuda.synchronize(), done.set()), daemon=True).start()
    released = done.wait(PG_TIMEOUT * 4)
    comm = get_communicator(dist.group.WORLD, device)
    try:
        comm.abort("test: make sure")  # idempotent after the watchdog's abort
        _C.lasp2_forward(_C.LinearAttentionArgs(q.detach(), k.detach(), v.detach(), scale=0.125, comm=comm), False)
        message = "no error"
    except Exception as e:  # noqa: BLE001 - the message is what is checked
        message = str(e)
    results.put((released, message))
    results.close()
    results.join_thread()
    os._exit(0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_native_nccl_watchdog_releases_a_dead_peer():
    import multiprocessing
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    released, message = results.get(timeout=PG_TIMEOUT * 8)
    for p in procs:
        p.join(30)
        if p.is_alive():
            p.kill()
    assert released, "the stream stayed stuck after the peer exited"
    assert "NCCL communicator" in message and ("timed out" in message or "failed" in message
                                               or "aborted" in message), message


# Issue 13.6 on GPUs with the default (torch) communicator: the op's and the check's
# collectives run through the caller's ProcessGroupNCCL. With TORCH_NCCL_BLOCKING_WAIT=1
# (and error handling that aborts the communicator without tearing the process down) a
# collective that does not complete within the group's timeout raises on the host, which
# lasp2 turns into an error naming the op and the group; the process stays usable for
# single-device calls. Without those settings torch's watchdog decides (by default it
# ends the process): that is torch's policy, not lasp2's. Two GPUs needed: NCCL
# refuses two ranks on one GPU, so these never ran on the one-GPU machine.
NCCL_TIMEOUT = 10.0


def _cuda_qkv(rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    device = torch.device("cuda", rank)
    return [torch.randn(1, 256, 2, 64, generator=gen).to(device).requires_grad_() for _ in range(3)]


def _cuda_usable(rank):
    """A single-device call after the failure works."""
    import lasp2

    q, k, v = _cuda_qkv(rank, seed=5)
    o = lasp2.linear_attention(q, k, v)
    torch.cuda.synchronize(rank)
    return bool(torch.isfinite(o).all())


def _error_then_usable(rank, call):
    """(the RuntimeError `call` raised, or "no error"; whether a one-device call works after it)."""
    try:
        call()
        torch.cuda.synchronize(rank)
        message = "no error"
    except RuntimeError as e:
        message = str(e)
    return message, _cuda_usable(rank)


def _nccl_peer_skips(rank, world, op_name):
    import time

    import torch.distributed as dist

    import lasp2

    q, k, v = _cuda_qkv(rank)
    dist.all_reduce(q.detach().sum())  # the group's communicator exists before rank 1 goes quiet
    torch.cuda.synchronize(rank)
    if rank == 1:
        time.sleep(NCCL_TIMEOUT * 3)  # never calls the op: rank 0's check times out
        os._exit(0)
    return _error_then_usable(rank, lambda: getattr(lasp2, op_name)(q, k, v, group=dist.group.WORLD))


def _nccl_peer_exits_before_backward(rank, world):
    import torch.distributed as dist

    import lasp2

    q, k, v = _cuda_qkv(rank, seed=rank)
    o = lasp2.linear_attention(q, k, v, group=dist.group.WORLD)
    torch.cuda.synchronize(rank)
    if rank == 1:
        os._exit(0)  # gone: rank 0's backward (its collectives, or the hook's check) waits for it
    return _error_then_usable(rank, lambda: o.sum().backward())


def _nccl_peer_rejects_its_arguments(rank, world):
    import torch.distributed as dist

    import lasp2

    q, k, v = _cuda_qkv(rank)
    try:
        lasp2.linear_attention(q, k, v, group=dist.group.WORLD, scale="x" if rank == 1 else None)
        message = "no error"
    except (ValueError, TypeError) as e:
        message = str(e)
    o = lasp2.linear_attention(q, k, v, group=dist.group.WORLD)  # the group is still in step
    o.sum().backward()
    torch.cuda.synchronize(rank)
    return message, bool(torch.isfinite(q.grad).all())


def _run_nccl(fn, *args, monkeypatch):
    from rel_helpers import run_world

    monkeypatch.setenv("TORCH_NCCL_BLOCKING_WAIT", "1")  # a timed-out collective raises in wait()
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")  # the watchdog aborts the communicator, no teardown
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    return run_world(2, fn, *args, timeout=NCCL_TIMEOUT * 8, pg_timeout=NCCL_TIMEOUT, backend="nccl")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("op_name", ["linear_attention", "softmax_attention"])
def test_nccl_rank_that_skips_the_call_raises_naming_op_and_group(op_name, monkeypatch):
    results = _run_nccl(_nccl_peer_skips, op_name, monkeypatch=monkeypatch)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert f"lasp2.{op_name}" in message and "process group" in message, message
    assert usable


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_peer_exit_before_backward_raises_naming_the_group(monkeypatch):
    results = _run_nccl(_nccl_peer_exits_before_backward, monkeypatch=monkeypatch)
    kind, value = results[0]
    assert kind == "ok", f"rank 0 did not survive: {results[0]}"
    message, usable = value
    assert "process group" in message and ("failed" in message or "timed out" in message.lower()), message
    assert usable


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_nccl_peer_that_rejects_its_arguments_makes_every_rank_raise(monkeypatch):
    results = _run_nccl(_nccl_peer_rejects_its_arguments, monkeypatch=monkeypatch)
    (kind0, (m0, ok0)), (kind1, (m1, ok1)) = results[0], results[1]
    assert kind0 == kind1 == "ok", results
    assert "rejected their arguments" in m0 and "`scale`" in m1, (m0, m1)
    assert ok0 and ok1
