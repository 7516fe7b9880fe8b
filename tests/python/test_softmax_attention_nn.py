"""lasp2.nn.SoftmaxAttention and the hybrid blocks: the same function with and without SP."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from dist_utils import run_distributed
from lasp2.nn.softmax_attention import apply_rope, rope_positions
from reference import softmax_attention_reference
from checks import rel_err


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
    with pytest.raises(ValueError, match="`mixer` must be one of"):
        lasp2.nn.HybridBlock(16, 2, mixer="mamba")
    with pytest.raises(ValueError, match="`pattern` must be"):
        lasp2.nn.HybridStack(16, 2, pattern="LXS")


def make_stack():
    torch.manual_seed(0)
    return lasp2.nn.HybridStack(32, 4, pattern="LSLS", intermediate_size=48,
                                linear_kwargs={"decay": "gate", "chunk_size": 4},
                                softmax_kwargs={"num_kv_heads": 2}).double()


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


def hybrid_rank(rank, world):
    group = dist.new_group(list(range(world)))
    stack = make_stack()
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
            where = f"docs={with_docs} split={split}"
            # linear-attention states travel between ranks in fp32: agreement to fp32 rounding
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
