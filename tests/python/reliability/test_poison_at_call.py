"""Issue 13, "never a silent wrong answer": a call whose ranks disagree on a DEVICE value
(the bits of `decay`; on CUDA also a positive `g` / `decay`) returns NaN on EVERY rank
at that call, while the error itself still arrives from the check's ring DEPTH calls
later (or at the backward, or at settle_consistency_checks) with the same message on
every rank. The values ride in LASP-2's own forward AllGather and are compared right
after it (csrc/core/include/lasp2/call_check.h). Forced onto CPU tensors over gloo with
LAG_ON_CPU and DEPTH = 2 (on CPU groups the values are otherwise compared at the call);
agreeing ranks get the one-process result, bit for bit what the unlagged check gives."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world

T, H, D = 8, 2, 4


def _qkv(seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, T, H, D, generator=gen, dtype=torch.float64).requires_grad_(grad) for _ in range(3))


def _error(fn):
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _nan(*tensors):
    return all(bool(torch.isnan(t).all()) for t in tensors)


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _scenarios(rank, world):
    from lasp2.ops import _group_consistency as GC

    W = dist.group.WORLD
    same = torch.tensor([-0.1, -0.2], dtype=torch.float64)
    mine = torch.tensor([-0.1, -0.2 if rank == 0 else -0.3], dtype=torch.float64)
    la = lambda **kw: lasp2.linear_attention(*_qkv(), group=W, **kw)  # noqa: E731
    out = {}

    # agreeing ranks: the values compared at the call (nothing armed) and through the ring
    # (armed, folded into the gather) give the same bits, and the one-process result
    GC.DEPTH = 2
    at_call = la(decay=same)
    GC.LAG_ON_CPU = True
    lagged = la(decay=same)
    out["bitwise"] = torch.equal(at_call, lagged)
    full = [torch.cat([_qkv()[i]] * world, dim=1) for i in range(3)]  # every rank holds the same shard
    want = lasp2.linear_attention(*full, decay=same)[:, rank * T:(rank + 1) * T]
    out["one_process"] = torch.allclose(lagged, want, rtol=1e-6, atol=1e-6)
    out["settle_clean"] = _error(lambda: lasp2.settle_consistency_checks(W))

    # a differing decay: NaN on every rank at this call; the next call is its own (finite)
    # result; the DEPTH-th call raises on every rank, as before
    bad = la(decay=mine)
    out["bad_nan"] = _nan(bad)
    out["next_finite"] = _finite(la())
    out["depth_error"] = _error(lambda: la())
    out["after_finite"] = _finite(la(decay=same))
    out["after_settle"] = _error(lambda: lasp2.settle_consistency_checks(W))

    # every schedule and output: splits, packed documents (tokens after a document start
    # do not see the entering state: still NaN), both forward schedules, final states
    cases = {}
    for split in ("contiguous", "balanced"):
        for docs in (False, True):
            for overlap in (False, True):
                cu = torch.tensor([0, 5, 11, T * world]) if docs else None
                n = 3 if docs else 1
                h0 = torch.randn(n, H, D, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                key = f"{split}/{'docs' if docs else 'plain'}/{'overlap' if overlap else 'fused'}"
                kw = dict(split=split, cu_seqlens=cu, overlap=overlap, output_final_state=True)
                o, final = la(decay=mine, initial_state=h0, **kw)
                settle = _error(lambda: lasp2.settle_consistency_checks(W))
                o_ok, final_ok = la(decay=same, **kw)
                cases[key] = (_nan(o, final), settle, _finite(o_ok, final_ok))
    out["cases"] = cases

    # with gradients: NaN outputs, and the backward raises before any gradient (the hook)
    q, k, v = _qkv(grad=True)
    o = lasp2.linear_attention(q, k, v, decay=mine, group=W)
    out["grad_nan"] = _nan(o.detach())
    out["backward"] = _error(lambda: o.sum().backward())
    out["no_grad"] = q.grad is None

    # a provider whose schedule does not take the armed values (LASP-1: no AllGather to
    # fold them into) leaves them for nobody: the next lasp2 call's check disarms them
    la(decay=mine, provider="lasp1")
    out["stale_not_applied"] = _finite(la())
    out["lasp1_error"] = _error(lambda: la())
    return out


def test_disagreeing_device_values_give_nan_at_the_call_on_every_rank():
    results = assert_all_ok(run_world(2, _scenarios, timeout=300))
    for r in results:
        assert r["bitwise"] and r["one_process"] and r["settle_clean"] is None
        assert r["bad_nan"], "the call with differing `decay` must return NaN on every rank"
        assert r["next_finite"] and r["after_finite"] and r["after_settle"] is None
        assert "`decay` values" in r["depth_error"] and "earlier call" in r["depth_error"]
        for key, (nan, settle, ok) in r["cases"].items():
            assert nan, f"{key}: outputs and final states must be NaN"
            assert settle is not None and "`decay` values" in settle, key
            assert ok, f"{key}: the agreeing call after it is finite"
        assert r["grad_nan"] and "backward" in r["backward"] and r["no_grad"]
        assert r["stale_not_applied"] and "`decay` values" in r["lasp1_error"]
    for key in ("depth_error", "backward", "lasp1_error"):
        assert results[0][key] == results[1][key], f"{key}: ranks must raise the same error"
    assert results[0]["cases"] == results[1]["cases"]
