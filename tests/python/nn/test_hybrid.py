"""lasp2.nn.HybridBlock / HybridStack: the same function with and without SP."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.checks import rel_err
from lasp2_testing.dist import run_distributed


def test_bad_arguments():
    with pytest.raises(ValueError, match="`mixer` must be one of"):
        lasp2.nn.HybridBlock(16, 2, mixer="mamba")
    with pytest.raises(ValueError, match="`pattern` must be"):
        lasp2.nn.HybridStack(16, 2, pattern="LXS")


def make_stack():
    torch.manual_seed(0)
    return lasp2.nn.HybridStack(32, 4, pattern="LSLS", intermediate_size=48,
                                linear_kwargs={"decay": "gate"},
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
