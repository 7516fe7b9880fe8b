"""lasp2.linear_attention on one CUDA GPU against the float64 reference (marker: gpu).

Run on the device machine: `pytest -m gpu tests/python`. Tolerances follow the
precision of the inputs (bf16 rounds the tensor-core operands to 8 bits).
"""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.reference import linear_attention_reference
from lasp2_testing.checks import rel_err

pytestmark = pytest.mark.gpu

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3, torch.float32: 1e-4}


def inputs(B, T, H, Dk, Dv, mode, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, d, device="cuda", generator=gen) for d in (Dk, Dk, Dv))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 8 if mode == "gate" else None
    decay = -torch.rand(H, device="cuda", generator=gen) * 0.1 if mode == "decay" else None
    return q.to(dtype), k.to(dtype), v.to(dtype), g, decay


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("mode", ["none", "decay", "gate"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("T", [77, 1000])
def test_matches_reference(dtype, mode, D, T):
    q, k, v, g, decay = inputs(2, T, 3, D, D, mode, dtype)
    leaves = [x.requires_grad_() for x in (q, k, v)] + [x.requires_grad_() for x in (g, decay) if x is not None]
    o = lasp2.linear_attention(q, k, v, g=g, decay=decay)
    assert o.dtype == dtype and o.device.type == "cuda"
    ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
    extra = ref_leaves[3] if len(ref_leaves) > 3 else None
    ref = linear_attention_reference(*ref_leaves[:3], g=extra if g is not None else None,
                                     decay=extra if decay is not None else None)
    assert rel_err(o, ref) < TOL[dtype]
    do = torch.randn_like(ref)
    grads = torch.autograd.grad(o, leaves, do.to(dtype))
    ref_grads = torch.autograd.grad(ref, ref_leaves, do)
    for name, got, want in zip(["dq", "dk", "dv"], grads, ref_grads):
        assert rel_err(got, want) < TOL[dtype], name
    if extra is not None:
        # dg is a cumulative sum of cancelling terms: error grows like sqrt(T / 64)
        assert rel_err(grads[3], ref_grads[3], floor=1.0) < 4 * TOL[dtype] * (T / 64) ** 0.5, "dg"


def test_megatron_layout_and_odd_head_dims():
    q, k, v, g, _ = inputs(2, 300, 4, 40, 24, "gate", torch.bfloat16, seed=1)
    t = lambda x: x.transpose(0, 1).contiguous()
    o = lasp2.linear_attention(t(q), t(k), t(v), g=t(g), layout="tbhd")
    ref = linear_attention_reference(q, k, v, g=g)
    assert rel_err(o.transpose(0, 1), ref) < TOL[torch.bfloat16]


def test_cu_seqlens_on_gpu():
    q, k, v, g, _ = inputs(1, 1000, 2, 64, 64, "gate", torch.bfloat16, seed=2)
    cu = torch.tensor([0, 1, 64, 65, 500, 1000], dtype=torch.int32, device="cuda")
    o = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu)
    ref = linear_attention_reference(q, k, v, g=g, cu_seqlens=cu.cpu())
    assert rel_err(o, ref) < TOL[torch.bfloat16]


def test_cpu_and_gpu_agree_in_float32():
    q, k, v, g, _ = inputs(1, 513, 2, 64, 64, "gate", torch.float32, seed=3)
    o_gpu = lasp2.linear_attention(q, k, v, g=g)
    o_cpu = lasp2.linear_attention(q.cpu(), k.cpu(), v.cpu(), g=g.cpu())
    assert rel_err(o_gpu.cpu(), o_cpu.double()) < 1e-5


def test_module_on_gpu_bf16():
    torch.manual_seed(0)
    m = lasp2.nn.LinearAttention(256, 2, decay="gate", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(2, 257, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = m(x)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_float64_on_cuda_is_rejected():
    q = torch.randn(1, 8, 1, 8, device="cuda", dtype=torch.float64)
    with pytest.raises(ValueError, match="float64 on CUDA"):
        lasp2.linear_attention(q, q, q)
