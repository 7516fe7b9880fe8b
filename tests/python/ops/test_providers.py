"""The `provider` option in one process: validation, and that every provider is
the single-device op when there is no group (multi-process: test_providers_distributed.py)."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops.providers import LINEAR_ATTENTION, PROVIDERS, Provider, get_provider, provider_names, register
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


def test_balanced_split_needs_lasp2_or_lasp1():
    q, k, v, _ = inputs(T=12)
    with pytest.raises(ValueError, match="provider 'ulysses' supports split=\"contiguous\" only"):
        lasp2.linear_attention(q, k, v, split="balanced", provider="ulysses")


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


def test_registry_holds_the_vocabulary():
    assert provider_names(LINEAR_ATTENTION) == PROVIDERS
    assert [get_provider("op", LINEAR_ATTENTION, name).name for name in PROVIDERS] == list(PROVIDERS)


def test_provider_checks_name_the_argument():
    get_provider("op", LINEAR_ATTENTION, "lasp2").check("op", heads=3, split="balanced", world_size=4)
    get_provider("op", LINEAR_ATTENTION, "lasp1").check("op", heads=4, split="balanced", world_size=2)
    with pytest.raises(ValueError, match="op: provider 'ulysses' supports split=\"contiguous\" only"):
        get_provider("op", LINEAR_ATTENTION, "ulysses").check("op", heads=4, split="balanced", world_size=2)
    with pytest.raises(ValueError, match=r"the number of heads \(3\) must be divisible by the group size \(2\)"):
        get_provider("op", LINEAR_ATTENTION, "ulysses").check("op", heads=3, split="contiguous", world_size=2)
    get_provider("op", LINEAR_ATTENTION, "ulysses").check("op", heads=3, split="contiguous", world_size=1)


def test_a_new_family_registers_its_providers():
    class Doubling(Provider):
        name = "double"

        def apply(self, x):
            return 2 * x

    family = "test_family_registry"
    provider = register(family, Doubling())
    assert get_provider("op", family, "double") is provider and provider.apply(torch.ones(2)).tolist() == [2, 2]
    assert register(family, provider) is provider  # registering the same object again is a no-op
    with pytest.raises(ValueError, match="already registered"):
        register(family, Doubling())
    with pytest.raises(ValueError, match=r"op: `provider` must be one of \('double',\), got 'triple'"):
        get_provider("op", family, "triple")


def test_op_modules_are_modules():
    import lasp2.ops.linear_attention as linear_module
    import lasp2.ops.softmax_attention as softmax_module

    assert linear_module.linear_attention is lasp2.linear_attention
    assert softmax_module.softmax_attention is lasp2.softmax_attention
