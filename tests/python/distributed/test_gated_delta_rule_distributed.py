"""lasp2.gated_delta_rule / lasp2.kda over P = 2, 3, 4 gloo processes equal one process
(itself checked against the float64 recurrence in ops/test_gated_delta_rule.py), with
provider="lasp2" and provider="lasp1" (the ring, states included), and compiled with
torch.compile(fullgraph=True) over a group of 2.

Every rank checks its output rows, its q/k/v/g/beta gradients and the final states
against a one-process run on the whole sequence (float64, 1e-5 relative: the part
summaries travel in fp32), for both splits, GDN and KDA gates, B > 1 rows and
packed documents of uneven lengths that span ranks, with initial states in and
final states out, and full resets (-inf log gates) on and inside parts. Final states are replicated: each rank adds its own gradient to
them; initial-state gradients are per-rank shares that sum to one process's.
"""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.checks import assert_rel
from lasp2_testing.compiled import assert_compiled_matches_eager
from lasp2_testing.delta_inputs import check_ranks_equal_one_process, delta_rule_inputs
from lasp2_testing.dist import run_distributed

# (kind, split, packed)
CONFIGS = [
    ("gdn", "contiguous", False),
    ("gdn", "balanced", True),
    ("kda", "contiguous", True),
    ("kda", "balanced", False),
    ("gdn", "contiguous", True),
]


def global_inputs(world, kind, packed, seed, resets=False):
    inputs = delta_rule_inputs(world, kind, packed, seed, heads=2, tokens_per_rank=12)  # 6-token parts when balanced
    if resets:  # full resets (log gate -inf) on the first token of rank 1's part, mid-part and at the end
        g = inputs[4]
        T = g.shape[1]
        for t in (0, 5, 12, T // 2 + 3, T - 1):
            g[:, t, 0] = float("-inf")  # head 0; for KDA every key dim of it
    return inputs


# full resets: (kind, split, packed) checked with -inf gates by provider "lasp2"
RESET_CONFIGS = [
    ("gdn", "balanced", True),
    ("kda", "contiguous", False),
]


# LASP-1 (the ring of the same summaries in global part order) with the same states
LASP1_CONFIGS = [
    ("gdn", "contiguous", True),
    ("kda", "balanced", True),
    ("gdn", "balanced", False),
    ("kda", "contiguous", False),
]


def check_config(rank, world, group, provider, kind, split, packed, seed, resets=False):
    op = lasp2.kda if kind == "kda" else lasp2.gated_delta_rule
    inputs = global_inputs(world, kind, packed, seed=seed, resets=resets)
    what = f"{provider} P={world} {kind} {split} packed={packed} resets={resets} rank {rank}"
    check_ranks_equal_one_process(op, inputs, group, rank, world, split, provider, what)


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))
    for index, (kind, split, packed) in enumerate(CONFIGS):
        check_config(rank, world, group, "lasp2", kind, split, packed, seed=10 + index)
    for index, (kind, split, packed) in enumerate(LASP1_CONFIGS):
        check_config(rank, world, group, "lasp1", kind, split, packed, seed=20 + index)
    for index, (kind, split, packed) in enumerate(RESET_CONFIGS):
        check_config(rank, world, group, "lasp2", kind, split, packed, seed=40 + index, resets=True)
    check_without_states(rank, world, group)
    if world == 2:
        check_mismatch(rank, world)
        check_compiled(rank, world, group)


# without sequence states: (kind, packed, split, provider). LASP-2 with B = 1 (packed) and
# the balanced split runs a rank's two parts as one batch of two rows (delta_rule/delta_pair.h).
NO_STATE_CONFIGS = [
    ("gdn", False, "contiguous", "lasp1"),
    ("kda", True, "balanced", "lasp1"),
    ("gdn", True, "balanced", "lasp2"),
    ("kda", True, "balanced", "lasp2"),
]


def check_without_states(rank, world, group):
    """Without sequence states each provider equals one process, GDN and KDA, rows and
    packed documents, both splits."""
    for index, (kind, packed, split, provider) in enumerate(NO_STATE_CONFIGS):
        op = lasp2.kda if kind == "kda" else lasp2.gated_delta_rule
        q, k, v, do, g, beta, cu, _, _ = global_inputs(world, kind, packed, seed=30 + index)
        full = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
        o_full, _ = op(*full, scale=0.8, cu_seqlens=cu)
        grads_full = torch.autograd.grad((o_full * do).sum(), full)
        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)
        leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
        o, final = op(*leaves, scale=0.8, cu_seqlens=cu, group=group, split=split, provider=provider)
        what = f"{provider} P={world} {kind} packed={packed} {split} rank {rank}"
        assert final is None
        assert_rel(o, local(o_full), 1e-5, f"o, {what}")
        for name, got, want in zip(("q", "k", "v", "g", "beta"), torch.autograd.grad((o * local(do)).sum(), leaves),
                                   grads_full):
            assert_rel(got, local(want), 1e-5, f"d{name}, {what}")


@pytest.mark.parametrize("world", [2, 3, 4])
def test_ranks_equal_one_process(world):
    run_distributed(world, check_rank)


def check_mismatch(rank, world):
    """Ranks that call with different local lengths all raise (instead of hanging)."""
    q = torch.randn(1, 8 + 2 * rank, 2, 4, dtype=torch.float64)
    g = -torch.rand(1, q.shape[1], 2, dtype=torch.float64)
    beta = torch.rand(1, q.shape[1], 2, dtype=torch.float64)
    try:
        lasp2.gated_delta_rule(q, q, q, g, beta, group=dist.group.WORLD)
    except ValueError as e:
        assert "local sequence length" in str(e), str(e)
    else:
        raise AssertionError("ranks with different lengths must all raise")
    # bad gate values on one rank (checked inside the custom op): that rank names `g`,
    # the others raise too instead of waiting in a collective
    q = torch.randn(1, 8, 2, 4, dtype=torch.float64)
    g = -torch.rand(1, 8, 2, dtype=torch.float64)
    beta = torch.rand(1, 8, 2, dtype=torch.float64)
    try:
        lasp2.gated_delta_rule(q, q, q, g.abs() + 0.1 if rank == 0 else g, beta, group=dist.group.WORLD)
    except ValueError as e:
        want = "`g` holds log gates" if rank == 0 else "rejected their arguments"
        assert want in str(e), str(e)
    else:
        raise AssertionError("a rank with positive gates must make every rank raise")


def check_compiled(rank, world, group):
    """torch.compile(fullgraph=True) over the group: the custom op with its communicator
    handle, with states; LASP-1 (KDA, balanced split, rows) and LASP-2 (GDN, packed
    documents spanning ranks: cu_seqlens enters the graph as a tensor); output, final
    state and every gradient (initial_state's included) equal eager."""
    for kind, packed, split, provider in (("kda", False, "balanced", "lasp1"), ("gdn", True, "contiguous", "lasp2")):
        q, k, v, do, g, beta, cu, h0, dF = global_inputs(world, kind, packed, seed=50)
        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)  # noqa: E731
        inputs = [local(x) for x in (q, k, v, g, beta)] + [h0]
        op = lasp2.kda if kind == "kda" else lasp2.gated_delta_rule

        def f(q, k, v, g, beta, h0):
            o, final = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, group=group, split=split,
                          provider=provider, cu_seqlens=cu)
            return (o * local(do)).sum() + (final * dF).sum()

        assert_compiled_matches_eager(
            f, inputs, ("q", "k", "v", "g", "beta", "initial_state"),
            compare=lambda name, a, b: assert_rel(a, b, 1e-12, f"compiled {kind} {provider} d{name}, rank {rank}"))
