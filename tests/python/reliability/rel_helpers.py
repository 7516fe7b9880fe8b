"""Helpers of the reliability tests: a float64 step-by-step recurrence (finite for
-inf gates, unlike the cumulative-sum form) and a gloo world runner that reports
per-rank results, exceptions and exit codes, with a hard timeout (a hang fails the
test instead of stalling CI). gloo ranks start from lasp2_testing.dist's forkserver (torch
imported once), NCCL ranks are spawned."""

from __future__ import annotations

import os
import shutil
import tempfile
import traceback
from typing import Optional

import torch

from lasp2_testing.dist import process_context, take_environment


def _child(rank, world, store_path, fn, args, results, timeout_s, backend, environ):
    import datetime

    import torch.distributed as dist

    take_environment(environ)
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"file://{store_path}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    try:
        value = fn(rank, world, *args)
        results.put((rank, "ok", value))
    except BaseException as e:  # reported to the parent
        results.put((rank, "raised", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    results.close()
    results.join_thread()  # flushed before the hard exit below
    os._exit(0)  # no teardown: a peer may already be gone


def run_world(world: int, fn, *args, timeout: float = 60.0, pg_timeout: float = 20.0, backend: str = "gloo"):
    """Runs fn(rank, world, *args) on `world` gloo processes (nccl: one GPU each).

    Returns {rank: ("ok", value) | ("raised", text) | ("exit", exitcode) | ("hung", None)}.
    fn must be importable (module level) and its return value picklable.
    """
    ctx = process_context(backend)
    results = ctx.Queue()
    store_dir = tempfile.mkdtemp(prefix="lasp2_rel_")
    procs = [ctx.Process(target=_child, args=(r, world, os.path.join(store_dir, "store"), fn, args, results,
                                              pg_timeout, backend, dict(os.environ)))
             for r in range(world)]
    for p in procs:
        p.start()
    out = {}
    for p in procs:
        p.join(timeout)
    import queue

    for _ in range(world):
        try:
            rank, kind, value = results.get(timeout=2)
        except queue.Empty:
            break
        out[rank] = (kind, value)
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            out.setdefault(r, ("hung", None))
        else:
            out.setdefault(r, ("exit", p.exitcode))
    shutil.rmtree(store_dir, ignore_errors=True)
    return out


def assert_all_ok(results) -> list:
    bad = {r: v for r, v in results.items() if v[0] != "ok"}
    assert not bad, f"ranks failed: {bad}"
    return [results[r][1] for r in sorted(results)]



def value_error_text(fn) -> str:
    """The message of the ValueError `fn()` raises, or "no error" (a scenario's outcome on
    one rank, compared across ranks: every rank must raise, with the same kind of message)."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return "no error"

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def assert_close_finite(name, got, want, tol):
    assert torch.isfinite(got).all(), f"{name}: non-finite values {got}"
    err = rel_err(got, want)
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


def local_rows(x: Optional[torch.Tensor], rank: int, world: int, dim: int = 1):
    if x is None:
        return None
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n)
