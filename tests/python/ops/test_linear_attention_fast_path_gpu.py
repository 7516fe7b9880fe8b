"""lasp2.linear_attention's fast path for plain one-device CUDA calls (marker: gpu):
it must give what the checked path gives, bit for bit, and leave every other call
(anything unusual, anything wrong) to the checks and their messages."""

import pytest
import torch

import lasp2
from lasp2.ops import linear_attention as la_module

pytestmark = pytest.mark.gpu


def _count_validations(monkeypatch):
    """Counts the calls of the checked path's _validate."""
    calls = []
    real = la_module._validate

    def counted(*args):
        calls.append(1)
        return real(*args)

    monkeypatch.setattr(la_module, "_validate", counted)
    return calls


def _inputs(kind, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    q, k, v = (torch.randn(2, 300, 3, 64, device="cuda", generator=gen).to(dtype).requires_grad_()
               for _ in range(3))
    extra = {}
    if kind == "decay":
        extra["decay"] = (-0.1 * torch.rand(3, device="cuda", generator=gen)).requires_grad_()
    elif kind == "gate":
        extra["g"] = (-0.2 * torch.rand(2, 300, 3, device="cuda", generator=gen)).requires_grad_()
    do = torch.randn(2, 300, 3, 64, device="cuda", generator=gen).to(dtype)
    return q, k, v, extra, do


@pytest.mark.parametrize("kind", ["decay", "gate", "none"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fast_path_equals_the_checked_path(kind, dtype, monkeypatch):
    q, k, v, extra, do = _inputs(kind, dtype)
    leaves = (q, k, v, *extra.values())
    calls = _count_validations(monkeypatch)
    fast = lasp2.linear_attention(q, k, v, **extra)
    assert not calls  # the fast path ran
    fast_grads = torch.autograd.grad(fast, leaves, do)
    # an explicit scale (the default's value) takes the checked path
    checked = lasp2.linear_attention(q, k, v, scale=q.shape[3] ** -0.5, **extra)
    assert calls
    checked_grads = torch.autograd.grad(checked, leaves, do)
    assert torch.equal(fast, checked)
    for a, b in zip(fast_grads, checked_grads):
        assert torch.equal(a, b)


def test_fast_path_copies_strided_heads(monkeypatch):
    q, k, v, extra, do = _inputs("decay", torch.bfloat16)
    qs = q.detach().transpose(2, 3).contiguous().transpose(2, 3)  # last dim stride != 1
    calls = _count_validations(monkeypatch)
    o = lasp2.linear_attention(qs, k, v, **extra)
    assert not calls
    assert torch.equal(o, lasp2.linear_attention(q.detach(), k, v, **extra))


def test_unusual_or_wrong_calls_take_the_checks(monkeypatch):
    q, k, v, extra, _ = _inputs("decay", torch.bfloat16)
    calls = _count_validations(monkeypatch)
    lasp2.linear_attention(q, k, v, layout="tbhd", **extra)  # unusual: checked
    assert len(calls) == 1
    with pytest.raises(ValueError, match="`k` has dtype"):
        lasp2.linear_attention(q, k.float(), v, **extra)
    with pytest.raises(ValueError, match="`decay` must have shape"):
        lasp2.linear_attention(q, k, v, decay=extra["decay"][:2])
    with pytest.raises(ValueError, match="`decay` is on cpu"):
        lasp2.linear_attention(q, k, v, decay=extra["decay"].detach().cpu())
    with pytest.raises(ValueError, match="pass either `g`"):
        lasp2.linear_attention(q, k, v, g=torch.zeros(2, 300, 3, device="cuda"), **extra)
    with pytest.raises(ValueError, match="head dim"):
        lasp2.linear_attention(q, k, torch.zeros(2, 300, 3, 300, device="cuda", dtype=q.dtype), **extra)
    assert len(calls) == 6


def test_compiled_calls_trace_the_checked_path():
    """torch.compile(fullgraph=True) traces the checked path (the fast path steps aside
    while compiling) into the custom op: equal to the eager fast path's output and
    gradients."""
    q, k, v, extra, do = _inputs("decay", torch.bfloat16)
    f = lambda q, k, v, decay: lasp2.linear_attention(q, k, v, decay=decay)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = (q, k, v)
    o_c = compiled(q, k, v, extra["decay"].detach())
    o = f(q, k, v, extra["decay"].detach())
    torch.testing.assert_close(o_c, o)
    for a, b in zip(torch.autograd.grad(o_c, leaves, do), torch.autograd.grad(o, leaves, do)):
        torch.testing.assert_close(a, b)
