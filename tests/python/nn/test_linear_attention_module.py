"""lasp2.nn.LinearAttention: the same function with and without a process group."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.dist import run_distributed
from lasp2_testing.reference import linear_attention_reference
from lasp2_testing.checks import rel_err


@pytest.mark.parametrize("decay", ["none", "fixed", "gate"])
@pytest.mark.parametrize("feature_map", ["identity", "elu"])
def test_module_matches_reference_composition(decay, feature_map):
    torch.manual_seed(0)
    m = lasp2.nn.LinearAttention(32, 4, decay=decay, feature_map=feature_map).double()
    x = torch.randn(2, 21, 32, dtype=torch.float64)
    y = m(x)
    # recompose by hand with the float64 reference attention
    heads = (2, 21, 4, 8)
    fm = lasp2.options.FEATURE_MAPS[feature_map]
    q, k, v = fm(m.q_proj(x).view(heads)), fm(m.k_proj(x).view(heads)), m.v_proj(x).view(heads)
    g = torch.nn.functional.logsigmoid(m.g_proj(x)) / 16 if decay == "gate" else None
    o = linear_attention_reference(q, k, v, g=g, decay=m.log_decay.double() if decay == "fixed" else None)
    want = m.o_proj(m.norm(o).reshape(2, 21, 32))
    torch.testing.assert_close(y, want, rtol=1e-6, atol=1e-8)


def test_megatron_layout_module():
    torch.manual_seed(0)
    m = lasp2.nn.LinearAttention(16, 2, layout="tbhd").double()
    x = torch.randn(10, 3, 16, dtype=torch.float64)
    m_bt = lasp2.nn.LinearAttention(16, 2).double()
    m_bt.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), m_bt(x.transpose(0, 1)).transpose(0, 1))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="`decay` must be one of"):
        lasp2.nn.LinearAttention(16, 2, decay="exp")
    with pytest.raises(ValueError, match="`feature_map` must be one of"):
        lasp2.nn.LinearAttention(16, 2, feature_map="tanh")
    with pytest.raises(ValueError, match="`x` must be"):
        lasp2.nn.LinearAttention(16, 2)(torch.randn(2, 3, 8))


def module_rank(rank, world):
    torch.manual_seed(0)
    m = lasp2.nn.LinearAttention(32, 4, decay="gate").double()
    x = torch.randn(2, 8 * world, 32, dtype=torch.float64)
    y_full = m(x)
    loss_full = (y_full ** 2).sum()
    grads_full = torch.autograd.grad(loss_full, list(m.parameters()))
    for split in ("contiguous", "balanced"):
        m.group, m.split = dist.group.WORLD, split
        y = m(lasp2.split_sequence(x, dist.group.WORLD, split=split))
        # states travel between ranks in fp32: agreement to fp32 rounding
        assert rel_err(y, lasp2.split_sequence(y_full, dist.group.WORLD, split=split)) < 1e-5
        grads = torch.autograd.grad((y ** 2).sum(), list(m.parameters()))
        for (name, _), g_local, g_full in zip(m.named_parameters(), grads, grads_full):
            g_sum = g_local.clone()
            dist.all_reduce(g_sum)  # what Megatron's DP x CP gradient reduction does
            assert rel_err(g_sum, g_full) < 1e-5, name
        m.group = None


def test_module_with_sequence_parallel_group():
    run_distributed(2, module_rank)
