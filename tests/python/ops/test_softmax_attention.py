"""lasp2.softmax_attention on one process: float64 reference, gradcheck, the block plan."""

import pytest
import torch

import lasp2
from lasp2.ops.softmax_attention import Block, plan_blocks
from lasp2_testing.reference import softmax_attention_reference
from lasp2_testing.checks import rel_err

BACKENDS = ["sdpa", "plain"]


def inputs(B=2, T=13, H=4, Hkv=2, D=8, Dv=None, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    Dv = D if Dv is None else Dv
    make = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
    return make(B, T, H, D), make(B, T, Hkv, D), make(B, T, Hkv, Dv), make(B, T, H, Dv)


def run_and_ref(q, k, v, do, **kw):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    o = lasp2.softmax_attention(*leaves, **kw)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    o_ref = softmax_attention_reference(*ref_leaves, cu_seqlens=kw.get("cu_seqlens"), causal=kw.get("causal", True))
    grads_ref = torch.autograd.grad(o_ref, ref_leaves, do.double())
    return [rel_err(o, o_ref)] + [rel_err(g, r) for g, r in zip(grads, grads_ref)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kv_heads", [4, 2, 1])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_matches_reference(backend, kv_heads, dtype, tol):
    q, k, v, do = inputs(Hkv=kv_heads, dtype=dtype)
    errors = run_and_ref(q, k, v, do, backend=backend)
    assert max(errors) < tol, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cu", [
    [0, 3, 4, 9, 13],          # documents of 3, 1, 5, 4 tokens
    [0, 1, 2, 13],             # 1-token documents first
    [0, 5, 5, 13],             # an empty document
    [0, 13],                   # one document
    [0, 12, 13],               # 1-token document last
])
def test_packed_documents(backend, cu):
    q, k, v, do = inputs(B=1)
    cu = torch.tensor(cu, dtype=torch.int32)
    errors = run_and_ref(q, k, v, do, cu_seqlens=cu, backend=backend)
    assert max(errors) < 1e-10, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_docs", [False, True])
def test_bidirectional(backend, with_docs):
    q, k, v, do = inputs(B=1 if with_docs else 2)
    cu = torch.tensor([0, 3, 4, 9, 13]) if with_docs else None
    errors = run_and_ref(q, k, v, do, cu_seqlens=cu, causal=False, backend=backend)
    assert max(errors) < 1e-10, errors


def test_value_head_dim_may_differ():
    q, k, v, do = inputs(D=8, Dv=5)
    assert max(run_and_ref(q, k, v, do)) < 1e-10


def test_scale_and_megatron_layout():
    q, k, v, do = inputs()
    o = lasp2.softmax_attention(q, k, v, scale=0.3)
    t = lambda x: x.transpose(0, 1)
    o_tb = lasp2.softmax_attention(t(q), t(k), t(v), scale=0.3, layout="tbhd")
    assert o_tb.shape == (13, 2, 4, 8)
    torch.testing.assert_close(t(o_tb), o, rtol=0, atol=0)
    assert rel_err(o, softmax_attention_reference(q, k, v, scale=0.3)) < 1e-10


def test_split_is_irrelevant_on_one_process():
    q, k, v, _ = inputs(T=7)  # odd length is fine without a group
    a = lasp2.softmax_attention(q, k, v, split="balanced")
    torch.testing.assert_close(a, lasp2.softmax_attention(q, k, v), rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_precision_on_cpu(dtype, tol, backend):
    q, k, v, do = inputs(dtype=dtype)
    errors = run_and_ref(q, k, v, do, backend=backend)
    assert max(errors) < tol, errors


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck(backend, causal):
    q, k, v, _ = inputs(B=1, T=5, H=2, Hkv=1, D=3)
    cu = torch.tensor([0, 2, 5])
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    fn = lambda a, b, c: lasp2.softmax_attention(a, b, c, cu_seqlens=cu, causal=causal, backend=backend)
    assert torch.autograd.gradcheck(fn, leaves)
    fn = lambda a, b, c: lasp2.softmax_attention(a, b, c, causal=causal, backend=backend)
    assert torch.autograd.gradcheck(fn, leaves)


def test_gradient_for_some_inputs_only():
    q, k, v, do = inputs()
    qq = q.clone().requires_grad_()
    o = lasp2.softmax_attention(qq, k, v)
    (dq,) = torch.autograd.grad(o, [qq], do)
    ref_q = q.clone().requires_grad_()
    (dq_ref,) = torch.autograd.grad(softmax_attention_reference(ref_q, k, v), [ref_q], do)
    assert rel_err(dq, dq_ref) < 1e-10


# ------------------------------------------------------------------ the block plan


def causal_work(blocks):
    """Query-key pairs computed (a square causal block counts its lower triangle)."""
    work = 0
    for blk in blocks:
        n, m = blk.q_hi - blk.q_lo, blk.k_hi - blk.k_lo
        work += n * (n + 1) // 2 if blk.local else n * m
    return work


def test_plan_skips_masked_keys_and_balances_work():
    L, P = 8, 4
    contiguous = [causal_work(plan_blocks(L, r, P, 1, True, None)) for r in range(P)]
    balanced = [causal_work(plan_blocks(L, r, P, 2, True, None)) for r in range(P)]
    # every pair (t, s <= t) computed exactly once over the group: no wasted causal work
    total = L * P * (L * P + 1) // 2
    assert sum(contiguous) == total and sum(balanced) == total
    assert len(set(balanced)) == 1  # the balanced split evens out the work
    assert contiguous[-1] / contiguous[0] == (2 * P * L - L + 1) / (L + 1)  # ~2P-1 for long parts
    assert plan_blocks(L, 0, P, 1, True, None) == [Block(0, L, 0, L, True)]  # rank 0 needs no remote keys
    assert plan_blocks(L, 2, P, 2, True, None) == [
        Block(0, 4, 8, 12, True), Block(4, 8, 20, 24, True),   # parts 2 and 5 of 8, their diagonals
        Block(0, 4, 0, 8, False), Block(4, 8, 0, 20, False)]   # and the keys before them


def test_plan_with_documents_never_crosses_a_boundary():
    # rank 1 of 2 (contiguous) holds global tokens [8, 16); documents [0, 10), [10, 11), [11, 16)
    blocks = plan_blocks(8, 1, 2, 1, True, [0, 10, 11, 16])
    assert blocks == [Block(0, 2, 8, 10, True), Block(2, 3, 10, 11, True), Block(3, 8, 11, 16, True),
                      Block(0, 2, 0, 8, False)]


def test_cuda_kernel_plumbing_with_a_stand_in(monkeypatch):
    """The CUDA branch (flash op signatures, K/V heads repeated for GQA, float32 LSE,
    the block lengths the backward needs, no varlen, no dropout) driven on CPU by a
    stand-in flash kernel."""
    from types import SimpleNamespace

    from lasp2.ops import _softmax_blocks as K

    aten, calls = torch.ops.aten, []

    def flash(q, k, v, dropout_p, is_causal, return_debug_mask, *, scale):
        assert q.shape[1] == k.shape[1] == v.shape[1], "K/V heads must be repeated for the CUDA kernel"
        assert all(x.is_contiguous() for x in (q, k, v)) and dropout_p == 0.0 and not return_debug_mask
        o, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, scale=scale)
        calls.append("fwd")
        e = torch.empty(0)
        return o, lse, e, e, q.shape[2], k.shape[2], torch.tensor([7, 0]), e, e

    def flash_backward(do, q, k, v, o, lse, cum_q, cum_k, max_q, max_k, dropout_p, is_causal, seed, offset, *, scale):
        assert lse.dtype == torch.float32 and lse.is_contiguous() and lse.shape == q.shape[:3]
        assert (max_q, max_k) == (q.shape[2], k.shape[2]) and cum_q is None and cum_k is None
        assert dropout_p == 0.0 and seed.dtype == offset.dtype == torch.int64  # unused without dropout
        calls.append("bwd")
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            do, q, k, v, o, lse, 0.0, is_causal, scale=scale)

    monkeypatch.setattr(K, "_aten", SimpleNamespace(_scaled_dot_product_flash_attention=flash,
                                                    _scaled_dot_product_flash_attention_backward=flash_backward))
    monkeypatch.setattr(K, "_on_cpu", lambda x: False)
    q, k, v, do = inputs(B=1, dtype=torch.float32)
    errors = run_and_ref(q, k, v, do, cu_seqlens=torch.tensor([0, 3, 4, 9, 13]), backend="sdpa")
    assert max(errors) < 1e-5, errors
    assert calls.count("fwd") == calls.count("bwd") > 0
