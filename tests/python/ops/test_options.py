"""lasp2.options: one vocabulary, one meaning per word; the gate and norm helpers."""

import pytest
import torch

import lasp2
from lasp2.nn.norms import rms_norm
from lasp2.ops.gates import gate_from_logits
from lasp2.options import FEATURE_MAPS, LAYER_LETTERS, PROVIDERS, SPLITS, parse_layer_pattern


def test_choice_sets():
    assert PROVIDERS == ("lasp2", "lasp1", "ulysses")
    assert SPLITS == ("contiguous", "balanced")
    assert set(LAYER_LETTERS) == {"L", "S", "G", "K"}


def test_elu_means_elu_plus_one():
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    torch.testing.assert_close(FEATURE_MAPS["elu"](x), torch.where(x > 0, x + 1, x.exp()))
    assert (FEATURE_MAPS["elu"](x) > 0).all()


def test_parse_layer_pattern():
    assert parse_layer_pattern("LLLS") == ["L", "L", "L", "S"]
    assert parse_layer_pattern("GLS") == ["G", "L", "S"]
    assert parse_layer_pattern("KKKS") == ["K", "K", "K", "S"]
    for bad in ("", "LXS", "lls", None, ["L"]):
        with pytest.raises(ValueError, match="`hybrid_pattern` must be a non-empty string of layer letters"):
            parse_layer_pattern(bad, name="hybrid_pattern")


def test_hybrid_stack_names_every_letter_in_its_error():
    with pytest.raises(ValueError, match=r"'G' gated DeltaNet.*'K' Kimi Delta Attention \(KDA, per-key gate\)"):
        lasp2.nn.HybridStack(16, 2, pattern="LGQ")


def test_gate_from_logits():
    logits = torch.tensor([-30.0, -1.0, 0.0, 2.0], dtype=torch.bfloat16)
    g = gate_from_logits(logits, normalizer=4.0)
    assert g.dtype == torch.float32  # gates accumulate over the sequence
    want = -torch.log1p(torch.exp(-logits.double())) / 4.0
    torch.testing.assert_close(g.double(), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(gate_from_logits(logits, 4.0, clamp_min=-1.0).double(), want.clamp_min(-1.0),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_rms_norm(dtype):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 2, 8, generator=gen, dtype=torch.float64)
    w = torch.rand(2, 8, generator=gen, dtype=torch.float64)  # one scale per head and channel
    want = x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * w
    got = rms_norm(x.to(dtype), w.to(dtype))
    assert got.dtype == dtype
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2}[dtype]
    assert ((got.double() - want).abs().max() / want.abs().max()).item() < tol
    norm = lasp2.nn.RMSNorm(8, dtype=dtype)
    torch.testing.assert_close(norm(x.to(dtype)), rms_norm(x.to(dtype), torch.ones(8, dtype=dtype)))
