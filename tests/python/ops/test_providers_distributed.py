"""The three SP providers (LASP-2, LASP-1, Ulysses) over several gloo processes.

For every configuration each rank checks, for each provider, its output slice and
its gradients (q, k, v, g or decay) against a single-process run on the full
sequence and against the float64 reference. One set of processes per world size
runs every configuration, the communication-pattern checks and the errors that
need a group.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2.distributed import Collectives, get_communicator
from lasp2_testing.dist import run_distributed
from lasp2_testing.reference import linear_attention_reference
from lasp2_testing.checks import assert_rel, assert_sp_matches, expect_value_error

PROVIDERS = ("lasp2", "lasp1", "ulysses")
CONFIGS = [
    # (mode, with cu_seqlens, dtype, layout)
    ("none", False, torch.float64, "bthd"),
    ("decay", False, torch.float64, "bthd"),
    ("gate", False, torch.float64, "bthd"),
    ("gate", True, torch.float64, "bthd"),
    ("decay", True, torch.float32, "tbhd"),
    ("gate", False, torch.float32, "tbhd"),
    ("none", False, torch.bfloat16, "bthd"),
]


def global_inputs(world, mode, with_docs, dtype, seed, L=67):
    """L tokens a rank (67: the CPU kernels' 64-token chunks end mid-rank, ranks mid-chunk)."""
    gen = torch.Generator().manual_seed(seed)
    B = 1 if with_docs else 2
    T, H, D = L * world, 2 * world, 8  # H % P == 0 for Ulysses
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) / 3 if mode == "gate" else None
    decay = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.3 if mode == "decay" else None
    cu = None
    if with_docs:
        # inside a rank, exactly at a rank edge, a 1-token document, one spanning ranks
        cuts = sorted({3, L, L + 1, T // 2 + 1, T - 1} - {0, T})
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
    to = lambda x: None if x is None else x.to(dtype)
    return [x.to(dtype) for x in (q, k, v, do)] + [to(g), to(decay), cu]


def to_layout(x, layout):
    """[B, T, ...] -> the op's layout."""
    return x.transpose(0, 1).contiguous() if layout == "tbhd" and x is not None and x.dim() > 1 else x


def run_op(q, k, v, g, decay, do, cu, layout, group=None, provider="lasp2", sp_context=None, split="contiguous"):
    """Output and gradients for [B, T, ...] inputs, run in `layout` (over `group`, or as
    `sp_context` says)."""
    leaves = [to_layout(x, layout).detach().requires_grad_() for x in (q, k, v)]
    kw = {}
    if g is not None:
        kw["g"] = to_layout(g, layout).detach().requires_grad_()
        leaves.append(kw["g"])
    if decay is not None:
        kw["decay"] = decay.clone().requires_grad_()
        leaves.append(kw["decay"])
    o = lasp2.linear_attention(*leaves[:3], group=group, layout=layout, cu_seqlens=cu, provider=provider,
                               sp_context=sp_context, split=split, **kw)
    grads = torch.autograd.grad(o, leaves, to_layout(do, layout))
    back = lambda x: x.transpose(0, 1) if layout == "tbhd" and x.dim() > 1 else x
    return back(o), [back(x) for x in grads]


def check_configs(rank, world, group):
    local = lambda x: lasp2.split_sequence(x, group, dim=1)
    for index, (mode, with_docs, dtype, layout) in enumerate(CONFIGS):
        q, k, v, do, g, decay, cu = global_inputs(world, mode, with_docs, dtype, seed=300 + index)
        o_full, grads_full = run_op(q, k, v, g, decay, do, cu, layout)
        ref = linear_attention_reference(q, k, v, g=g, decay=decay, cu_seqlens=cu)
        tol = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        for provider in PROVIDERS:
            where = f"{provider}, config {index} {(mode, with_docs, dtype, layout)}"
            o, grads = run_op(local(q), local(k), local(v), None if g is None else local(g), decay, local(do), cu,
                              layout, group, provider)
            gate = {"gate": "g", "decay": "decay"}.get(mode)
            assert_sp_matches(o, grads, ref, o_full, grads_full, local, gate, tol, where, group)
        if dtype == torch.float64:  # LASP-1's ring also runs the balanced split (up the ranks, back down)
            q, k, v, do, g, decay, cu = global_inputs(world, mode, with_docs, dtype, seed=400 + index, L=34)
            o_full, grads_full = run_op(q, k, v, g, decay, do, cu, layout)
            ref = linear_attention_reference(q, k, v, g=g, decay=decay, cu_seqlens=cu)
            bal = lambda x: lasp2.split_sequence(x, group, split="balanced", dim=1)  # noqa: E731
            o, grads = run_op(bal(q), bal(k), bal(v), None if g is None else bal(g), decay, bal(do), cu, layout,
                              group, "lasp1", split="balanced")
            assert_sp_matches(o, grads, ref, o_full, grads_full, bal, {"gate": "g", "decay": "decay"}.get(mode),
                              tol, f"lasp1 balanced, config {index}", group)


def check_module(rank, world, group):
    """lasp2.nn.LinearAttention passes `provider` through: same output and grads."""
    torch.manual_seed(7)
    x = torch.randn(2, 7 * world, 16 * world, dtype=torch.float64)
    x_local = lasp2.split_sequence(x, group)
    outs = {}
    for provider in PROVIDERS:
        torch.manual_seed(1)
        m = lasp2.nn.LinearAttention(16 * world, 2 * world, decay="gate", group=group,
                                     provider=provider).double()
        xl = x_local.clone().requires_grad_()
        y = m(xl)
        y.square().sum().backward()
        outs[provider] = (y.detach(), xl.grad, m.q_proj.weight.grad, m.g_proj.weight.grad)
    for provider in ("lasp1", "ulysses"):
        for name, got, want in zip(["y", "dx", "dWq", "dWg"], outs[provider], outs["lasp2"]):
            assert_rel(got, want, 1e-5, f"module {provider}: {name}")  # LASP-2 states travel in fp32


def check_communication(rank, world, group):
    """What each provider moves: LASP-1 one send and one recv per interior rank per
    direction, LASP-2 one gather per direction, Ulysses 5 + 5 all-to-alls (with g)."""
    # imported here, not at the top, so that an extension built without the instruments fails
    # this check alone (with the reason) instead of stopping the collection of the whole suite
    try:
        from lasp2 import _bench  # communicator instruments
    except ImportError as exc:
        raise AssertionError("lasp2._bench is not built: build the extension with LASP2_BUILD_BENCH=1 "
                             "(scripts/run_tests.sh does)") from exc
    q, k, v, do, g, _, _ = global_inputs(world, "gate", False, torch.float32, seed=5)
    local = lambda x: lasp2.split_sequence(x, group, dim=1)
    B, T, H, D = q.shape
    state_floats = B * H * D * D
    comm = get_communicator(group, q.device)
    context = lambda **swap: lasp2.build_sp_context(group, seqlen=T, **swap)  # noqa: E731
    hops = int(rank > 0) + int(rank < world - 1)
    sends = {"lasp1": (int(rank < world - 1) + int(rank > 0)) * state_floats * 4,
             # (M, L) and the call check's 4 int64 words (sent by every group call, so every
             # rank's gather has one size) forward, dM backward
             "lasp2": state_floats * 4 + B * H * 4 + 4 * 8 + state_floats * 4}
    calls = {"lasp1": 2 * hops, "lasp2": 2}
    for provider in ("lasp1", "lasp2"):
        timed = _bench.TimedCommunicator(comm)
        run_op(local(q), local(k), local(v), local(g), None, local(do), None, "bthd", provider=provider,
               sp_context=context(communicator=timed))
        assert timed.calls == calls[provider], f"{provider}: {timed.calls} calls, want {calls[provider]}"
        assert timed.bytes == sends[provider], f"{provider}: {timed.bytes} bytes sent, want {sends[provider]}"
        assert timed.seconds > 0

    exchanged = []

    def counting(out, inp, group=None):
        exchanged.append(inp.numel())
        return dist.all_to_all_single(out, inp, group=group)

    run_op(local(q), local(k), local(v), local(g), None, local(do), None, "bthd", provider="ulysses",
           sp_context=context(collectives=Collectives(all_to_all_single=counting)))
    act = B * (T // world) * H * D
    gates = B * (T // world) * H
    assert sorted(exchanged) == sorted([act] * 8 + [gates] * 2), exchanged

    # The no-op communicator moves nothing; rank 0 needs nothing from others in forward.
    noop = context(communicator=_bench.NoopCommunicator(comm))
    for provider in ("lasp1", "lasp2"):
        o, grads = run_op(local(q), local(k), local(v), local(g), None, local(do), None, "bthd", provider=provider,
                          sp_context=noop)
        assert all(torch.isfinite(x).all() for x in [o, *grads])
        if rank == 0:
            want = linear_attention_reference(local(q), local(k), local(v), g=local(g))
            assert_rel(o, want, 1e-4, f"{provider} rank 0 with the no-op communicator")


def check_errors(rank, world, group):
    q = torch.randn(1, 8, world + 1, 4)  # heads not divisible by the group size
    expect_value_error(lambda: lasp2.linear_attention(q, q, q, group=group, provider="ulysses"),
                       "must be divisible by the group size", "ulysses accepted heads not divisible by the group size")
    q = torch.randn(1, 8, 2 * world, 4)
    expect_value_error(lambda: lasp2.linear_attention(q, q, q, group=group, split="balanced", provider="ulysses"),
                       "contiguous\" only", "ulysses accepted the balanced split")
    # ranks that disagree on the provider get an error instead of a hang
    expect_value_error(lambda: lasp2.linear_attention(q, q, q, group=group, provider="lasp1" if rank == 0 else "lasp2"),
                       "disagree on provider", "mismatched providers were not detected")


def check_mixed_requires_grad(rank, world, group):
    """Ulysses: a rank whose k needs no gradient still runs the peers' backward
    all-to-alls (it used to skip dk's and dg's: a hang), and dq, dv are unchanged."""
    q, k, v, do, g, _, _ = global_inputs(world, "gate", False, torch.float64, seed=7, L=16)
    lq, lk, lv, ldo, lg = (lasp2.split_sequence(x, group, dim=1) for x in (q, k, v, do, g))

    def grads(k_needs_grad, g_needs_grad):
        qq, vv = lq.clone().requires_grad_(), lv.clone().requires_grad_()
        kk, gg = lk.clone().requires_grad_(k_needs_grad), lg.clone().requires_grad_(g_needs_grad)
        o = lasp2.linear_attention(qq, kk, vv, g=gg, group=group, provider="ulysses")
        return torch.autograd.grad((o * ldo).sum(), [qq, vv])

    want = grads(True, True)
    got = grads(rank == 0, rank != 0)
    for name, a, b in zip(("dq", "dv"), got, want):
        assert torch.equal(a, b), f"ulysses with mixed requires_grad: {name}"


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))  # a sub-group, as Megatron's CP group would be
    check_configs(rank, world, group)
    check_module(rank, world, group)
    check_communication(rank, world, group)
    check_errors(rank, world, group)
    check_mixed_requires_grad(rank, world, group)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_providers_match_single_process(world):
    run_distributed(world, check_rank)
