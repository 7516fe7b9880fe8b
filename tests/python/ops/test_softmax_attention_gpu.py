"""LASP-2H on CUDA: the fused (flash) path on one GPU, and NCCL over 2-4 GPUs.

Skipped where no GPU is present (conftest.py). Run on a GPU machine with
    python -m pytest -q tests/python/ops/test_softmax_attention_gpu.py
"""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.dist import run_distributed
from lasp2_testing.reference import softmax_attention_reference
from lasp2_testing.checks import rel_err

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def make(shape, dtype, gen, device="cuda"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def check_single(dtype, backend, kv_heads, with_docs, T=300, H=8, D=64):
    gen = torch.Generator().manual_seed(0)
    B = 1 if with_docs else 2
    q, k, v, do = (make(s, dtype, gen) for s in [(B, T, H, D), (B, T, kv_heads, D), (B, T, kv_heads, D), (B, T, H, D)])
    cu = torch.tensor([0, 17, 18, 150, T], device="cuda") if with_docs else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = lasp2.softmax_attention(*leaves, cu_seqlens=cu, backend=backend)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.double().cpu().requires_grad_() for x in (q, k, v)]
    o_ref = softmax_attention_reference(*ref_leaves, cu_seqlens=cu.cpu() if cu is not None else None)
    grads_ref = torch.autograd.grad(o_ref, ref_leaves, do.double().cpu())
    errors = [rel_err(o.cpu(), o_ref)] + [rel_err(g.cpu(), r) for g, r in zip(grads, grads_ref)]
    assert max(errors) < TOL[dtype], (dtype, backend, kv_heads, with_docs, errors)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["sdpa", "plain"])
@pytest.mark.parametrize("kv_heads, with_docs", [(8, False), (2, False), (2, True)])
def test_single_gpu_half_precision(dtype, backend, kv_heads, with_docs):
    check_single(dtype, backend, kv_heads, with_docs)


@pytest.mark.gpu
def test_single_gpu_float32_uses_plain():
    check_single(torch.float32, "auto", 2, True)


@pytest.mark.gpu
def test_fused_backend_is_chosen_for_half_precision():
    from lasp2.ops._softmax_blocks import resolve_backend
    q = torch.zeros(1, 4, 2, 64, device="cuda", dtype=torch.bfloat16)
    assert resolve_backend("auto", q, 64) == "sdpa"
    assert resolve_backend("auto", q.float(), 64) == "plain"


# --------------------------------------------------------------------------- NCCL


def _nccl_worker(rank, world):
    group = dist.new_group(list(range(world)))
    for dtype in (torch.bfloat16, torch.float32):
        for split in ("contiguous", "balanced"):
            for with_docs in (False, True):
                gen = torch.Generator().manual_seed(1)
                B, T, H, Hkv, D = (1 if with_docs else 2), 128 * world, 8, 2, 64
                q, k, v, do = (make(s, dtype, gen, "cpu") for s in
                               [(B, T, H, D), (B, T, Hkv, D), (B, T, Hkv, D), (B, T, H, D)])
                cu = torch.tensor([0, 5, 128, 129, T - 40, T]) if with_docs else None
                ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
                o_ref = softmax_attention_reference(*ref_leaves, cu_seqlens=cu)
                grads_ref = torch.autograd.grad(o_ref, ref_leaves, do.double())
                local = lambda x: lasp2.split_sequence(x, group, split=split).cuda()
                leaves = [local(x).requires_grad_() for x in (q, k, v)]
                o = lasp2.softmax_attention(*leaves, group=group, split=split,
                                            cu_seqlens=None if cu is None else cu.cuda())
                grads = torch.autograd.grad(o, leaves, local(do))
                where = (dtype, split, with_docs)
                to_local = lambda x: lasp2.split_sequence(x, group, split=split)
                assert rel_err(o.cpu(), to_local(o_ref)) < TOL[dtype], where
                for g, r in zip(grads, grads_ref):
                    assert rel_err(g.cpu(), to_local(r)) < TOL[dtype], where


@pytest.mark.multigpu
def test_nccl_matches_reference():
    world = min(torch.cuda.device_count(), 4)
    if world < 2:
        pytest.skip("needs 2+ GPUs")
    run_distributed(world, _nccl_worker, backend="nccl")
