"""Runs a test body in several processes joined by a gloo process group."""

from __future__ import annotations

import os
import socket
import threading
import traceback

import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, errors, finished):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # reported to the parent, which fails the test
        errors.put((rank, traceback.format_exc()))
        finished.abort()  # peers stop waiting for this rank
        raise
    dist.destroy_process_group()
    # Rank 0 hosts the TCP store: it must outlive every other rank's teardown.
    try:
        finished.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass


def run_distributed(world_size: int, fn, *args, timeout: float = 600.0):
    """Calls fn(rank, world_size, *args) on world_size processes; fn must be importable."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    finished = ctx.Barrier(world_size)
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors, finished))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    if alive:
        failures.append((-1, f"{len(alive)} rank(s) timed out after {timeout}s"))
    bad_exit = [p.exitcode for p in procs if p.exitcode not in (0, None)]
    if bad_exit and not failures:
        failures.append((-1, f"ranks exited with codes {bad_exit}"))
    if failures:
        raise AssertionError("\n".join(f"rank {r}:\n{msg}" for r, msg in sorted(failures)))
