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
