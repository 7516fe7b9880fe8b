"""The Linear-MoE swap: Lasp2LinearAttention in Linear-MoE's core-linear-attention slot
computes lasp2.nn.LinearAttention's attention (one process here; CP = 2 in
test_megatron_gpt.py). Linear-MoE itself is not needed: its outer module only
projects q, k, v (and gate logits) and calls the core as core(q=, k=, v=[, gk=])."""

import pytest
import torch

pytest.importorskip("megatron.core")

import lasp2  # noqa: E402
from megatron_patches.options import Lasp2ConfigError  # noqa: E402
from megatron_testing import HEADS, HIDDEN, SEQ, linear_moe_config, swap_forward  # noqa: E402


@pytest.mark.parametrize("decay", ["none", "fixed", "gate"])
def test_swap_equals_lasp2_nn_linear_attention(decay):
    from megatron_patches.linear_moe import Lasp2LinearAttention

    torch.manual_seed(0)
    layer = lasp2.nn.LinearAttention(HIDDEN, HEADS, decay=decay, feature_map="relu", layout="tbhd")
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(SEQ, 2, HIDDEN)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref.square().sum(), list(layer.parameters()))
    core = Lasp2LinearAttention(linear_moe_config(decay))
    core.la_output_norm.weight = layer.norm.weight  # shared: its gradient is compared too
    y = swap_forward(layer, core, x)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    assert torch.allclose(y, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_swap_is_one_line_in_a_linear_moe_style_spec():
    """The constructor protocol Linear-MoE uses: build_module(spec, config=, expand_k=, expand_v=)."""
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module

    from megatron_patches.linear_moe import Lasp2LinearAttention

    core = build_module(ModuleSpec(module=Lasp2LinearAttention), config=linear_moe_config("fixed"),
                        expand_k=1.0, expand_v=1.0)
    q = k = v = torch.randn(8, 1, HEADS, HIDDEN // HEADS)
    assert core(q=q, k=k, v=v).shape == (8, 1, HIDDEN)
    # packed (Linear-MoE squeezes the batch dim of THD tensors): [t, h, d] -> [t, 1, h*d]
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    assert core(q=q[:, 0], k=k[:, 0], v=v[:, 0], cu_seqlens=cu).shape == (8, 1, HIDDEN)


def test_linear_moe_errors():
    from megatron_patches.linear_moe import Lasp2LinearAttention

    q = torch.randn(8, 1, HEADS, HIDDEN // HEADS)
    core = Lasp2LinearAttention(linear_moe_config("gate"))
    with pytest.raises(Lasp2ConfigError, match="per-channel gates"):
        core(q=q, k=q, v=q, gk=torch.randn(8, 1, HIDDEN))  # GLA's per-channel gates
    with pytest.raises(Lasp2ConfigError, match="no gk / g"):
        core(q=q, k=q, v=q)
    with pytest.raises(Lasp2ConfigError, match="beta"):
        core(q=q, k=q, v=q, gk=torch.randn(8, 1, HEADS), beta=torch.rand(8, 1, HEADS))
    with pytest.raises(Lasp2ConfigError, match="la_feature_map"):
        Lasp2LinearAttention(linear_moe_config(la_feature_map="hedgehog"))
    with pytest.raises(Lasp2ConfigError, match="divisible"):
        Lasp2LinearAttention(linear_moe_config(), expand_k=0.3)


def test_linear_moe_slot_refuses_what_it_used_to_misread():
    """Session 18: gates laid out [b, n, h] (or flat) were reshaped to [n, b, h], pairing
    them with the wrong tokens; gates given to lasp2_decay='none' / 'fixed' replaced that
    decay; 3 key groups for 4 query heads were repeated to 3, a v head dim other than the
    norm's raised a broadcasting RuntimeError; a zero / negative gate normaliser or a
    positive clamp gave -inf / positive log gates. Each now raises naming the argument."""
    from megatron_patches.linear_moe import Lasp2LinearAttention

    n, b, d = 6, 2, HIDDEN // HEADS
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, b, HEADS, d, generator=gen) for _ in range(3))
    gk = torch.randn(n, b, HEADS, generator=gen)
    core = Lasp2LinearAttention(linear_moe_config("gate"))
    # [n, b, h, 1] is q's layout too: the same gates; so is [1, t, h] for packed [t, 1, h]
    assert torch.equal(core(q=q, k=k, v=v, gk=gk.unsqueeze(-1)), core(q=q, k=k, v=v, gk=gk))
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    packed = [x[:, 0] for x in (q, k, v)]
    assert torch.equal(core(*packed, gk=gk[None, :, 0], cu_seqlens=cu), core(*packed, gk=gk[:, 0], cu_seqlens=cu))
    for name in ("gk", "g"):
        for bad in (gk.transpose(0, 1).contiguous(), gk.reshape(-1)):
            with pytest.raises(Lasp2ConfigError, match=f"{name} must be \\[n, b, heads\\] = \\[6, 2, 4\\]"):
                core(q=q, k=k, v=v, **{name: -bad.abs()})
    with pytest.raises(Lasp2ConfigError, match="q has 4 heads but k and v have 3"):
        core(q=q, k=k[:, :, :3], v=v[:, :, :3], gk=gk)
    with pytest.raises(Lasp2ConfigError, match="v has head dim 3 but the module was built for head_v_dim 16"):
        core(q=q, k=k, v=v[..., :3], gk=gk)
    for decay in ("none", "fixed"):
        with pytest.raises(Lasp2ConfigError, match=f"lasp2_decay='{decay}' takes no gates, but gk was passed"):
            Lasp2LinearAttention(linear_moe_config(decay))(q=q, k=k, v=v, gk=gk)
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(Lasp2ConfigError, match="gla_la_gate_logit_normalizer must be a finite number > 0"):
            Lasp2LinearAttention(linear_moe_config("gate", gla_la_gate_logit_normalizer=bad))
    with pytest.raises(Lasp2ConfigError, match="gla_la_clamp_min .* must be a number <= 0 or None, got 1.0"):
        Lasp2LinearAttention(linear_moe_config("gate", gla_la_clamp_min=1.0))
    # session 22: a config file's "false" is truthy, so it kept the learned scale it asked away
    with pytest.raises(Lasp2ConfigError, match="la_elementwise_affine must be True or False, got 'false'"):
        Lasp2LinearAttention(linear_moe_config("gate", la_elementwise_affine="false"))
    assert Lasp2LinearAttention(linear_moe_config("gate", la_elementwise_affine=False)).norm_weight is None


def test_parameter_names_are_linear_moes():
    """Linear-MoE's core modules hold their output norm as `la_output_norm` (an RMSNorm over
    head_v_dim, parameter `weight` when la_elementwise_affine): its checkpoints load strictly."""
    from megatron_patches.linear_moe import Lasp2LinearAttention

    head_v = HIDDEN // HEADS
    core = Lasp2LinearAttention(linear_moe_config("gate"))
    assert {n: tuple(p.shape) for n, p in core.named_parameters()} == {"la_output_norm.weight": (head_v,)}
    scale = torch.linspace(0.5, 1.5, head_v)
    core.load_state_dict({"la_output_norm.weight": scale}, strict=True)  # a Linear-MoE checkpoint
    assert torch.equal(core.la_output_norm.weight.detach(), scale)
    core.load_state_dict({"norm_weight": 2 * scale}, strict=True)  # earlier lasp2 checkpoints
    assert torch.equal(core.la_output_norm.weight.detach(), 2 * scale)
    # the scale multiplies the per-head RMS-normalised output
    q = k = v = torch.randn(8, 1, HEADS, head_v)
    gk = torch.randn(8, 1, HEADS)
    o = core(q=q, k=k, v=v, gk=gk).reshape(8, 1, HEADS, head_v)
    unit = Lasp2LinearAttention(linear_moe_config("gate", la_elementwise_affine=False))
    assert dict(unit.named_parameters()) == {} and "la_output_norm.weight" not in unit.state_dict()
    ref = unit(q=q, k=k, v=v, gk=gk).reshape(8, 1, HEADS, head_v) * 2 * scale
    torch.testing.assert_close(o, ref, rtol=1e-5, atol=1e-6)
    identity = Lasp2LinearAttention(linear_moe_config("gate", la_output_norm="identity"))
    assert dict(identity.named_parameters()) == {}
