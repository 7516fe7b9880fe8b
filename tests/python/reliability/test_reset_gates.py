"""Issue 13.1: a log gate (or decay) of -inf forgets the state, exactly; positive
gates are outside the contract and raise a ValueError naming the argument."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.reference import recurrence_reference
from rel_helpers import assert_all_ok, assert_close_finite, local_rows, run_world

NEG_INF = float("-inf")


def _inputs(B, T, H, D, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(4))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)).to(dtype)
    return q, k, v, do, g


def _grads(fn, leaves, do):
    leaves = [x.detach().clone().requires_grad_() for x in leaves]
    o = fn(*leaves)
    return [o.detach()] + list(torch.autograd.grad(o, leaves, do))


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
# The CPU kernels' chunks are 64 tokens: resets at the first token, inside a chunk, on
# both sides of chunk edges, and at the last token.
@pytest.mark.parametrize("reset_at", [[0], [70], [63, 64, 127], [159]])
def test_minus_inf_gate_is_an_exact_reset(dtype, tol, reset_at):
    q, k, v, do, g = _inputs(2, 160, 2, 4, dtype, seed=sum(reset_at))
    g[0, reset_at, 0] = NEG_INF
    g[1, reset_at[-1], 1] = NEG_INF
    got = _grads(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g), (q, k, v, g), do)
    want = _grads(lambda q, k, v, g: recurrence_reference(q, k, v, g=g), (q.double(), k.double(), v.double(),
                                                                            g.double()), do.double())
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), got, want):
        assert_close_finite(name, a, b, tol)


def test_minus_inf_decay_is_an_exact_reset():
    q, k, v, do, _ = _inputs(1, 140, 3, 4, torch.float64, seed=7)
    decay = torch.tensor([NEG_INF, -0.5, 0.0], dtype=torch.float64)
    got = _grads(lambda q, k, v, d: lasp2.linear_attention(q, k, v, decay=d), (q, k, v, decay), do)
    want = _grads(lambda q, k, v, d: recurrence_reference(q, k, v, decay=d), (q, k, v, decay), do)
    for name, a, b in zip(("o", "dq", "dk", "dv", "ddecay"), got, want):
        assert_close_finite(name, a, b, 1e-10)


def test_huge_negative_finite_gate_does_not_cancel():
    # -1e30 underflows exp to 0 like -inf; summed into a chunk's cumulative decay it
    # would swamp its neighbours' gates
    q, k, v, do, g = _inputs(1, 8, 1, 4, torch.float32, seed=3)
    g[0, 2, 0] = -1e30
    g[0, 5, 0] = -3e38
    o = lasp2.linear_attention(q, k, v, g=g)
    assert_close_finite("o", o, recurrence_reference(q, k, v, g=g), 1e-4)


def _reset_rank(rank, world, provider, split):
    import torch.distributed as dist

    q, k, v, do, g = _inputs(1, 80 * world, 2, 4, torch.float64, seed=11)
    g[0, 3, 0] = NEG_INF  # rank 0's part: the NaN used to cross into later ranks
    g[0, 70, 1] = NEG_INF  # in the second 64-token chunk of rank 0's (contiguous) part
    g[0, 80 * world - 2, 1] = NEG_INF
    want = _grads(lambda q, k, v, g: recurrence_reference(q, k, v, g=g), (q, k, v, g), do)
    local = [lasp2.split_sequence(x, dist.group.WORLD, split=split, dim=1) for x in (q, k, v, g, do)]
    got = _grads(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g, group=dist.group.WORLD, split=split,
                                                           provider=provider),
                 local[:4], local[4])
    for name, a, b in zip(("o", "dq", "dk", "dv", "dg"), got, want):
        assert_close_finite(f"rank {rank} {name}", a,
                            lasp2.split_sequence(b, dist.group.WORLD, split=split, dim=1),
                            1e-6)  # states cross ranks as float32 records
    return True


@pytest.mark.parametrize("provider,split", [("lasp2", "contiguous"), ("lasp2", "balanced"), ("lasp1", "contiguous")])
def test_minus_inf_gate_across_ranks(provider, split):
    assert_all_ok(run_world(2, _reset_rank, provider, split))
