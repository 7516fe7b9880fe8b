"""The fused L2 norm of q and k on one CUDA GPU (marker gpu): the CUDA kernels against
the float64 formula on the same inputs (values, rstd, gradients; every dtype, head dims
taking each kernel variant, tbhd views and slices that break 16-byte alignment), one
kernel launch per direction, torch.compile(fullgraph=True) equal to eager, and the
delta-rule ops with use_qk_l2norm equal to the ops fed with the unfused formula's q, k.

Run on the device machine: `pytest -m gpu tests/python/ops/test_qk_l2norm_gpu.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops import _l2norm_library as L
from lasp2.ops._l2norm_library import L2NORM_EPS, qk_l2norm
from lasp2_testing.checks import assert_rel
from lasp2_testing.delta_rule import l2norm_reference as unfused  # the formula the op replaces

pytestmark = pytest.mark.gpu

# y is rounded once to the dtype; dx uses the rounded y (relative to rstd |dy|)
TOL = {torch.float64: (1e-13, 1e-11), torch.float32: (2e-6, 2e-5), torch.float16: (2e-3, 5e-3),
       torch.bfloat16: (1.6e-2, 4e-2)}



def _views(layout, B, T, H, D, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    if layout == "bthd":
        return torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen)
    if layout == "tbhd":
        return torch.randn(T, B, H, D, device="cuda", dtype=dtype, generator=gen).transpose(0, 1)
    # a slice at an odd element offset of a fused projection: no 16-byte vectors
    big = torch.randn(B, T, H, 2 * D + 1, device="cuda", dtype=dtype, generator=gen)
    return big[..., 1:D + 1]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 64, 128, 256, 300])
@pytest.mark.parametrize("layout", ["bthd", "tbhd", "slice"])
def test_cuda_matches_float64_formula(dtype, D, layout):
    B, T, H = 2, 33, 3
    q, k = _views(layout, B, T, H, D, dtype, 1), _views(layout, B, T, H, D, dtype, 2) * 3
    q[0, 5] = 0  # zero rows: eps keeps them finite
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    yq, yk = qk_l2norm(q, k)
    dyq, dyk = torch.randn_like(yq), torch.randn_like(yk)
    dq, dk = torch.autograd.grad((yq * dyq).sum() + (yk * dyk).sum(), (q, k))
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    ryq, ryk = unfused(q64), unfused(k64)
    rdq, rdk = torch.autograd.grad((ryq * dyq.double()).sum() + (ryk * dyk.double()).sum(), (q64, k64))
    ty, tdx = TOL[dtype]
    what = f"{dtype} D={D} {layout}"
    for name, got, want in (("q_hat", yq, ryq), ("k_hat", yk, ryk)):
        assert got.dtype == dtype and got.is_cuda
        assert_rel(got, want, ty, f"{what}: {name}")
    for name, got, want, x, dy in (("dq", dq, rdq, q64, dyq), ("dk", dk, rdk, k64, dyk)):
        scale = (torch.rsqrt(x.detach().pow(2).sum(-1, keepdim=True) + L2NORM_EPS) * dy.double()).abs().max().item()
        assert_rel(got, want, tdx, f"{what}: {name}", floor=scale)
    assert torch.isfinite(dq.float()).all()
    _, _, rq, _ = L.qk_l2norm_forward(q.detach(), k.detach(), L2NORM_EPS)
    assert_rel(rq, torch.rsqrt(q64.detach().pow(2).sum(-1) + L2NORM_EPS), 1e-13 if dtype == torch.float64 else 1e-6,
               f"{what}: rstd")


def test_cuda_equals_cpu_kernels_float32():
    q, k = _views("tbhd", 2, 40, 4, 128, torch.float32, 3), _views("bthd", 2, 40, 4, 128, torch.float32, 4)
    got = L.qk_l2norm_forward(q, k, L2NORM_EPS)
    want = L.qk_l2norm_forward(q.cpu(), k.cpu(), L2NORM_EPS)
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=2e-6, atol=1e-7)


def test_one_kernel_launch_each_way():
    from torch.profiler import ProfilerActivity, profile

    q, k = (_views("bthd", 1, 256, 4, 128, torch.bfloat16, s).requires_grad_() for s in (5, 6))
    yq, yk = qk_l2norm(q, k)
    dy = torch.randn_like(yq)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.no_grad():
            qk_l2norm(q, k)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("l2norm_forward" in n for n in names) == 1 and len(names) == 1, names
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.autograd.grad((yq, yk), (q, k), (dy, dy))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("l2norm_backward" in n for n in names) == 1, names


def test_compile_fullgraph_matches_eager_cuda():
    q, k = _views("tbhd", 2, 64, 2, 64, torch.bfloat16, 7), _views("tbhd", 2, 64, 2, 64, torch.bfloat16, 8)

    def f(q, k):
        yq, yk = qk_l2norm(q, k)
        return (yq.float() * yk.float()).sum() + yq.float().square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.detach().requires_grad_() for x in (q, k)]
    leaves_c = [x.detach().requires_grad_() for x in (q, k)]
    torch.testing.assert_close(compiled(*leaves_c), f(*leaves))
    g = torch.autograd.grad(f(*leaves), leaves)
    g_c = torch.autograd.grad(compiled(*leaves_c), leaves_c)
    for a, b in zip(g_c, g):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("layout", ["bthd", "tbhd"])
def test_delta_rule_ops_unchanged_cuda(kind, layout):
    """use_qk_l2norm=True (fused) against the ops fed with q, k normalised by the unfused
    formula in the same dtype: equal up to the rounding of the normalised q, k."""
    op = {"gdn": lasp2.gated_delta_rule, "kda": lasp2.kda}[kind]
    gen = torch.Generator(device="cuda").manual_seed(9)
    B, T, H, K, V = 2, 160, 4, 64, 64
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, k, v = (rnd(B, T, H, K) * 2).bfloat16(), rnd(B, T, H, K).bfloat16(), rnd(B, T, H, V).bfloat16()
    g = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2.0) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    inputs = [q, k, v, g, beta]
    if layout == "tbhd":
        inputs = [x.transpose(0, 1).contiguous() for x in inputs]
    fused = [x.clone().requires_grad_() for x in inputs]
    plain = [x.clone().requires_grad_() for x in inputs]
    o, _ = op(*fused, use_qk_l2norm=True, layout=layout)
    o_ref, _ = op(unfused(plain[0]), unfused(plain[1]), *plain[2:], layout=layout)
    assert_rel(o, o_ref, 3e-2, f"{kind} {layout}: o")
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o.float() * do.float()).sum(), fused)
    grads_ref = torch.autograd.grad((o_ref.float() * do.float()).sum(), plain)
    for name, got, want in zip(("q", "k", "v", "g", "beta"), grads, grads_ref):
        assert_rel(got, want, 5e-2, f"{kind} {layout}: d{name}", floor=1.0 if name in ("g", "beta") else 1e-4)
