"""lasp2.linear_attention on one process against the float64 quadratic reference."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.reference import linear_attention_reference
from lasp2_testing.checks import rel_err


def make_inputs(B=2, T=37, H=3, Dk=16, Dv=8, dtype=torch.float32, mode="gate", seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, generator=gen, dtype=torch.float64) for d in (Dk, Dk, Dv))
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) / 4 if mode == "gate" else None
    decay = -torch.rand(H, generator=gen, dtype=torch.float64) * 0.2 if mode == "decay" else None
    cast = lambda x: None if x is None else x.to(dtype)
    return cast(q), cast(k), cast(v), (None if g is None else g.float() if dtype != torch.float64 else g), \
        (None if decay is None else decay.float() if dtype != torch.float64 else decay)


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}


@pytest.mark.parametrize("mode", ["none", "decay", "gate"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [1, 37, 64, 100, 150])  # the CPU kernels' chunks are 64 long
def test_forward_and_gradients_match_reference(mode, dtype, T):
    q, k, v, g, decay = make_inputs(T=T, dtype=dtype, mode=mode)
    leaves = [x for x in (q, k, v, g, decay) if x is not None]
    for x in leaves:
        x.requires_grad_()
    o = lasp2.linear_attention(q, k, v, g=g, decay=decay)
    assert o.dtype == dtype and o.shape == v.shape
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    rq, rk, rv = ref_leaves[:3]
    rg = ref_leaves[3] if g is not None else None
    rdecay = ref_leaves[3] if decay is not None else None
    ref = linear_attention_reference(rq, rk, rv, g=rg, decay=rdecay)
    tol = TOLERANCE[dtype]
    assert rel_err(o, ref) < tol
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(T), dtype=ref.dtype)  # seeded: no flaky bounds
    grads = torch.autograd.grad(o, leaves, do.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    for name, got, want in zip(["q", "k", "v", "g/decay"], grads, ref_grads):
        if name != "g/decay":
            assert rel_err(got, want) < tol, name
        else:
            # dg_t sums differences q.dq - k.dk of O(1) terms that cancel (dg is exactly 0
            # for T=1), so it is compared at the O(1) scale and looser in half precision.
            factor = 1 if dtype in (torch.float64, torch.float32) else 4
            assert rel_err(got, want, floor=1.0) < factor * tol, name


@pytest.mark.parametrize("mode", ["none", "decay", "gate"])
def test_gradcheck_float64(mode):
    # 67 tokens: two chunks of the CPU kernels, the second of 3 tokens
    q, k, v, g, decay = make_inputs(B=1, T=67, H=1, Dk=3, Dv=2, dtype=torch.float64, mode=mode, seed=3)
    inputs = [x.requires_grad_() for x in (q, k, v)]
    if g is not None:
        fn = lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g)
        inputs.append(g.requires_grad_())
    elif decay is not None:
        fn = lambda q, k, v, d: lasp2.linear_attention(q, k, v, decay=d)
        inputs.append(decay.requires_grad_())
    else:
        fn = lambda q, k, v: lasp2.linear_attention(q, k, v)
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_megatron_layout_equals_batch_first():
    q, k, v, g, _ = make_inputs(dtype=torch.float64)
    o = lasp2.linear_attention(q, k, v, g=g)
    t = lambda x: x.transpose(0, 1).contiguous()
    o_tbhd = lasp2.linear_attention(t(q), t(k), t(v), g=t(g), layout="tbhd")
    assert o_tbhd.shape == (q.shape[1], q.shape[0], q.shape[2], v.shape[3])
    torch.testing.assert_close(o_tbhd.transpose(0, 1), o, rtol=0, atol=1e-12)


def test_strided_views_need_no_copy_and_give_the_same_result():
    q, k, v, g, _ = make_inputs(dtype=torch.float64)
    packed = torch.cat([q, k], dim=-1)  # q and k as views into one buffer
    o_views = lasp2.linear_attention(packed[..., :16], packed[..., 16:], v, g=g)
    o = lasp2.linear_attention(q, k, v, g=g)
    torch.testing.assert_close(o_views, o, rtol=0, atol=1e-12)


def test_scale_is_applied_to_q():
    q, k, v, g, _ = make_inputs(dtype=torch.float64)
    o = lasp2.linear_attention(q, k, v, g=g, scale=0.3)
    torch.testing.assert_close(o, linear_attention_reference(q, k, v, g=g, scale=0.3), rtol=1e-10, atol=1e-12)


def test_cu_seqlens_equals_running_documents_separately():
    q, k, v, g, _ = make_inputs(B=1, T=150, dtype=torch.float64)
    cu = torch.tensor([0, 1, 9, 25, 70, 128, 129, 150], dtype=torch.int32)  # across and at chunk edges (64)
    o = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu)
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        piece = lasp2.linear_attention(q[:, start:end], k[:, start:end], v[:, start:end], g=g[:, start:end])
        torch.testing.assert_close(o[:, start:end], piece, rtol=1e-10, atol=1e-12)


def test_overlap_and_fused_schedules_agree_on_one_device():
    q, k, v, g, _ = make_inputs(dtype=torch.float64)
    a = lasp2.linear_attention(q, k, v, g=g, overlap=True)
    b = lasp2.linear_attention(q, k, v, g=g, overlap=False)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
