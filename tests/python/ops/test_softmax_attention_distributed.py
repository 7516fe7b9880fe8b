"""LASP-2H over several gloo processes equals the single-process result.

Each rank checks its output slice and its gradients (q, k, v) against a
single-process run on the full sequence and against the float64 reference; every
world size runs all configurations in one set of processes.
"""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.distributed import TORCH_COLLECTIVES, Collectives
from lasp2_testing.dist import run_distributed
from lasp2_testing.reference import softmax_attention_reference
from lasp2_testing.checks import assert_rel, expect_value_error

CONFIGS = [
    # (split, with cu_seqlens, dtype, backend, kv heads, layout, causal)
    ("contiguous", False, torch.float64, "sdpa", 4, "bthd", True),
    ("balanced", False, torch.float64, "sdpa", 2, "bthd", True),   # GQA
    ("contiguous", False, torch.float64, "plain", 1, "tbhd", True),  # MQA, Megatron layout
    ("balanced", False, torch.float64, "plain", 2, "bthd", True),
    ("contiguous", True, torch.float64, "sdpa", 2, "bthd", True),
    ("balanced", True, torch.float64, "sdpa", 4, "tbhd", True),
    ("balanced", True, torch.float64, "plain", 2, "bthd", True),
    ("balanced", False, torch.float32, "sdpa", 2, "bthd", True),
    ("contiguous", True, torch.float32, "plain", 4, "bthd", True),
    ("balanced", True, torch.float64, "sdpa", 2, "bthd", False),   # bidirectional, per document
    ("contiguous", False, torch.float64, "plain", 4, "bthd", False),
]
TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def doc_cuts(total):
    # boundaries inside a rank, at a rank edge (8) and a balanced part edge (4),
    # 1-token documents ([8, 9) and [T-1, T)), documents spanning ranks
    return torch.tensor([0, *sorted({3, 4, 8, 9, total // 2 + 1, total - 1}), total], dtype=torch.int64)


def global_inputs(world, with_docs, dtype, kv_heads, seed):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if with_docs else 2
    T, H, D, Dv = 8 * world, 4, 8, 6  # 8 tokens a rank: 4-token parts for the balanced split
    q = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    k = torch.randn(B, T, kv_heads, D, generator=gen, dtype=torch.float64)
    v = torch.randn(B, T, kv_heads, Dv, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, Dv, generator=gen, dtype=torch.float64)
    cu = doc_cuts(T) if with_docs else None
    return [x.to(dtype) for x in (q, k, v, do)] + [cu]


def to_layout(x, layout):
    return x.transpose(0, 1) if layout == "tbhd" else x


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))  # a sub-group, as Megatron's CP group would be
    for index, (split, with_docs, dtype, backend, kv_heads, layout, causal) in enumerate(CONFIGS):
        q, k, v, do, cu = global_inputs(world, with_docs, dtype, kv_heads, seed=200 + index)
        where = f"config {index} {(split, with_docs, dtype, backend, kv_heads, layout, causal)}"
        tol = TOL[dtype]

        full = [x.clone().requires_grad_() for x in (q, k, v)]
        o_full = lasp2.softmax_attention(*full, cu_seqlens=cu, causal=causal, backend=backend)
        grads_full = torch.autograd.grad(o_full, full, do)
        ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
        o_ref = softmax_attention_reference(*ref_leaves, cu_seqlens=cu, causal=causal)
        grads_ref = torch.autograd.grad(o_ref, ref_leaves, do.double())

        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)
        leaves = [to_layout(local(x), layout).detach().requires_grad_() for x in (q, k, v)]
        o = lasp2.softmax_attention(*leaves, group=group, layout=layout, split=split, cu_seqlens=cu,
                                    causal=causal, backend=backend)
        grads = torch.autograd.grad(o, leaves, to_layout(local(do), layout))
        o, grads = to_layout(o, layout), [to_layout(g, layout) for g in grads]

        assert_rel(o, local(o_ref), tol, f"{where}: o vs float64 reference")
        assert_rel(o, local(o_full), tol, f"{where}: o vs single process")
        for name, got, want, want_ref in zip(["dq", "dk", "dv"], grads, grads_full, grads_ref):
            assert_rel(got, local(want), tol, f"{where}: {name} vs single process")
            assert_rel(got, local(want_ref), tol, f"{where}: {name} vs float64 reference")
    check_one_collective_each_way(rank, world, group)
    if world == 2:  # in the same processes, to spare a second start-up
        check_mismatch(rank, world)


def check_one_collective_each_way(rank, world, group):
    """Forward issues exactly one (async) AllGather, backward one (async) reduce-scatter."""
    calls = []

    def spy(name, fn):
        def wrapper(*args, **kwargs):
            calls.append((name, kwargs.get("async_op", False)))
            return fn(*args, **kwargs)
        return wrapper

    torch_calls = TORCH_COLLECTIVES
    spies = Collectives(all_gather_single=spy("all_gather", torch_calls.all_gather_single),
                        reduce_scatter_single=spy("reduce_scatter", torch_calls.reduce_scatter_single))
    q, k, v, do, cu = global_inputs(world, True, torch.float64, 2, seed=7)
    ctx = lasp2.build_sp_context(group, "balanced", cu, collectives=spies)
    local = lambda x: lasp2.split_sequence(x, group, split="balanced", dim=1).requires_grad_()
    leaves = [local(x) for x in (q, k, v)]
    o = lasp2.softmax_attention(*leaves, sp_context=ctx)
    assert calls == [("all_gather", True)], calls
    torch.autograd.grad(o, leaves, local(do))
    assert calls == [("all_gather", True), ("reduce_scatter", True)], calls


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp2h_matches_single_process(world):
    """All CONFIGS; with world 2 also: mismatched ranks raise instead of hanging."""
    run_distributed(world, check_rank)


def check_mismatch(rank, world):
    group = dist.group.WORLD
    kv_heads = 2 if rank == 0 else 1  # rank 1 disagrees on the K/V heads
    q = torch.randn(1, 8, 2, 4)
    k = torch.randn(1, 8, kv_heads, 4)
    expect_value_error(lambda: lasp2.softmax_attention(q, k, k, group=group),
                       "disagree on key/value heads", "mismatched ranks were not detected")
    # and on the sequence split
    split = "balanced" if rank == 0 else "contiguous"
    expect_value_error(lambda: lasp2.softmax_attention(q, q, q, group=group, split=split), "disagree on split",
                       "mismatched splits were not detected")

    # bad input that needs a group: raised on every rank before any collective
    odd = torch.randn(1, 7, 2, 4)
    expect_value_error(lambda: lasp2.softmax_attention(odd, odd, odd, group=group, split="balanced"),
                       "balanced split needs an even local sequence length, got 7",
                       "odd local length with the balanced split was accepted")
    # cu_seqlens must describe the global sequence, not the local one
    expect_value_error(lambda: lasp2.softmax_attention(q, q, q, group=group, cu_seqlens=torch.tensor([0, 3, 8])),
                       "must end at the global sequence length 16", "a local cu_seqlens was accepted")
