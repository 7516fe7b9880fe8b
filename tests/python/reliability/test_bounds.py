"""Issue 13.5: out-of-range sizes and wrongly typed numbers/bools are rejected with
an error naming the argument, before anything reaches the C++ core."""

import pytest
import torch

import lasp2


def _qkv(T=8):
    return tuple(torch.randn(1, T, 2, 4) for _ in range(3))


def _raises(match, fn, *args, **kwargs):
    with pytest.raises((ValueError, TypeError), match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("op", [lasp2.linear_attention, lasp2.softmax_attention])
@pytest.mark.parametrize("scale", [True, False, "0.5", torch.tensor(0.5), float("nan"), float("-inf")])
def test_scale_must_be_a_finite_float(op, scale):
    _raises("`scale`", op, *_qkv(), scale=scale)


@pytest.mark.parametrize("value", ["no", 0, 1, "True"])
def test_softmax_causal_must_be_a_bool(value):
    _raises("`causal`", lasp2.softmax_attention, *_qkv(), causal=value)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rank=2, world_size=2), "`rank`"),
    (dict(rank=-1, world_size=2), "`rank`"),
    (dict(rank=0, world_size=0), "`world_size`"),
    (dict(rank=True, world_size=2), "`rank`"),
    (dict(rank=0, world_size=2.0), "`world_size`"),
    (dict(rank=0), "`rank` and `world_size`"),
    (dict(dim=4), "`dim`"),
    (dict(dim=-5), "`dim`"),
    (dict(dim=True), "`dim`"),
    (dict(dim=1.0), "`dim`"),
    (dict(split="halves"), "split"),
])
def test_split_sequence_checks(kwargs, match):
    _raises(match, lasp2.split_sequence, torch.randn(1, 8, 2, 4), **kwargs)


def test_split_sequence_negative_dim_is_python_style():
    x = torch.arange(8.0).view(1, 8)
    assert lasp2.split_sequence(x, dim=-1, rank=1, world_size=2).tolist() == [[4.0, 5.0, 6.0, 7.0]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(local_len=-1, rank=0, world_size=1), "`local_len`"),
    (dict(local_len=4, rank=1, world_size=1), "`rank`"),
    (dict(local_len=4, rank=0, world_size=-2), "`world_size`"),
])
def test_global_token_index_checks(kwargs, match):
    _raises(match, lasp2.global_token_index, **kwargs)


def test_gather_sequence_checks():
    _raises("`dim`", lasp2.gather_sequence, torch.randn(2, 3), dim=2)
    _raises("`x`", lasp2.gather_sequence, [1, 2], dim=0)
