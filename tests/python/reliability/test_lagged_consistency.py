"""Issue 13.3, the default per-call check (lasp2/ops/_group_consistency.py, "auto"; the C++
GroupCheck of csrc/torch/group_check.h): sizes, options and host values are compared at
the call; device values (decay bits, positive gates) are staged into a ring and compared
DEPTH calls later on the group, or at the backward of the call's outputs, which on CUDA
keeps the host from waiting for the GPU's queue. Forced onto CPU tensors over gloo here
(LAG_ON_CPU, DEPTH = 2): every rank raises the same ValueError at the same point, nobody
hangs, no gradient of a call with uncompared values is computed, and the group stays
usable."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.lagged import qkv, value_error
from rel_helpers import assert_all_ok, run_world


def _scenarios(rank, world):
    from lasp2.ops import _group_consistency as GC

    GC.LAG_ON_CPU, GC.DEPTH = True, 2
    W = dist.group.WORLD
    out = {}
    same = torch.tensor([-0.1, -0.2], dtype=torch.float64)
    mine = torch.tensor([-0.1, -0.2 if rank == 0 else -0.3], dtype=torch.float64)
    la = lambda **kw: lasp2.linear_attention(*qkv(), group=W, **kw)  # noqa: E731

    # agreeing calls: one exchange each, no error; the result is the one-device result
    GC.STATS.update(sync=0)
    q, k, v = qkv()
    o = lasp2.linear_attention(q, k, v, decay=same, group=W)
    la(decay=same)
    out["exchanges"] = GC.STATS["sync"]
    full = [torch.cat([qkv(seed=0)[i]] * world, dim=1) for i in range(3)]  # every rank holds the same shard
    want = lasp2.linear_attention(*full, decay=same)[:, rank * 8:(rank + 1) * 8]
    out["value_ok"] = torch.allclose(o, want, rtol=1e-6, atol=1e-6)  # SP vs one device: 1e-7 either mode

    # differing decay values: the call returns, and so does the next; the DEPTH-th call
    # after it raises on every rank (calls without device values count too)
    out["decay_call"] = value_error(lambda: la(decay=mine))
    out["decay_next"] = value_error(lambda: la())
    out["decay_depth"] = value_error(lambda: la())
    out["after_decay"] = value_error(lambda: la(decay=same))  # usable again (and this call's values agree)

    # ... or the backward of its outputs raises, before the op's backward
    q, k, v = qkv(grad=True)
    o = lasp2.linear_attention(q, k, v, decay=mine, group=W)
    GC.LAGGED_SETTLES[0] = 0
    out["decay_backward"] = value_error(lambda: o.sum().backward())
    out["no_grad_reached"] = q.grad is None
    out["settles"] = GC.LAGGED_SETTLES[0]
    out["after_backward"] = value_error(lambda: la())

    # agreeing values, backward: the first hook sends every waiting entry in one exchange,
    # the second hook finds its values sent
    q, k, v = qkv(grad=True)
    o1 = lasp2.linear_attention(q, k, v, decay=same, group=W)
    o2 = lasp2.linear_attention(q, k, v, decay=same, group=W)
    GC.LAGGED_SETTLES[0] = 0
    (o1.sum() + o2.sum()).backward()
    out["clean_backward_settles"] = GC.LAGGED_SETTLES[0]
    out["grad_finite"] = bool(torch.isfinite(q.grad).all())

    # a flag (a positive gate on a device) raised on one rank: named, with the rank
    def flagged(value):
        return GC.verify_group_consistency("lasp2.test_op", W, [1, 2], ["a", "b"], torch.device("cpu"),
                                           flags=[("`g` holds positive log gates", torch.tensor(value))])
    flagged(False)
    out["flag_call"] = value_error(lambda: flagged(rank == 1))
    out["flag_next"] = value_error(lambda: flagged(False))
    out["flag_depth"] = value_error(lambda: flagged(False))

    # a size disagreement while values wait: raised at the call; the waiting values are
    # dropped on every rank, so the backward of their outputs raises instead of running
    q, k, v = qkv(grad=True)
    o = lasp2.linear_attention(q, k, v, decay=same, group=W)
    out["sizes"] = value_error(lambda: lasp2.linear_attention(*qkv(T=8 if rank == 0 else 4), group=W))
    out["lost_backward"] = value_error(lambda: o.sum().backward())
    out["lost_no_grad"] = q.grad is None
    out["after_sizes"] = value_error(lambda: la())

    # a rank whose own argument check fails while values wait: everybody raises, then works
    la(decay=same)
    out["local_failure"] = value_error(lambda: la(scale="x" if rank == 0 else None))
    out["after_failure"] = value_error(lambda: la())

    # a forward-only run's last calls: settle_consistency_checks compares what waits
    with torch.no_grad():
        la(decay=mine)
    out["settle_mismatch"] = value_error(lambda: lasp2.settle_consistency_checks(W))
    out["settle_again"] = value_error(lambda: lasp2.settle_consistency_checks(W))  # nothing waits
    with torch.no_grad():
        la(decay=same)
    out["settle_clean"] = value_error(lambda: lasp2.settle_consistency_checks())
    return out


def test_device_values_are_compared_depth_calls_later_on_every_rank():
    results = assert_all_ok(run_world(2, _scenarios, timeout=240))
    r0, r1 = results[0], results[1]
    assert r0["exchanges"] == r1["exchanges"] == 2  # one collective per call
    assert r0["value_ok"] and r1["value_ok"]
    for r in (r0, r1):
        assert r["decay_call"] is None and r["decay_next"] is None
        assert "`decay` values" in r["decay_depth"] and "earlier call" in r["decay_depth"]
        assert r["after_decay"] is None
        assert "`decay` values" in r["decay_backward"] and "backward" in r["decay_backward"]
        assert r["no_grad_reached"] and r["settles"] == 1
        assert r["after_backward"] is None
        assert r["clean_backward_settles"] == 1 and r["grad_finite"]
        assert r["flag_call"] is None and r["flag_next"] is None
        assert "positive log gates (on rank(s) [1]" in r["flag_depth"]
        assert "local sequence length" in r["sizes"]
        assert "never compared" in r["lost_backward"] and r["lost_no_grad"]
        assert r["after_sizes"] is None
        assert r["after_failure"] is None
        assert "`decay` values" in r["settle_mismatch"] and "earlier call" in r["settle_mismatch"]
        assert r["settle_again"] is None and r["settle_clean"] is None
    for key in ("decay_depth", "decay_backward", "flag_depth", "sizes", "lost_backward", "settle_mismatch"):
        assert r0[key] == r1[key], f"{key}: ranks must raise the same error"
    assert "`scale`" in r0["local_failure"] and "rejected their arguments" in r1["local_failure"]


def test_settle_rejects_a_group_that_is_not_one():
    with pytest.raises(ValueError, match="settle_consistency_checks: `group` must be a torch.distributed"):
        lasp2.settle_consistency_checks("WORLD")
    lasp2.settle_consistency_checks()  # nothing waits in this process: a no-op


def _differing_initial_state(rank, world):
    """linear_attention's initial_state is a device value: under the lag (CUDA, here
    LAG_ON_CPU) copies that differ between ranks are compared DEPTH calls later, like decay."""
    from lasp2.ops import _group_consistency as GC

    GC.LAG_ON_CPU, GC.DEPTH = True, 2
    W = dist.group.WORLD
    same = torch.full((1, 2, 4, 4), 0.5, dtype=torch.float64)
    mine = same.clone()
    mine[0, 1, 2, 3] += rank  # rank 1's copy differs in one element
    la = lambda **kw: lasp2.linear_attention(*qkv(), group=W, **kw)  # noqa: E731
    out = {"agree": value_error(lambda: la(initial_state=same))}
    out["call"] = value_error(lambda: la(initial_state=mine))
    out["next"] = value_error(lambda: la())
    out["depth"] = value_error(lambda: la())
    out["after"] = value_error(lambda: la(initial_state=same))
    GC.STATS.update(sync=0)
    la(initial_state=same)
    out["exchanges"] = GC.STATS["sync"]  # one exchange a call: no extra read of the state
    return out


def test_initial_state_copies_are_compared_as_device_values():
    r0, r1 = assert_all_ok(run_world(2, _differing_initial_state, timeout=120))
    for r in (r0, r1):
        assert r["agree"] is None and r["call"] is None and r["next"] is None and r["after"] is None
        assert "`initial_state` values" in r["depth"] and "earlier call" in r["depth"]
        assert r["exchanges"] == 1
    assert r0["depth"] == r1["depth"]
