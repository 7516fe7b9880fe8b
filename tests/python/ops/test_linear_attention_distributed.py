"""LASP-2 over several gloo processes equals the single-process result.

Each rank checks its own output slice and its gradients (q, k, v, g or decay)
against a single-process run on the full sequence and against the float64
reference; every world size runs all configurations in one set of processes.
"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.dist import run_distributed
from lasp2_testing.reference import linear_attention_reference
from lasp2_testing.checks import assert_sp_matches, expect_value_error

CONFIGS = [
    # (mode, split, with cu_seqlens, dtype, overlap)
    ("none", "contiguous", False, torch.float64, True),
    ("decay", "contiguous", False, torch.float64, False),
    ("gate", "contiguous", False, torch.float64, True),
    ("gate", "balanced", False, torch.float64, True),
    ("decay", "balanced", False, torch.float32, False),
    ("gate", "contiguous", True, torch.float64, True),
    ("gate", "balanced", True, torch.float64, False),
    ("none", "balanced", False, torch.bfloat16, True),
]


def global_inputs(world, mode, with_docs, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    B = 1 if with_docs else 2
    # 72 tokens a rank: 36-token parts for the balanced split; the CPU kernels' 64-token
    # chunks end inside a rank
    L = 72
    T, H, D = L * world, 2, 8
    q, k, v, do = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(4))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) / 3 if mode == "gate" else None
    decay = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.3 if mode == "decay" else None
    cu = None
    if with_docs:
        # boundaries inside a rank, at a chunk edge, exactly at a rank edge, a 1-token
        # document, one spanning ranks
        cuts = sorted({3, 64, L, L + 1, T - 1, T // 2 + 1} - {0, T})
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
    to = lambda x: None if x is None else x.to(dtype if dtype != torch.bfloat16 else torch.float32)
    return [x.to(dtype) for x in (q, k, v, do)] + [to(g), to(decay), cu]


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))  # a sub-group, as Megatron's CP group would be
    for index, (mode, split, with_docs, dtype, overlap) in enumerate(CONFIGS):
        q, k, v, do, g, decay, cu = global_inputs(world, mode, with_docs, dtype, seed=100 + index)
        leaves_full = [x.clone().requires_grad_() for x in (q, k, v) + tuple(x for x in (g, decay) if x is not None)]
        gq, gk, gv = leaves_full[:3]
        extra = leaves_full[3] if len(leaves_full) > 3 else None
        kw = {"g": extra} if g is not None else ({"decay": extra} if decay is not None else {})
        o_full = lasp2.linear_attention(gq, gk, gv, cu_seqlens=cu, **kw)
        grads_full = torch.autograd.grad(o_full, leaves_full, do)

        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)
        lq, lk, lv = (local(x).detach().requires_grad_() for x in (q, k, v))
        leaves = [lq, lk, lv]
        kw = {}
        if g is not None:
            kw["g"] = local(g).detach().requires_grad_()
            leaves.append(kw["g"])
        if decay is not None:
            kw["decay"] = decay.clone().requires_grad_()
            leaves.append(kw["decay"])
        o = lasp2.linear_attention(lq, lk, lv, group=group, split=split, cu_seqlens=cu, overlap=overlap, **kw)
        grads = torch.autograd.grad(o, leaves, local(do))

        tol = {torch.float64: 1e-5, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
        where = f"config {index} {(mode, split, with_docs, dtype)}"
        ref = linear_attention_reference(q, k, v, g=g, decay=decay, cu_seqlens=cu)
        gate = "g" if g is not None else ("decay" if decay is not None else None)
        assert_sp_matches(o, grads, ref, o_full, grads_full, local, gate, tol, where, group)


@pytest.mark.parametrize("world", [2, 3, 4])
def test_lasp2_matches_single_process(world):
    run_distributed(world, check_rank)


def check_mismatch(rank, world):
    group = dist.group.WORLD
    T = 8 if rank == 0 else 6  # rank 1 disagrees on its local length
    q = torch.randn(1, T, 2, 4)
    expect_value_error(lambda: lasp2.linear_attention(q, q, q, group=group),
                       "disagree on local sequence length", "mismatched ranks were not detected")


def test_mismatched_ranks_raise_instead_of_hanging():
    run_distributed(2, check_mismatch, timeout=120)


def check_non_finite_stays_in_its_document(rank, world):
    """One rank's rows of documents after one holding an inf / NaN (ranks of 36-token
    parts under the balanced split: the bad document's part, whose log decay is -inf, is
    combined into the later parts' entering states) against that document alone."""
    group = dist.group.WORLD
    L, H, D = 72, 2, 4
    T = L * world
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, T, H, generator=gen, dtype=torch.float64)) / 3
    k[0, 3, 0] = float("inf")
    v[0, 5, 1] = float("nan")
    for split in ("contiguous", "balanced"):
        for cut in (L - 30, L, L + 5):  # the second document starts inside rank 0, at its edge, in rank 1
            cu = torch.tensor([0, cut, T])
            index = lasp2.global_token_index(L, rank, world, split)
            later = index >= cut
            alone = linear_attention_reference(q[:, cut:], k[:, cut:], v[:, cut:], g=g[:, cut:])
            for provider in ("lasp2", "lasp1"):
                for final in (False, True):
                    local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)  # noqa: E731
                    out = lasp2.linear_attention(local(q), local(k), local(v), g=local(g), group=group, split=split,
                                                 cu_seqlens=cu, provider=provider, output_final_state=final)
                    o = out[0] if final else out
                    where = f"split {split}, second document from {cut}, {provider}, final states {final}"
                    assert torch.isfinite(o[:, later]).all(), where
                    torch.testing.assert_close(o[:, later], alone[:, index[later] - cut], rtol=1e-6, atol=1e-6,
                                               msg=lambda m: f"{where}: {m}")
                    if final:
                        assert torch.isfinite(out[1][1]).all(), where


def test_non_finite_values_stay_in_their_document():
    run_distributed(2, check_non_finite_stays_in_its_document, timeout=120)
