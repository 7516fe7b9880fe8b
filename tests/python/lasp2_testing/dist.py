"""Runs a test body in several processes joined by a process group.

The processes rendezvous through a FileStore in a fresh temporary folder, not a
TCP port, so concurrent test sessions on one machine cannot collide. gloo (CPU)
is the default; backend="nccl" gives rank r the GPU r (tests marked multigpu).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _init(rank, world_size, store_path, backend):
    torch.set_num_threads(1)
    options = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        options["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world_size,
                            **options)


def _worker(rank, world_size, store_path, backend, fn, args, errors, finished):
    _init(rank, world_size, store_path, backend)
    try:
        fn(rank, world_size, *args)
    except BaseException:  # reported to the parent, which fails the test
        errors.put((rank, traceback.format_exc()))
        finished.abort()  # peers stop waiting for this rank
        raise
    dist.destroy_process_group()
    # No rank leaves (and removes the store) while another is still tearing down.
    try:
        finished.wait(timeout=60)
    except threading.BrokenBarrierError:
        pass


def run_distributed(world_size: int, fn, *args, timeout: float = 600.0, backend: str = "gloo"):
    """Calls fn(rank, world_size, *args) on world_size processes; fn must be importable.
    Fails with every failing rank's traceback; a rank still running after `timeout`
    seconds is killed and reported."""
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    finished = ctx.Barrier(world_size)
    store_dir = tempfile.mkdtemp(prefix="lasp2_store_")
    store_path = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, backend, fn, args, errors, finished))
             for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    shutil.rmtree(store_dir, ignore_errors=True)
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
