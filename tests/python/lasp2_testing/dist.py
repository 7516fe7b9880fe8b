"""Runs a test body in several processes joined by a process group.

The processes rendezvous through a FileStore in a fresh temporary folder, not a
TCP port, so concurrent test sessions on one machine cannot collide. gloo (CPU)
is the default; backend="nccl" gives rank r the GPU r (tests marked multigpu).

gloo ranks start from a forkserver that has imported torch (and, where there is no
CUDA, lasp2 and megatron-core, where it is installed) once: a fresh interpreter per rank
paid those imports, 5 to 15 s on CI's 2 cores, for every rank of every test (lasp2's own
import after torch's: 0.12 s of CPU, measured, for every rank). The server never touches
CUDA or starts threads, so each rank still starts clean, and it takes the caller's
environment as a spawned process would. NCCL ranks are spawned, as before.
"""

from __future__ import annotations

import os
import shutil
import sys
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


# What the Megatron tests' ranks import (a missing module is skipped by the server).
_MEGATRON = ["megatron.core.parallel_state", "megatron.core.models.gpt", "megatron.core.optimizer",
             "megatron.core.dist_checkpointing", "megatron.core.pipeline_parallel"]
# The environment variables lasp2 reads when it is imported (lasp2/ops/_group_consistency.py):
# a rank forked from a server that imported lasp2 has the server's values of them in effect.
_READ_AT_LASP2_IMPORT = ("LASP2_CONSISTENCY_CHECK", "LASP2_CONSISTENCY_SIDE_STREAM")


def process_context(backend):
    """The multiprocessing context that starts a rank: spawn for NCCL, else the forkserver."""
    if backend == "nccl":
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # megatron-core (and lasp2's extension) may query CUDA while they import: a process
    # forked after that could not use CUDA, so they are preloaded only where there is none
    preloaded = [] if torch.cuda.is_available() else ["lasp2", *_MEGATRON]
    ctx.set_forkserver_preload(["torch", "torch.distributed", "torch.multiprocessing", *preloaded])
    return ctx


def take_environment(environ):
    """A forkserver rank's first step: the server's environment is the one its first caller
    had; take this caller's (environ: its os.environ when it started the rank)."""
    if "lasp2" in sys.modules:  # imported by the server, under the server's environment
        changed = [n for n in _READ_AT_LASP2_IMPORT if os.environ.get(n) != environ.get(n)]
        if changed:
            raise RuntimeError(f"{changed} changed after the test session's forkserver imported lasp2, which "
                               "reads them at import: set them before the session starts")
    for name in set(os.environ) - set(environ):
        del os.environ[name]
    os.environ.update(environ)


def _worker(rank, world_size, store_path, backend, fn, args, errors, finished, environ):
    try:
        take_environment(environ)
    except RuntimeError:
        errors.put((rank, traceback.format_exc()))
        raise
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
    ctx = process_context(backend)
    errors = ctx.Queue()
    finished = ctx.Barrier(world_size)
    store_dir = tempfile.mkdtemp(prefix="lasp2_store_")
    store_path = os.path.join(store_dir, "store")
    procs = [ctx.Process(target=_worker, args=(r, world_size, store_path, backend, fn, args, errors, finished,
                                               dict(os.environ)))
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


def _save_rank0_result(rank, world_size, path, fn, *args):
    """A rank of run_distributed_for_result: fn's return value, kept by rank 0 for the caller."""
    result = fn(rank, world_size, *args)
    if rank == 0:
        torch.save(result, path)


def run_distributed_for_result(world_size: int, fn, *args, timeout: float = 600.0):
    """run_distributed(world_size, fn, *args) and what fn returned on rank 0 (a rank cannot
    hand a return value back itself: it goes through a temporary file, removed after). For
    the tests that run one worker for a module and check what it measured; a worker whose
    results differ per rank gathers them first."""
    result_dir = tempfile.mkdtemp(prefix="lasp2_result_")
    path = os.path.join(result_dir, "result.pt")
    try:
        run_distributed(world_size, _save_rank0_result, path, fn, *args, timeout=timeout)
        return torch.load(path, weights_only=False)
    finally:
        shutil.rmtree(result_dir, ignore_errors=True)
