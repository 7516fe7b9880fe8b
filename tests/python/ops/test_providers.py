"""The `provider` option in one process: validation, and that every provider is
the single-device op when there is no group (multi-process: test_providers_distributed.py)."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops.providers import PROVIDERS
from lasp2_testing.reference import linear_attention_reference


def inputs(B=2, T=11, H=3, D=4, dtype=torch.float64):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=dtype) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=dtype)) / 4
    return q, k, v, g


def test_provider_names():
    assert PROVIDERS == ("lasp2", "lasp1", "ulysses")


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_provider_is_the_plain_op_without_a_group(provider):
    q, k, v, g = inputs()
    o = lasp2.linear_attention(q, k, v, g=g, provider=provider)
    torch.testing.assert_close(o, linear_attention_reference(q, k, v, g=g), rtol=1e-10, atol=1e-12)


def test_unknown_provider():
    q, k, v, _ = inputs()
    with pytest.raises(ValueError, match=r"`provider` must be one of \('lasp2', 'lasp1', 'ulysses'\), got 'ring'"):
        lasp2.linear_attention(q, k, v, provider="ring")


@pytest.mark.parametrize("provider", ["lasp1", "ulysses"])
def test_balanced_split_needs_lasp2(provider):
    q, k, v, _ = inputs(T=12)
    with pytest.raises(ValueError, match=f"provider '{provider}' supports split=\"contiguous\" only"):
        lasp2.linear_attention(q, k, v, split="balanced", provider=provider)


def test_module_provider():
    torch.manual_seed(0)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    ys = []
    for provider in PROVIDERS:
        torch.manual_seed(1)
        m = lasp2.nn.LinearAttention(16, 2, provider=provider).double()
        assert m.provider == provider
        ys.append(m(x))
    for y in ys[1:]:
        torch.testing.assert_close(y, ys[0])
    with pytest.raises(ValueError, match="`provider` must be one of"):
        lasp2.nn.LinearAttention(16, 2, provider="ring")
