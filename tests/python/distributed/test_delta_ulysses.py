"""provider="ulysses" of lasp2.gated_delta_rule / lasp2.kda over P = 2 and 4 gloo
processes equals one process (itself checked against the float64 recurrence in
ops/test_gated_delta_rule.py).

Every rank checks its output rows, its q/k/v/g/beta gradients, the final states and
the summed initial-state gradient against a one-process run on the whole sequence
(float64, 1e-5 relative), for both splits, GDN and KDA gates, B > 1 rows and packed
documents of uneven lengths that span ranks, initial states in and final states out
(H = 4 heads, so P = 4 leaves one head a rank). Also: the "tbhd" layout with
use_qk_l2norm, a call without states, final states that only some ranks' losses use,
the number of all-to-alls through an SPContext's collectives, and ranks that raise
together: heads not divisible by P, bad gates on one rank, ranks passing different
providers.
"""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.distributed.collectives import TORCH_COLLECTIVES, Collectives
from lasp2_testing.checks import assert_rel, expect_value_error
from lasp2_testing.delta_inputs import check_ranks_equal_one_process, delta_rule_inputs
from lasp2_testing.dist import run_distributed

H = 4

# (kind, split, packed)
CONFIGS = [
    ("gdn", "contiguous", True),
    ("gdn", "balanced", False),
    ("kda", "balanced", True),
    ("kda", "contiguous", False),
]


def global_inputs(world, kind, packed, seed):
    return delta_rule_inputs(world, kind, packed, seed, heads=H, tokens_per_rank=8)  # 4-token parts when balanced


def _op(kind):
    return lasp2.kda if kind == "kda" else lasp2.gated_delta_rule


def check_config(rank, world, group, kind, split, packed, seed):
    inputs = global_inputs(world, kind, packed, seed)
    what = f"ulysses P={world} {kind} {split} packed={packed} rank {rank}"
    check_ranks_equal_one_process(_op(kind), inputs, group, rank, world, split, "ulysses", what)


def check_variants(rank, world, group):
    """"tbhd" with use_qk_l2norm and no states (final None); then final states asked for
    that only rank 0's loss uses (the others get zero gradients and still make the same
    collectives); gradients equal one process's."""
    q, k, v, do, g, beta, cu, h0, dF = global_inputs(world, "kda", False, seed=40)
    full = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    o_full, _ = lasp2.kda(*full, use_qk_l2norm=True)
    grads_full = torch.autograd.grad((o_full * do).sum(), full)
    tb = lambda x: lasp2.split_sequence(x, group, split="balanced", dim=1).transpose(0, 1)  # noqa: E731
    leaves = [tb(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
    o, final = lasp2.kda(*leaves, use_qk_l2norm=True, layout="tbhd", group=group, split="balanced",
                         provider="ulysses")
    assert final is None
    what = f"ulysses P={world} tbhd l2norm rank {rank}"
    assert_rel(o, tb(o_full), 1e-5, f"o, {what}")
    for name, got, want in zip(("q", "k", "v", "g", "beta"), torch.autograd.grad((o * tb(do)).sum(), leaves),
                               grads_full):
        assert_rel(got, tb(want), 1e-5, f"d{name}, {what}")

    q, k, v, do, g, beta, cu, h0, dF = global_inputs(world, "gdn", True, seed=41)
    full = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    o_full, final_full = lasp2.gated_delta_rule(*full, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    grads_full = torch.autograd.grad((o_full * do).sum() + (final_full * dF).sum(), full)
    local = lambda x: lasp2.split_sequence(x, group, dim=1)  # noqa: E731
    leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
    o, final = lasp2.gated_delta_rule(*leaves, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                      group=group, provider="ulysses")
    loss = (o * local(do)).sum() + ((final * dF).sum() if rank == 0 else 0)
    for name, got, want in zip(("q", "k", "v", "g", "beta"), torch.autograd.grad(loss, leaves), grads_full):
        assert_rel(got, local(want), 1e-5, f"d{name}, final states in rank 0's loss only, rank {rank}")


def check_collectives(rank, world, group):
    """Through an SPContext's collectives: 3 all-to-alls forward (q|k|v, g|beta, o) and 3
    backward (dO, dq|dk|dv, dg|dbeta), one AllGather of final states forward and one
    ReduceScatter of their gradients backward."""
    counts = {"all_to_all_single": 0, "all_gather_single": 0, "reduce_scatter_single": 0}

    def counted(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return getattr(TORCH_COLLECTIVES, name)(*args, **kwargs)
        return call

    q, k, v, do, g, beta, cu, h0, dF = global_inputs(world, "gdn", True, seed=42)
    ctx = lasp2.build_sp_context(group, split="balanced", cu_seqlens=cu,
                                 collectives=Collectives(**{name: counted(name) for name in counts}))
    local = lambda x: lasp2.split_sequence(x, group, split="balanced", dim=1)  # noqa: E731
    leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
    o, final = lasp2.gated_delta_rule(*leaves, initial_state=h0, output_final_state=True, provider="ulysses",
                                      sp_context=ctx)
    assert counts == {"all_to_all_single": 3, "all_gather_single": 1, "reduce_scatter_single": 0}, counts
    ((o * local(do)).sum() + (final * dF).sum()).backward()
    assert counts == {"all_to_all_single": 6, "all_gather_single": 1, "reduce_scatter_single": 1}, counts
    o_full, _ = lasp2.gated_delta_rule(q, k, v, g, beta, initial_state=h0, cu_seqlens=cu)
    assert_rel(o, local(o_full), 1e-5, f"o through an SPContext, rank {rank}")




def check_errors(rank, world, group):
    """Ranks raise together (no rank left in a collective)."""
    heads = 3 if world == 2 else 6
    q = torch.randn(1, 4, heads, 4, dtype=torch.float64)
    g = -torch.rand(1, 4, heads, dtype=torch.float64)
    beta = torch.rand(1, 4, heads, dtype=torch.float64)
    expect_value_error(lambda: lasp2.gated_delta_rule(q, q, q, g, beta, group=group, provider="ulysses"),
                        f"provider=\"ulysses\" shards heads over the group: the number of heads ({heads}) must be "
                        f"divisible by the group size ({world})", f"heads {heads}, rank {rank}")
    # bad gate values on one rank: checked before the all-to-alls; that rank names `g`
    q = torch.randn(1, 4, H, 4, dtype=torch.float64)
    g = -torch.rand(1, 4, H, dtype=torch.float64)
    beta = torch.rand(1, 4, H, dtype=torch.float64)
    expect_value_error(
        lambda: lasp2.gated_delta_rule(q, q, q, g.abs() + 0.1 if rank == 1 else g, beta, group=group,
                                       provider="ulysses"),
        "`g` holds log gates" if rank == 1 else "rejected their arguments", f"bad g on rank 1, rank {rank}")
    # ranks passing different providers: the per-call cross-rank check names it
    expect_value_error(
        lambda: lasp2.gated_delta_rule(q, q, q, g, beta, group=group, provider="ulysses" if rank else "lasp2"),
        "disagree on provider", f"providers differ, rank {rank}")
    # and the group still works afterwards
    o, _ = lasp2.gated_delta_rule(q, q, q, g, beta, group=group, provider="ulysses")
    assert o.shape == q.shape


def check_compiled(rank, world, group):
    """torch.compile without fullgraph: the provider's call breaks the graph (its checks
    read values on the host) and equals eager bit for bit."""
    q, k, v, do, g, beta, _, _, _ = global_inputs(world, "gdn", False, seed=31)
    local = [lasp2.split_sequence(x, group, dim=1) for x in (q, k, v, do, g, beta)]

    def loss(q, k, v, g, beta):
        o, _ = lasp2.gated_delta_rule(q, k, v, g, beta, group=group, provider="ulysses")
        return (o * local[3]).sum()

    def values_and_grads(fn):
        leaves = [x.clone().requires_grad_() for x in (local[0], local[1], local[2], local[4], local[5])]
        out = fn(*leaves)
        return [out.detach(), *torch.autograd.grad(out, leaves)]

    got = values_and_grads(torch.compile(loss, backend="aot_eager"))
    want = values_and_grads(loss)
    for name, a, b in zip(("loss", "q", "k", "v", "g", "beta"), got, want):
        assert torch.equal(a, b), f"compiled ulysses: {name} differs from eager"


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))
    for index, (kind, split, packed) in enumerate(CONFIGS):
        check_config(rank, world, group, kind, split, packed, seed=10 + index)
    check_errors(rank, world, group)
    if world == 2:
        check_variants(rank, world, group)
        check_collectives(rank, world, group)
        check_compiled(rank, world, group)


@pytest.mark.parametrize("world", [2, 4])
def test_ulysses_equals_one_process(world):
    run_distributed(world, check_rank)


def test_one_device_is_the_plain_op():
    """No group: provider="ulysses" is the single-device op (as every provider)."""
    q, k, v, _, g, beta, cu, h0, _ = global_inputs(2, "kda", True, seed=5)
    o, final = lasp2.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                         provider="ulysses")
    o_ref, final_ref = lasp2.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert torch.equal(o, o_ref) and torch.equal(final, final_ref)


def check_keep_flag(rank, world):
    """What the single-device op is told about a following backward (its `keep`: the
    CUDA forward then holds its chunked outputs, about a GB a part at 64K tokens): yes
    with grad mode on and an input needing a gradient, no under torch.no_grad() even
    when leaves need gradients, as lasp2.gated_delta_rule's own rule (delta_rule) says."""
    from lasp2.ops.providers import ulysses_delta

    group = dist.group.WORLD
    q, k, v, _, g, beta, _, _, _ = global_inputs(world, "gdn", False, 5)
    local = lambda x: lasp2.split_sequence(x, group, split="contiguous", dim=1)  # noqa: E731
    seen = []
    real = ulysses_delta._forward_impl

    def spy(*args, keep=True, **kw):
        seen.append(keep)
        return real(*args, keep=keep, **kw)

    ulysses_delta._forward_impl = spy
    try:
        leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
        run = lambda xs: lasp2.gated_delta_rule(*xs, group=group, provider="ulysses")  # noqa: E731
        o_grad, _ = run(leaves)
        with torch.no_grad():
            o_nograd, _ = run(leaves)
        run([x.detach() for x in leaves])
    finally:
        ulysses_delta._forward_impl = real
    assert seen == [True, False, False], seen
    assert torch.equal(o_grad.detach(), o_nograd)


def test_keep_only_when_a_backward_can_follow():
    run_distributed(2, check_keep_flag)
