"""Issue 13.3, the sync-free per-call check (lasp2/ops/_group_consistency.py, deferred
mode: the default on CUDA), run on CPU gloo worlds by forcing the device-style
comparison (`MODE = "deferred"`):

- steady state: every call makes exactly one collective and no host read of it, and
  the results equal a float64 recurrence;
- a value disagreement (scale, cu_seqlens) sets the outputs to NaN on every rank, and
  every rank raises the named ValueError at the backward and at the next call;
- a size change on one rank (local length), a different op, or a rank whose own
  argument checks fail: every rank raises, nobody hangs, and the group stays in step;
- hybrids (alternating linear / softmax layers) reach the sync-free state too.
The same scenarios run over NCCL on 2 GPUs (marked multigpu), where the mode is the
default one.
"""

import pytest
import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world

T_LOCAL, H, D = 8, 2, 4


def _global_qkv(world, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, world * T_LOCAL, H, D, generator=gen, dtype=torch.float64) for _ in range(3))


def _reference(q, k, v, scale):
    """o_t = scale * q_t^T S_t, S_t = S_{t-1} + k_t v_t^T, step by step in float64."""
    S = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64)
    out = []
    for t in range(q.shape[1]):
        S = S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return torch.stack(out, 1)


def _softmax_reference(q, k, v):
    """Causal softmax attention in float64, [B, T, H, D]."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * q.shape[-1] ** -0.5
    T = q.shape[1]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)


class _Counter:
    """Counts the check's collectives (the module's all_gather)."""

    def __init__(self, gc):
        self.gc, self.n, self.inner = gc, 0, gc.all_gather_single
        gc.all_gather_single = self

    def __call__(self, *a, **kw):
        self.n += 1
        return self.inner(*a, **kw)


def _setup(rank, world, on_gpu):
    from lasp2.ops import _group_consistency as GC

    GC.MODE = "deferred"  # opt-in (the default is synchronous)
    return GC, _Counter(GC), dist.group.WORLD


def _stats(GC, counter):
    out = dict(GC.STATS, gathers=counter.n)
    GC.STATS.update(sync=0, deferred=0, replays=0)
    counter.n = 0
    return out


def _poisoned(o) -> bool:
    """Every output vector holds a NaN: a projection over the last dim is NaN everywhere."""
    o = o.detach()
    return bool(torch.isnan(o @ torch.ones(o.shape[-1], 2, dtype=o.dtype, device=o.device)).all())


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _local(x, rank, on_gpu):
    x = x[:, rank * T_LOCAL:(rank + 1) * T_LOCAL]
    x = x.to(f"cuda:{rank}", torch.float32) if on_gpu else x.clone()
    return x.requires_grad_()


def _steady_and_values(rank, world, on_gpu=False):
    GC, counter, W = _setup(rank, world, on_gpu)
    gq, gk, gv = _global_qkv(world)
    q, k, v = (_local(x, rank, on_gpu) for x in (gq, gk, gv))
    la = lambda **kw: lasp2.linear_attention(q, k, v, group=W, **kw)  # noqa: E731
    seen = {}
    la(scale=0.5), la(scale=0.5)  # no history yet: these two read the table on the host
    seen["warmup"] = _stats(GC, counter)
    outs = []
    for _ in range(4):
        o = la(scale=0.5)
        o.sum().backward()
        outs.append(o.detach().cpu().double())
    seen["steady"] = _stats(GC, counter)
    want = _reference(gq, gk, gv, 0.5)[:, rank * T_LOCAL:(rank + 1) * T_LOCAL]
    seen["steady_err"] = max(float((o - want).abs().max()) for o in outs)
    # softmax attention (which saves its output for backward) on the deferred path too
    sa = lambda: lasp2.softmax_attention(q, k, v, group=W)  # noqa: E731
    sa(), sa()
    _stats(GC, counter)
    for _ in range(2):
        o = sa()
        o.sum().backward()
    seen["softmax_steady"] = _stats(GC, counter)
    want_sa = _softmax_reference(gq, gk, gv)[:, rank * T_LOCAL:(rank + 1) * T_LOCAL]
    seen["softmax_err"] = float((o.detach().cpu().double() - want_sa).abs().max())
    la(scale=0.5), la(scale=0.5)
    seen["tol"] = 1e-4 if on_gpu else 1e-6  # float32 on GPUs; float64 in on CPU (states travel in float32)

    # scale differs: NaN outputs, the named error at backward and at the next call
    o = la(scale=0.5 if rank == 0 else 0.25)
    seen["scale_nan"] = _poisoned(o)
    seen["scale_backward"] = _error(lambda: o.sum().backward())
    seen["scale_next"] = _error(lambda: la(scale=0.5))
    o = la(scale=0.5)  # in step again (and read on the host: the history restarts)
    seen["after_err"] = float((o.detach().cpu().double() - want).abs().max())
    la(scale=0.5)

    # cu_seqlens contents differ, under no_grad (inference): NaN, then the next call raises
    cu = torch.tensor([0, 3, world * T_LOCAL] if rank == 0 else [0, 5, world * T_LOCAL])
    with torch.no_grad():
        o = la(scale=0.5, cu_seqlens=torch.tensor([0, 3, world * T_LOCAL]))
        o = la(scale=0.5, cu_seqlens=torch.tensor([0, 3, world * T_LOCAL]))
        GC.STATS.update(sync=0, deferred=0)
        o = la(scale=0.5, cu_seqlens=cu)
    seen["cu_async"] = GC.STATS["deferred"] == 1 and GC.STATS["sync"] == 0
    seen["cu_nan"] = _poisoned(o)
    seen["cu_next"] = _error(lambda: la(scale=0.5))
    la(scale=0.5)
    seen["final"] = _stats(GC, counter)
    return seen


def _nccl_world(fn):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA GPUs")
    return run_world(2, fn, True, timeout=240, backend="nccl")


def test_steady_state_is_sync_free_and_value_disagreement_poisons_then_raises():
    _check_steady_and_values(run_world(2, _steady_and_values, timeout=240))


@pytest.mark.gpu
@pytest.mark.multigpu
def test_nccl_steady_state_is_sync_free_and_value_disagreement_poisons_then_raises():
    _check_steady_and_values(_nccl_world(_steady_and_values))


def _check_steady_and_values(results):
    seen = assert_all_ok(results)
    for s in seen:
        assert s["warmup"] == dict(sync=2, deferred=0, replays=0, gathers=2), s["warmup"]
        assert s["steady"] == dict(sync=0, deferred=4, replays=0, gathers=4), s["steady"]
        assert s["steady_err"] < s["tol"] and s["after_err"] < s["tol"], s
        assert s["softmax_steady"] == dict(sync=0, deferred=2, replays=0, gathers=2), s["softmax_steady"]
        assert s["softmax_err"] < s["tol"], s["softmax_err"]
        assert s["scale_nan"] and s["cu_nan"] and s["cu_async"]
        for key in ("scale_backward", "scale_next"):
            assert s[key] is not None and "disagree on `scale`" in s[key], (key, s[key])
        assert s["cu_next"] is not None and "`cu_seqlens` contents" in s["cu_next"], s["cu_next"]
    assert seen[0]["scale_backward"] == seen[1]["scale_backward"]


def _sizes_ops_failures(rank, world, on_gpu=False):
    GC, counter, W = _setup(rank, world, on_gpu)
    gq, gk, gv = _global_qkv(world)
    q, k, v = (_local(x, rank, on_gpu) for x in (gq, gk, gv))
    la = lambda q=q, k=k, v=v: lasp2.linear_attention(q, k, v, group=W)  # noqa: E731
    sa = lambda: lasp2.softmax_attention(q, k, v, group=W)  # noqa: E731
    seen = {}
    la(), la(), la()

    def steady_then(bad_call):
        """rank 0 makes bad_call while rank 1 makes the steady call (asynchronously)."""
        _stats(GC, counter)
        if rank == 0:
            seen_call = _error(bad_call)
            return seen_call, None, _error(la), _stats(GC, counter)
        o = la()
        nan = _poisoned(o)
        return nan, _error(lambda: o.sum().backward()), _error(la), _stats(GC, counter)

    # rank 0's local length changes alone: it reads the table, replays the peer's call at
    # the old sizes (so the peer's collectives complete) and raises; the peer raises at
    # its backward; both raise again at the next call
    short = tuple(x[:, :T_LOCAL // 2] for x in (q, k, v))
    seen["size"] = steady_then(lambda: la(*short))
    la(), la(), la()
    seen["size_after"] = _stats(GC, counter)
    # a different op at the same point
    seen["op"] = steady_then(sa)
    la(), la(), la()
    # rank 0's own argument checks fail (v has another batch size)
    seen["failure"] = steady_then(lambda: la(v=v.expand(2, -1, -1, -1)))
    la(), la(), la()
    # hybrid: alternating ops settle into the sync-free state (after at most 3 calls)
    la(), sa(), la()
    _stats(GC, counter)
    for _ in range(4):
        sa(), la()
    seen["hybrid"] = _stats(GC, counter)
    return seen


def test_size_change_op_change_and_local_failure_raise_everywhere_without_hanging():
    _check_sizes_ops_failures(run_world(2, _sizes_ops_failures, timeout=240))


@pytest.mark.gpu
@pytest.mark.multigpu
def test_nccl_size_change_op_change_and_local_failure_raise_everywhere_without_hanging():
    _check_sizes_ops_failures(_nccl_world(_sizes_ops_failures))


def _check_sizes_ops_failures(results):
    r0, r1 = assert_all_ok(results)
    for key, match0, match in (("size", "local sequence length", "local sequence length"),
                               ("op", "different lasp2 ops", "different lasp2 ops"),
                               ("failure", "`v`", "rejected their arguments")):
        at_call, _, next0, stats0 = r0[key]
        nan, backward1, next1, stats1 = r1[key]
        assert at_call is not None and match0 in at_call, (key, at_call)
        assert nan, key
        assert backward1 is not None and match in backward1, (key, backward1)
        assert next0 is not None and match in next0, (key, next0)
        assert next1 is not None and match in next1, (key, next1)
        assert stats0["replays"] == 1 and stats1["replays"] == 0, (key, stats0, stats1)
        # one collective per call on both ranks (the raising next call makes none)
        assert stats0["gathers"] == stats1["gathers"] == 1, (key, stats0, stats1)
    # after an error the history restarts (one host read), its predictions are kept
    assert r0["size_after"] == r1["size_after"] == dict(sync=1, deferred=2, replays=0, gathers=3)
    assert r0["hybrid"] == r1["hybrid"] == dict(sync=0, deferred=8, replays=0, gathers=8), r0["hybrid"]


def test_seal_poisons_one_column_and_its_backward_raises():
    """The seal on its own (no world): a disagreeing verdict puts NaN into the first value
    of every output vector, in place (also through a transposed view), leaves the others,
    and its backward hook raises the named error before anything upstream runs."""
    from lasp2.ops import _group_consistency as GC

    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    o = (x * 2).transpose(0, 1)
    before = o.detach().clone()
    verdict = GC.Verdict(bad=torch.ones((), dtype=torch.bool), message="lasp2.op: ranks disagree on `scale`")
    sealed = verdict.seal(o)
    assert sealed is o
    assert torch.isnan(o[..., 0]).all() and torch.equal(o[..., 1:].detach(), before[..., 1:])
    try:
        o.sum().backward()
    except ValueError as e:
        assert "`scale`" in str(e)
    else:
        raise AssertionError("no error at backward")
    assert x.grad is None
    fine = GC.Verdict(bad=torch.zeros((), dtype=torch.bool), message=None)
    y = x * 3
    kept = y.detach().clone()
    fine.seal(y).sum().backward()
    assert torch.equal(y.detach(), kept) and torch.equal(x.grad, torch.full_like(x, 3.0))
