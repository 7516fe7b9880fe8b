"""lasp2.nn.SoftmaxAttention: the reference composition, RoPE, layouts, bad arguments."""

import pytest
import torch

import lasp2
from lasp2.nn.softmax_attention import apply_rope, rope_positions
from lasp2_testing.reference import softmax_attention_reference
from lasp2_testing.checks import rel_err


def test_module_matches_reference_composition():
    torch.manual_seed(0)
    m = lasp2.nn.SoftmaxAttention(32, 4, num_kv_heads=2).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    q = m.q_proj(x).view(2, 11, 4, 8)
    k = m.k_proj(x).view(2, 11, 2, 8)
    v = m.v_proj(x).view(2, 11, 2, 8)
    pos = torch.arange(11)
    q, k = apply_rope(q, pos, 10000.0, 1), apply_rope(k, pos, 10000.0, 1)
    want = m.o_proj(softmax_attention_reference(q, k, v).reshape(2, 11, 32))
    assert rel_err(m(x), want) < 1e-12


def test_rope_is_a_rotation_with_relative_scores():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 8, generator=gen, dtype=torch.float64).unbind(0)
    score = lambda i, j: (apply_rope(q, torch.tensor([i]), 100.0, 1) * apply_rope(k, torch.tensor([j]), 100.0, 1)).sum()
    torch.testing.assert_close(score(5, 2), score(13, 10))  # depends only on i - j
    torch.testing.assert_close(apply_rope(q, torch.tensor([7]), 100.0, 1).norm(), q.norm())


def test_rope_positions_follow_split_and_documents():
    assert rope_positions(6, None, "balanced").tolist() == list(range(6))
    cu = torch.tensor([0, 2, 6])
    assert rope_positions(6, None, "contiguous", cu).tolist() == [0, 1, 0, 1, 2, 3]


def test_megatron_layout_module():
    torch.manual_seed(0)
    m = lasp2.nn.SoftmaxAttention(16, 2, layout="tbhd").double()
    m_bt = lasp2.nn.SoftmaxAttention(16, 2).double()
    m_bt.load_state_dict(m.state_dict())
    x = torch.randn(10, 3, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x), m_bt(x.transpose(0, 1)).transpose(0, 1))


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="`num_kv_heads` 3 must divide `num_heads` 4"):
        lasp2.nn.SoftmaxAttention(16, 4, num_kv_heads=3)
    with pytest.raises(ValueError, match="even head dim"):
        lasp2.nn.SoftmaxAttention(15, 5)
    with pytest.raises(ValueError, match="`x` must be"):
        lasp2.nn.SoftmaxAttention(16, 2)(torch.randn(2, 3, 8))
