"""Issue 13, "never a silent wrong answer": a call whose ranks disagree on a DEVICE value
(the bits of `decay`; on CUDA also a positive `g` / `decay`) returns NaN on EVERY rank
at that call, while the error itself still arrives from the check's ring DEPTH calls
later (or at the backward, or at settle_consistency_checks) with the same message on
every rank. The values ride in LASP-2's own forward AllGather and are compared right
after it (csrc/core/include/lasp2/call_check.h); providers "lasp1" (a ring of sends)
and "ulysses" (all-to-alls over heads) gather them in one all-gather of their own. Forced onto CPU tensors over gloo with
LAG_ON_CPU and DEPTH = 2 (on CPU groups the values are otherwise compared at the call);
agreeing ranks get the one-process result, bit for bit what the unlagged check gives."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.lagged import qkv, value_error
from rel_helpers import assert_all_ok, run_world

T, H, D = 8, 2, 4


def _nan(*tensors):
    return all(bool(torch.isnan(t).all()) for t in tensors)


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _scenarios(rank, world):
    from lasp2.ops import _group_consistency as GC

    W = dist.group.WORLD
    same = torch.tensor([-0.1, -0.2], dtype=torch.float64)
    mine = torch.tensor([-0.1, -0.2 if rank == 0 else -0.3], dtype=torch.float64)
    la = lambda **kw: lasp2.linear_attention(*qkv(), group=W, **kw)  # noqa: E731
    out = {}

    # agreeing ranks: the values compared at the call (nothing armed) and through the ring
    # (armed, folded into the gather) give the same bits, and the one-process result
    GC.DEPTH = 2
    at_call = la(decay=same)
    GC.LAG_ON_CPU = True
    lagged = la(decay=same)
    out["bitwise"] = torch.equal(at_call, lagged)
    full = [torch.cat([qkv()[i]] * world, dim=1) for i in range(3)]  # every rank holds the same shard
    want = lasp2.linear_attention(*full, decay=same)[:, rank * T:(rank + 1) * T]
    out["one_process"] = torch.allclose(lagged, want, rtol=1e-6, atol=1e-6)
    out["settle_clean"] = value_error(lambda: lasp2.settle_consistency_checks(W))

    # a differing decay: NaN on every rank at this call; the next call is its own (finite)
    # result; the DEPTH-th call raises on every rank, as before
    bad = la(decay=mine)
    out["bad_nan"] = _nan(bad)
    out["next_finite"] = _finite(la())
    out["depth_error"] = value_error(lambda: la())
    out["after_finite"] = _finite(la(decay=same))
    out["after_settle"] = value_error(lambda: lasp2.settle_consistency_checks(W))

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
                settle = value_error(lambda: lasp2.settle_consistency_checks(W))
                o_ok, final_ok = la(decay=same, **kw)
                cases[key] = (_nan(o, final), settle, _finite(o_ok, final_ok))
    out["cases"] = cases

    # with gradients: NaN outputs, and the backward raises before any gradient (the hook)
    q, k, v = qkv(grad=True)
    o = lasp2.linear_attention(q, k, v, decay=mine, group=W)
    out["grad_nan"] = _nan(o.detach())
    out["backward"] = value_error(lambda: o.sum().backward())
    out["no_grad"] = q.grad is None

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
    for key in ("depth_error", "backward"):
        assert results[0][key] == results[1][key], f"{key}: ranks must raise the same error"
    assert results[0]["cases"] == results[1]["cases"]


def _outputs(result):
    return result if isinstance(result, tuple) else (result,)


def _other_providers(rank, world):
    """LASP-1's ring and Ulysses' all-to-alls: the same NaN at the call, the same error
    DEPTH calls later (or at the backward), the same bits as the unlagged check when the
    ranks agree."""
    from lasp2.ops import _group_consistency as GC

    GC.DEPTH = 2
    W = dist.group.WORLD
    heads = 6  # Ulysses shards heads over 2 or 3 ranks
    same = -torch.linspace(0.1, 0.6, heads, dtype=torch.float64)
    mine = same.clone()
    if rank == world - 1:
        mine[1] = -0.35
    full = [torch.cat([qkv(H=heads)[i]] * world, dim=1) for i in range(3)]  # every rank holds the same shard
    want = lasp2.linear_attention(*full, decay=same)[:, rank * T:(rank + 1) * T]
    out = {}
    for provider, splits, states in (("lasp1", ("contiguous", "balanced"), True), ("ulysses", ("contiguous",), False)):
        for split in splits:
            kw = dict(group=W, provider=provider, split=split)
            if states:
                kw["output_final_state"] = True
            call = lambda decay, grad=False: lasp2.linear_attention(*qkv(H=heads, grad=grad), decay=decay, **kw)  # noqa: E731,B023
            r = {}
            GC.LAG_ON_CPU = False  # compared at the call: nothing armed
            at_call = _outputs(call(same))
            GC.LAG_ON_CPU = True
            lagged = _outputs(call(same))
            r["bitwise"] = all(torch.equal(a, b) for a, b in zip(at_call, lagged))
            r["one_process"] = split == "balanced" or torch.allclose(lagged[0], want, rtol=1e-6, atol=1e-6)
            # forward only: NaN at the call (outputs and final states), the error DEPTH calls later
            r["bad_nan"] = _nan(*_outputs(call(mine)))
            r["next_finite"] = _finite(*_outputs(call(None)))
            r["depth_error"] = value_error(lambda: call(None))  # noqa: B023
            r["after_finite"] = _finite(*_outputs(call(same)))
            r["settle"] = value_error(lambda: lasp2.settle_consistency_checks(W))
            # with gradients: NaN outputs, and the backward raises before any gradient
            q, k, v = qkv(H=heads, grad=True)
            o = _outputs(lasp2.linear_attention(q, k, v, decay=mine, **kw))
            r["grad_nan"] = _nan(*(x.detach() for x in o))
            r["backward"] = value_error(lambda: o[0].sum().backward())  # noqa: B023
            r["no_grad"] = q.grad is None
            out[f"{provider}/{split}"] = r
    return out


@pytest.mark.parametrize("world", [2, 3])
def test_lasp1_and_ulysses_give_nan_at_the_call_on_every_rank(world):
    results = assert_all_ok(run_world(world, _other_providers, timeout=300))
    for rank, res in enumerate(results):
        assert set(res) == {"lasp1/contiguous", "lasp1/balanced", "ulysses/contiguous"}
        for key, r in res.items():
            where = f"rank {rank}, {key}"
            assert r["bitwise"], f"{where}: agreeing ranks must get the unlagged check's bits"
            assert r["one_process"], f"{where}: agreeing ranks must get the one-process result"
            assert r["bad_nan"], f"{where}: the call with differing `decay` must return NaN on every rank"
            assert r["next_finite"] and r["after_finite"] and r["settle"] is None, where
            assert "`decay` values" in r["depth_error"] and "earlier call" in r["depth_error"], where
            assert r["grad_nan"] and "backward" in r["backward"] and r["no_grad"], where
    for key in results[0]:
        for field in ("depth_error", "backward"):
            assert len({res[key][field] for res in results}) == 1, f"{key} {field}: ranks must raise the same error"
