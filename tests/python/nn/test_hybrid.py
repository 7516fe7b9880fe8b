"""lasp2.nn.HybridBlock / HybridStack: the same function with and without SP, for every
layer letter (L, S, G, K); the "K" layer's per-key gate against a reference written here."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2.nn.hybrid import MIXER_OF_LETTER
from lasp2.options import LAYER_LETTERS
from lasp2_testing.checks import assert_rel, rel_err
from lasp2_testing.delta_rule import delta_rule_reference, l2norm_reference
from lasp2_testing.dist import run_distributed


def test_bad_arguments():
    with pytest.raises(ValueError, match="`mixer` must be one of .*'gated_deltanet', 'kda'"):
        lasp2.nn.HybridBlock(16, 2, mixer="mamba")
    with pytest.raises(ValueError, match="`pattern` must be .*'K' Kimi Delta Attention"):
        lasp2.nn.HybridStack(16, 2, pattern="LXS")
    with pytest.raises(ValueError, match="mixer 'kda' fixes `per_key_gate` to True"):
        lasp2.nn.HybridStack(16, 2, pattern="KS", kda_kwargs={"per_key_gate": False})
    with pytest.raises(ValueError, match="`sp_context` must be an SPContext"):
        lasp2.nn.HybridBlock(16, 2, mixer="kda")(torch.randn(1, 4, 16), sp_context="ctx")
    ctx = lasp2.build_sp_context(None, cu_seqlens=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="GatedDeltaNet: `cu_seqlens` differs from the cu_seqlens of `sp_context`"):
        lasp2.nn.GatedDeltaNet(16, 2)(torch.randn(1, 4, 16), cu_seqlens=torch.tensor([0, 2, 4]), sp_context=ctx)


@pytest.mark.parametrize("argument, value, pattern, letter", [
    ("linear_kwargs", {"decay": "gate"}, "KKKS", "L"), ("softmax_kwargs", {"num_kv_heads": 1}, "LLLL", "S"),
    ("gdn_kwargs", {"conv_size": 2}, "LSK", "G"), ("kda_kwargs", {"conv_size": 3}, "GGGS", "K")])
def test_kwargs_of_a_kind_the_pattern_lacks_are_refused(argument, value, pattern, letter):
    """They were dropped silently; an empty dict (no settings) or None still builds."""
    with pytest.raises(ValueError, match=rf"HybridStack: `{argument}` .* `pattern` '{pattern}' has no '{letter}' layer"):
        lasp2.nn.HybridStack(16, 2, pattern=pattern, **{argument: value})
    assert len(lasp2.nn.HybridStack(16, 2, pattern=pattern, **{argument: {}}).layers) == len(pattern)
    assert len(lasp2.nn.HybridStack(16, 2, pattern=pattern + letter, **{argument: value}).layers) == len(pattern) + 1


def test_hybrid_stack_builds_every_layer_letter():
    assert set(MIXER_OF_LETTER) == set(LAYER_LETTERS)
    stack = lasp2.nn.HybridStack(16, 2, pattern="LSGK", gdn_kwargs={"conv_size": 2}, kda_kwargs={"conv_size": 3})
    kinds = [(type(layer.mixer).__name__, getattr(layer.mixer, "per_key_gate", None)) for layer in stack.layers]
    assert kinds == [("LinearAttention", None), ("SoftmaxAttention", None), ("GatedDeltaNet", False),
                     ("GatedDeltaNet", True)]
    assert [layer.mixer.q_conv.kernel_size for layer in stack.layers[2:]] == [2, 3]  # each kind's own kwargs


def make_stack(pattern="LSLS"):
    torch.manual_seed(0)
    # each kind's kwargs only where the pattern has that kind (others are refused)
    return lasp2.nn.HybridStack(32, 4, pattern=pattern, intermediate_size=48,
                                linear_kwargs={"decay": "gate"} if "L" in pattern else None,
                                softmax_kwargs={"num_kv_heads": 2} if "S" in pattern else None).double()


@pytest.mark.parametrize("letter, per_key", [("K", True), ("G", False)])
def test_delta_layer_gates_per_key_dim_or_per_head(letter, per_key):
    """A "K" layer is Kimi Linear's KDA, a "G" layer gated DeltaNet, against a float64
    composition written here: the log gate -exp(A_log[h]) softplus(a + dt_bias) with one
    a and dt_bias per key dim of each head (K) or per head (G), the step-by-step delta rule
    (lasp2_testing.delta_rule) and the gated RMSNorm. A "K" layer wired with a per-head
    gate fails (its a_proj would give H values, not H * Dk; a gate that ignored the key
    dim would differ)."""
    torch.manual_seed(1)
    mixer = lasp2.nn.HybridStack(16, 2, pattern=letter).double().layers[0].mixer
    B, T, H, D = 2, 7, 2, 8
    x = torch.randn(B, T, 16, dtype=torch.float64)
    with torch.no_grad():
        heads = lambda proj, conv: conv(proj(x)).view(B, T, H, D)  # noqa: E731 - the convolutions: test_gated_deltanet
        q, k = l2norm_reference(heads(mixer.q_proj, mixer.q_conv)), l2norm_reference(heads(mixer.k_proj, mixer.k_conv))
        v = heads(mixer.v_proj, mixer.v_conv)
        a = mixer.a_proj(x)
        A = mixer.A_log.exp()
        if per_key:
            g = -A[:, None] * F.softplus(a.view(B, T, H, D) + mixer.dt_bias.view(H, D))
        else:
            g = -A * F.softplus(a + mixer.dt_bias)
        o, _ = delta_rule_reference(q, k, v, g, torch.sigmoid(mixer.b_proj(x)), D ** -0.5)
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + mixer.o_norm.eps) * mixer.o_norm.weight
        want = mixer.o_proj((o * F.silu(mixer.g_proj(x).view(B, T, H, D))).reshape(B, T, H * D))
        assert_rel(mixer(x), want, 1e-5, f"{letter} layer against the reference")


def test_hybrid_stack_single_process_runs_both_mixers():
    stack = make_stack()
    kinds = [type(layer.mixer).__name__ for layer in stack.layers]
    assert kinds == ["LinearAttention", "SoftmaxAttention"] * 2
    x = torch.randn(2, 12, 32, dtype=torch.float64)
    y = stack(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    # causal: the first tokens do not see later ones
    x2 = x.clone()
    x2[:, 8:] += 1.0
    torch.testing.assert_close(stack(x2)[:, :8], y[:, :8])


# every kind of layer, and Kimi Linear's 3 KDA : 1 softmax
SP_PATTERNS = ("LSLS", "LGKS", "KKKS")


def hybrid_rank(rank, world):
    group = dist.new_group(list(range(world)))
    for pattern in SP_PATTERNS:
        stack = make_stack(pattern)
        params = list(stack.parameters())
        for with_docs in (False, True):
            B, T = (1, 8 * world) if with_docs else (2, 8 * world)
            x = torch.randn(B, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
            cu = torch.tensor([0, 5, 8, 9, T - 3, T]) if with_docs else None
            w = torch.randn(B, T, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
            stack.set_sequence_parallel(None)
            y_full = stack(x, cu_seqlens=cu)
            # a random projection as loss: the sum of squares after an RMSNorm is nearly constant
            grads_full = torch.autograd.grad((y_full * w).sum(), params)
            for split in ("contiguous", "balanced"):
                stack.set_sequence_parallel(group, split)
                y = stack(lasp2.split_sequence(x, group, split=split), cu_seqlens=cu)
                where = f"{pattern} docs={with_docs} split={split}"
                # linear-attention and delta-rule states travel between ranks in fp32: agreement to fp32 rounding
                assert rel_err(y, lasp2.split_sequence(y_full, group, split=split)) < 1e-5, where
                grads = torch.autograd.grad((y * lasp2.split_sequence(w, group, split=split)).sum(), params)
                for (name, _), g_local, g_full in zip(stack.named_parameters(), grads, grads_full):
                    g_sum = g_local.clone()
                    dist.all_reduce(g_sum, group=group)  # what Megatron's DP x CP gradient reduction does
                    assert rel_err(g_sum, g_full) < 1e-5, f"{where}: {name}"

    # a softmax-only stack is exact in float64: no fp32 states anywhere
    torch.manual_seed(1)
    soft = lasp2.nn.HybridStack(32, 4, pattern="SS", intermediate_size=48,
                                softmax_kwargs={"num_kv_heads": 1}).double()
    x = torch.randn(2, 8 * world, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    y_full = soft(x)
    grads_full = torch.autograd.grad((y_full * w).sum(), list(soft.parameters()))
    soft.set_sequence_parallel(group, "balanced")
    y = soft(lasp2.split_sequence(x, group, split="balanced"))
    assert rel_err(y, lasp2.split_sequence(y_full, group, split="balanced")) < 1e-10
    w_local = lasp2.split_sequence(w, group, split="balanced")
    for g_local, g_full in zip(torch.autograd.grad((y * w_local).sum(), list(soft.parameters())), grads_full):
        dist.all_reduce(g_local, group=group)
        assert rel_err(g_local, g_full) < 1e-10, rel_err(g_local, g_full)


def test_hybrid_stack_with_sequence_parallel_group():
    run_distributed(2, hybrid_rank)
