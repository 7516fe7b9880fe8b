"""Issue 13.3 on a GPU: the per-call consistency check over an NCCL group of one process
(a child process, so this test's process keeps no group):

- the default ("auto") check never waits for the op's stream: with ~0.5 s of work
  queued, DEPTH calls with device values (a decay digest, a gate-sign flag) return
  before the queue drains; a positive gate raises DEPTH calls later, or at the backward
  of the call's outputs, before the op's backward;
- a CUDA-graph capture of a group-of-one lasp2.linear_attention call (the ops skip the
  check for one rank) replays to the eager result.
    PYTHONPATH=$PWD python -m pytest tests/python/reliability/test_consistency_gpu.py -q
"""

import multiprocessing
import os
import tempfile
import traceback

import pytest
import torch

pytestmark = pytest.mark.gpu


def _graph_worker(store, results):
    """CUDA-graph capture of a group-of-one call (the ops skip the check for one rank)."""
    try:
        import torch.distributed as dist

        import lasp2

        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
        group = dist.group.WORLD
        device = torch.device("cuda", 0)
        out = {}
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 256, 4, 64, generator=gen).to(device) for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 4, generator=gen)).to(device)
        # CUDA graph capture of a group-of-one call
        static = [x.clone() for x in (q, k, v, g)]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up outside the capture
                lasp2.linear_attention(*static[:3], g=static[3], group=group)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = lasp2.linear_attention(*static[:3], g=static[3], group=group)
        for x, y in zip(static, (q, k, v, g)):
            x.copy_(y * 0.5)
        graph.replay()
        torch.cuda.synchronize()
        want = lasp2.linear_attention(q * 0.5, k * 0.5, v * 0.5, g=g * 0.5)
        out["graph_err"] = float((captured - want).abs().max())
        dist.destroy_process_group()
        results.put(("ok", out))
    except BaseException as e:  # reported to the parent
        results.put(("raised", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def _auto_worker(store, results):
    """The default ("auto") check on CUDA: the host never waits for the op's stream."""
    try:
        import torch.distributed as dist

        import lasp2
        from lasp2.ops import _group_consistency as GC

        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1)
        group = dist.group.WORLD
        device = torch.device("cuda", 0)
        out = {}
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 256, 4, 64, generator=gen).to(device).requires_grad_() for _ in range(3))
        g = torch.nn.functional.logsigmoid(torch.randn(1, 256, 4, generator=gen)).to(device)
        decay = -torch.rand(4, generator=gen).to(device)

        def check(gates, scale=0.125):
            return GC.verify_group_consistency(
                "gpu-test", group, [1, 256, 4, 64, 64], list("abcde"), device,
                host_values=[("`scale`", scale)], device_values=[("`decay` values", decay)],
                positive=[("`g` holds positive log gates", gates)])

        for _ in range(2 * GC.DEPTH):
            check(g)
        torch.cuda.synchronize()
        # ~0.5 s of work queued on the op's stream: DEPTH calls return long before it ends
        # (each sends values staged before the queued work)
        torch.cuda._sleep(1 << 30)
        for _ in range(GC.DEPTH):
            check(g)
        out["returned_before_queue_drained"] = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        # a positive gate: raised DEPTH calls later on the group ...
        check(g.abs() + 0.5)
        out["next_calls"] = []
        for _ in range(GC.DEPTH):
            try:
                check(g)
                out["next_calls"].append(None)
            except ValueError as e:
                out["next_calls"].append(str(e))
        # ... or at the backward of the call's outputs, before the op's backward
        o = check(g.abs() + 0.5).seal(lasp2.linear_attention(q, k, v, g=g))
        try:
            o.sum().backward()
            out["backward"] = None
        except ValueError as e:
            out["backward"] = str(e)
        out["no_grad"] = q.grad is None
        check(g)  # usable again
        out["after"] = True
        dist.destroy_process_group()
        results.put(("ok", out))
    except BaseException as e:  # reported to the parent
        results.put(("raised", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))


def test_default_check_does_not_wait_for_the_op_stream():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="lasp2_gpu_auto_"), "store")
    p = ctx.Process(target=_auto_worker, args=(store, results))
    p.start()
    kind, out = results.get(timeout=240)
    p.join(30)
    assert kind == "ok", out
    assert out["returned_before_queue_drained"], out
    *quiet, raised = out["next_calls"]
    assert quiet == [None] * len(quiet) and raised and "positive log gates (on rank(s) [0]" in raised, out
    assert out["backward"] and "positive log gates" in out["backward"] and "backward" in out["backward"], out
    assert out["no_grad"] and out["after"], out


def test_cuda_graph_capture_of_a_group_of_one_call():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    store = os.path.join(tempfile.mkdtemp(prefix="lasp2_gpu_graph_"), "store")
    p = ctx.Process(target=_graph_worker, args=(store, results))
    p.start()
    kind, out = results.get(timeout=240)
    p.join(30)
    assert kind == "ok", out
    assert out["graph_err"] < 1e-3, out["graph_err"]
