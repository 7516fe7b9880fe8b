"""Issue 13.2: softmax_attention with strided last dims and with scales <= 0
equals the float64 reference (these were silently wrong / NaN on the CPU kernel)."""

import pytest
import torch

import lasp2
from rel_helpers import assert_close_finite


def _reference(q, k, v, scale):
    q, k, v = (x.double() for x in (q, k, v))
    T = q.shape[1]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", s.softmax(-1), v)


def _check(q, k, v, scale, dtype, tol):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    o = lasp2.softmax_attention(*leaves, scale=scale)
    do = torch.randn_like(o)
    grads = torch.autograd.grad(o, leaves, do)
    ref_leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref = _reference(*ref_leaves, scale if scale is not None else q.shape[-1] ** -0.5)
    ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
    assert_close_finite("o", o, ref, tol)
    for name, a, b in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert_close_finite(name, a, b, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-10)])
@pytest.mark.parametrize("which", ["q", "k", "v", "all"])
def test_strided_last_dim(dtype, tol, which):
    gen = torch.Generator().manual_seed(1)
    base = {n: torch.randn(2, 9, 2, 16, generator=gen, dtype=dtype) for n in "qkv"}
    args = {n: (x[..., ::2] if which in (n, "all") else x[..., :8].contiguous()) for n, x in base.items()}
    assert which == "all" or args[which].stride(-1) == 2
    _check(args["q"], args["k"], args["v"], None, dtype, tol)


@pytest.mark.parametrize("scale", [0.0, -0.7, -1e-30])
def test_scale_zero_or_negative(scale):
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 7, 4, 8, generator=gen) for _ in range(3))
    _check(q, k[:, :, :2], v[:, :, :2], scale, torch.float32, 1e-4)  # with GQA
