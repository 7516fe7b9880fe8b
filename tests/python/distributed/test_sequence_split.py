"""split_sequence / gather_sequence / global_token_index."""

import pytest
import torch

import lasp2


@pytest.mark.parametrize("split", ["contiguous", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_ranks_cover_the_sequence_once(split, world):
    T = 8 * world
    x = torch.arange(T).view(1, T, 1)
    pieces = [lasp2.split_sequence(x, split=split, rank=r, world_size=world) for r in range(world)]
    seen = torch.cat([p.flatten() for p in pieces]).sort().values
    assert torch.equal(seen, torch.arange(T))
    for r, piece in enumerate(pieces):
        assert torch.equal(piece.flatten(), lasp2.global_token_index(T // world, r, world, split))


def test_balanced_split_pairs_early_and_late_parts():
    index = lasp2.global_token_index(4, rank=0, world_size=2, split="balanced")
    assert index.tolist() == [0, 1, 6, 7]
    index = lasp2.global_token_index(4, rank=1, world_size=2, split="balanced")
    assert index.tolist() == [2, 3, 4, 5]


def test_indivisible_length_is_rejected():
    with pytest.raises(ValueError, match="must divide into 4 equal parts"):
        lasp2.split_sequence(torch.zeros(1, 6, 1), split="balanced", rank=0, world_size=2)


def test_unknown_split():
    with pytest.raises(ValueError, match="split must be one of"):
        lasp2.split_sequence(torch.zeros(1, 4, 1), split="zigzag", rank=0, world_size=2)


@pytest.mark.parametrize("fn", [lasp2.split_sequence, lasp2.gather_sequence])
def test_a_group_that_is_not_one_is_named(fn):
    """A string, or the int new_group hands a process outside the group, used to surface
    as torch's "Default process group has not been initialized" or as "`world_size`
    must be >= 1, got -1" (an argument the caller never passed)."""
    with pytest.raises(ValueError, match="`group` must be a torch.distributed ProcessGroup or None, got str"):
        fn(torch.zeros(1, 4, 1), "world")


def _loss_of_the_gathered_sequence(y):
    """A loss that mixes tokens (a causal running sum), the same on every rank."""
    w = torch.linspace(-1.0, 2.0, y.shape[1], dtype=y.dtype).view(1, -1, 1)
    return (y.cumsum(dim=1).square() * w).sum()


def _problem():
    gen = torch.Generator().manual_seed(7)
    a = torch.randn(2, 24, 3, generator=gen, dtype=torch.float64)
    theta = torch.randn(3, generator=gen, dtype=torch.float64)
    return a, theta


def _gather_gradient_rank(rank, world_size, split):
    import torch.distributed as dist

    a, theta0 = _problem()
    theta = theta0.clone().requires_grad_()
    x = lasp2.split_sequence(a, split=split, rank=rank, world_size=world_size) * theta
    x.retain_grad()
    _loss_of_the_gathered_sequence(lasp2.gather_sequence(x, dist.group.WORLD, split=split)).backward()

    theta_ref = theta0.clone().requires_grad_()
    x_ref = a * theta_ref
    x_ref.retain_grad()
    _loss_of_the_gathered_sequence(x_ref).backward()
    # this rank's rows of the one-process gradient, and theta's gradient summed over the group
    own = lasp2.split_sequence(x_ref.grad, split=split, rank=rank, world_size=world_size)
    torch.testing.assert_close(x.grad, own, rtol=1e-12, atol=1e-12)
    summed = theta.grad.clone()
    dist.all_reduce(summed)
    torch.testing.assert_close(summed, theta_ref.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("split,world", [("contiguous", 3), ("balanced", 2)])
def test_gather_sequence_passes_each_rank_its_rows_of_the_gradient(split, world):
    """A loss computed from the gathered sequence on every rank: summed over the group, the
    parameters' gradients are one process's (a group of more than one rank used to return a
    tensor with no gradient, while a group of one passed it)."""
    from lasp2_testing.dist import run_distributed

    run_distributed(world, _gather_gradient_rank, split)
