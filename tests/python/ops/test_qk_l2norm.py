"""The fused L2 norm of q and k (lasp2/ops/_l2norm_library.py, CPU kernels of
csrc/core/qk_l2norm.cpp) against the unfused formula x * rsqrt(sum x^2 + eps) evaluated
in float64 with autograd: values, rstd and gradients for every dtype and several head
dims, strided inputs (Megatron's tbhd views, slices of a fused projection, a strided
last dim), zero rows, NaN / Inf, gradcheck, opcheck of both custom ops, torch.compile
(fullgraph) equal to eager, and the delta-rule ops with use_qk_l2norm equal to the ops
fed with q and k normalised by the unfused formula."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops import _l2norm_library as L
from lasp2.ops._l2norm_library import L2NORM_EPS, qk_l2norm
from lasp2_testing.checks import assert_rel
from lasp2_testing.compiled import assert_compiled_matches_eager
from lasp2_testing.delta_rule import l2norm_reference as unfused  # the formula the op replaces

TOL = {torch.float64: 1e-13, torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}



def reference(q, k, dq_hat, dk_hat):
    """(q_hat, k_hat, rstd_q, rstd_k, dq, dk) of the formula in float64, by autograd."""
    q64, k64 = (x.detach().double().requires_grad_() for x in (q, k))
    yq, yk = unfused(q64), unfused(k64)
    dq, dk = torch.autograd.grad((yq * dq_hat.double()).sum() + (yk * dk_hat.double()).sum(), (q64, k64))
    rstd = lambda x: torch.rsqrt(x.detach().double().pow(2).sum(-1) + L2NORM_EPS)  # noqa: E731
    return yq.detach(), yk.detach(), rstd(q), rstd(k), dq, dk


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def run_and_check(q, k, tol, what):
    q, k = q.detach().requires_grad_(), k.detach().requires_grad_()
    yq, yk = qk_l2norm(q, k)
    assert yq.dtype == q.dtype and yq.shape == q.shape and yk.shape == k.shape
    dq_hat, dk_hat = rand(*q.shape, dtype=q.dtype, seed=7), rand(*k.shape, dtype=k.dtype, seed=8)
    dq, dk = torch.autograd.grad((yq * dq_hat).sum() + (yk * dk_hat).sum(), (q, k))
    ryq, ryk, rq, rk, rdq, rdk = reference(q, k, dq_hat, dk_hat)
    # dx = rstd (dy - y <dy, y>) cancels (at D = 1 to ~eps / x^2): its error is relative
    # to the scale of rstd * dy
    scale_q, scale_k = ((r[..., None] * d.double()).abs().max().item() for r, d in ((rq, dq_hat), (rk, dk_hat)))
    for name, got, want, floor in (("q_hat", yq, ryq, 1e-4), ("k_hat", yk, ryk, 1e-4), ("dq", dq, rdq, scale_q),
                                   ("dk", dk, rdk, scale_k)):
        assert got.dtype == q.dtype, name
        assert_rel(got, want, tol, f"{what}: {name}", floor=floor)
    return yq, yk, dq, dk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [1, 7, 64, 128, 300])
def test_matches_float64_formula(dtype, D):
    q, k = rand(2, 5, 3, D, dtype=dtype, seed=D), rand(2, 5, 3, D, dtype=dtype, seed=D + 1, scale=3.0)
    run_and_check(q, k, TOL[dtype], f"{dtype} D={D}")


def test_rstd_outputs_match_the_formula():
    for dtype, acc in ((torch.float64, torch.float64), (torch.float32, torch.float32), (torch.bfloat16, torch.float32)):
        q, k = rand(3, 4, 2, 16, dtype=dtype), rand(3, 4, 2, 16, dtype=dtype, seed=1)
        yq, yk, rq, rk = L.qk_l2norm_forward(q, k, L2NORM_EPS)
        assert rq.dtype == acc and rq.shape == q.shape[:-1] and rq.is_contiguous()
        _, _, want_q, want_k, _, _ = reference(q, k, q, k)
        assert_rel(rq, want_q, 1e-13 if dtype == torch.float64 else 1e-6, f"rstd_q {dtype}")
        assert_rel(rk, want_k, 1e-13 if dtype == torch.float64 else 1e-6, f"rstd_k {dtype}")


def test_gradcheck_float64():
    q, k = rand(2, 3, 2, 5, seed=2), rand(2, 3, 2, 5, seed=3)
    q[0, 1, 0] = 0.0  # a zero row: eps keeps the gradient finite
    inputs = (q.requires_grad_(), k.requires_grad_())
    assert torch.autograd.gradcheck(lambda q, k: qk_l2norm(q, k), inputs)
    # tbhd views and D = 1
    t = lambda x: x.transpose(0, 1).contiguous().transpose(0, 1).detach().requires_grad_()  # noqa: E731
    assert torch.autograd.gradcheck(lambda q, k: qk_l2norm(q, k), (t(rand(2, 3, 2, 5, seed=4)), t(rand(2, 3, 2, 5, seed=5))))
    assert torch.autograd.gradcheck(lambda q, k: qk_l2norm(q, k), (rand(2, 3, 1, 1, seed=6).requires_grad_(),
                                                                   rand(2, 3, 1, 1, seed=7).requires_grad_()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_inputs_equal_contiguous(dtype):
    """Megatron's [T, B, H, D] seen as [B, T, H, D] (layout kept), a slice of a fused qkv
    projection (not dense: comes back contiguous), a strided last dim (copied first)."""
    B, T, H, D = 2, 6, 3, 8
    q, k = rand(B, T, H, D, dtype=dtype, seed=1), rand(B, T, H, D, dtype=dtype, seed=2)
    want = run_and_check(q, k, TOL[dtype], "contiguous")
    tbhd = lambda x: x.transpose(0, 1).contiguous().transpose(0, 1)  # noqa: E731
    fused = torch.cat([q, k, q], dim=-1)  # [B, T, H, 3D]: q and k are slices
    strided_last = lambda x: torch.stack([x, x], dim=-1)[..., 0]  # noqa: E731 - last-dim stride 2
    for what, qv, kv in (("tbhd", tbhd(q), tbhd(k)), ("qkv slices", fused[..., :D], fused[..., D:2 * D]),
                         ("last-dim stride 2", strided_last(q), strided_last(k))):
        assert torch.equal(qv, q) and torch.equal(kv, k)
        got = run_and_check(qv, kv, TOL[dtype], what)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)  # the same kernel per row: same bits
    yq, _ = qk_l2norm(tbhd(q), tbhd(k))
    assert yq.stride() == tbhd(q).stride()  # a dense layout is kept (empty_like)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_rows_stay_finite(dtype):
    q, k = rand(1, 4, 2, 6, dtype=dtype), rand(1, 4, 2, 6, dtype=dtype, seed=1)
    q[0, 2] = 0.0
    k[0, 0, 1] = 0.0
    yq, yk, dq, dk = run_and_check(q, k, TOL[dtype], "zero rows")
    assert torch.equal(yq[0, 2], torch.zeros_like(yq[0, 2])) and torch.equal(yk[0, 0, 1], torch.zeros_like(yk[0, 0, 1]))
    for g in (dq, dk):
        assert torch.isfinite(g.float()).all()
    _, _, rq, _ = L.qk_l2norm_forward(q, k, L2NORM_EPS)
    assert abs(rq[0, 2, 0].item() - L2NORM_EPS ** -0.5) < 1e-3  # 1 / sqrt(eps) = 1000


def test_nan_and_inf_follow_the_formula():
    q, k = rand(1, 3, 2, 4, dtype=torch.float32), rand(1, 3, 2, 4, dtype=torch.float32, seed=1)
    q[0, 0, 0, 1] = float("inf")
    q[0, 1, 1, 2] = float("nan")
    k[0, 2, 0, 3] = float("-inf")
    yq, yk = qk_l2norm(q, k)
    torch.testing.assert_close(yq, unfused(q), equal_nan=True)
    torch.testing.assert_close(yk, unfused(k), equal_nan=True)
    assert torch.isnan(yq[0, 0, 0, 1]) and (yq[0, 0, 0, [0, 2, 3]] == 0).all()  # rstd 0: inf * 0 = NaN
    assert torch.isfinite(yq[0, 2]).all()  # other rows untouched


def test_gradients_only_where_needed_and_unused_outputs():
    q, k = rand(2, 3, 2, 4, seed=1), rand(2, 3, 2, 4, seed=2).requires_grad_()
    _, yk = qk_l2norm(q, k)  # q needs no gradient; q_hat unused
    dy = rand(2, 3, 2, 4, seed=3)
    (dk,) = torch.autograd.grad((yk * dy).sum(), (k,))
    _, _, _, _, _, want = reference(q, k, torch.zeros_like(q), dy)
    assert_rel(dk, want, 1e-13, "dk")


def test_bad_arguments_name_them():
    q = rand(2, 3, 2, 4)
    with pytest.raises(ValueError, match="`k` must have the shape of `q`"):
        qk_l2norm(q, rand(2, 3, 2, 5))
    with pytest.raises(ValueError, match="`k` must have the dtype of `q`"):
        qk_l2norm(q, q.float())
    with pytest.raises(ValueError, match="`q` has an unsupported dtype"):
        qk_l2norm(q.long(), q.long())
    with pytest.raises(ValueError, match="`q` must have 1 to 4 dims"):
        qk_l2norm(q[None], q[None])


def test_opcheck():
    q, k = rand(2, 5, 3, 8, seed=1).requires_grad_(), rand(2, 5, 3, 8, seed=2).requires_grad_()
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic", "test_autograd_registration")
    torch.library.opcheck(L.qk_l2norm_forward, (q, k, L2NORM_EPS), test_utils=utils)
    tq = q.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # tbhd strides
    torch.library.opcheck(L.qk_l2norm_forward, (tq, k, L2NORM_EPS), test_utils=utils)
    yq, yk, rq, rk = L.qk_l2norm_forward(q.detach(), k.detach(), L2NORM_EPS)
    torch.library.opcheck(L.qk_l2norm_backward, (rand(2, 5, 3, 8, seed=3), rand(2, 5, 3, 8, seed=4), yq, yk, rq, rk),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("layout", ["bthd", "tbhd"])
def test_compile_fullgraph_matches_eager(layout):
    q, k = rand(2, 6, 2, 8, dtype=torch.float32, seed=1), rand(2, 6, 2, 8, dtype=torch.float32, seed=2)
    if layout == "tbhd":
        q, k = (x.transpose(0, 1).contiguous() for x in (q, k))

    def f(q, k):
        if layout == "tbhd":
            q, k = q.transpose(0, 1), k.transpose(0, 1)
        yq, yk = qk_l2norm(q, k)
        return (yq * torch.arange(8.0)).square().sum() + (yk.sin() * yq).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k), f(q, k))
    assert_compiled_matches_eager(f, (q, k), ("q", "k"), compiled=compiled)


def test_double_backward_raises():
    q, k = rand(2, 3, 2, 4).requires_grad_(), rand(2, 3, 2, 4, seed=1).requires_grad_()
    yq, yk = qk_l2norm(q, k)
    (dq,) = torch.autograd.grad((yq * yq.detach()).sum() + yk.sum(), (q,), create_graph=True)
    with pytest.raises(RuntimeError, match="lasp2.qk_l2norm: double backward"):
        dq.sum().backward()


def test_func_transforms_raise_a_clear_error():
    q, k = rand(2, 3, 2, 4), rand(2, 3, 2, 4, seed=1)
    with pytest.raises(NotImplementedError, match="lasp2.qk_l2norm: torch.func transforms"):
        torch.func.grad(lambda q: qk_l2norm(q, k)[0].sum())(q)


def _delta_inputs(kind, dtype, B=2, T=11, H=2, K=6, V=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, T, H, K) * 2, rnd(B, T, H, K), rnd(B, T, H, V)
    g = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2.0) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    return [x.to(dtype) for x in (q, k, v, g, beta)]


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("layout", ["bthd", "tbhd"])
def test_delta_rule_ops_unchanged(kind, dtype, tol, layout):
    """use_qk_l2norm=True (the fused op) equals the op fed with q and k normalised by the
    unfused formula (what use_qk_l2norm did before): output and every gradient."""
    op = {"gdn": lasp2.gated_delta_rule, "kda": lasp2.kda}[kind]
    inputs = _delta_inputs(kind, dtype)
    if layout == "tbhd":
        inputs = [x.transpose(0, 1).contiguous() for x in inputs]
    fused = [x.clone().requires_grad_() for x in inputs]
    plain = [x.clone().requires_grad_() for x in inputs]
    o, _ = op(*fused, use_qk_l2norm=True, layout=layout)
    o_ref, _ = op(unfused(plain[0]), unfused(plain[1]), *plain[2:], layout=layout)
    assert_rel(o, o_ref, tol, f"{kind} {dtype} {layout}: o")
    do = torch.randn_like(o)
    grads = torch.autograd.grad((o * do).sum(), fused)
    grads_ref = torch.autograd.grad((o_ref * do).sum(), plain)
    for name, got, want in zip(("q", "k", "v", "g", "beta"), grads, grads_ref):
        assert_rel(got, want, tol, f"{kind} {dtype} {layout}: d{name}")
