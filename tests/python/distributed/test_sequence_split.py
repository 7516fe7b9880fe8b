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
