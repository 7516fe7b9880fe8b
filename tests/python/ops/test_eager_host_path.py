"""The trimmed eager path of lasp2.linear_attention (one device, no documents, no states:
straight to the op, the binding's C++ autograd node; test_eager_node.py holds it to the
Python eager Function too) must give the registered custom op's results bit for bit,
and a float64 reference's within rounding, for every decay kind, scale and create_graph."""

import pytest
import torch

import lasp2
from lasp2.ops import _library


def _reference(q, k, v, log_a, scale):
    """Token-by-token recurrence S_t = a_t S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t."""
    B, T, H, D = q.shape
    out = torch.zeros(B, T, H, v.shape[3], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = torch.zeros(D, v.shape[3], dtype=torch.float64)
            for t in range(T):
                s = torch.exp(log_a[b, t, h]) * s + torch.outer(k[b, t, h], v[b, t, h])
                out[b, t, h] = scale * (q[b, t, h] @ s)
    return out


def _run(kind, scale, eager, monkeypatch, seed=0):
    monkeypatch.setattr(_library, "eager_call", _library.eager_call if eager else (lambda *a: False))
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 40, 3, 8, generator=gen, dtype=torch.float64).requires_grad_() for _ in range(3))
    g = (-0.2 * torch.rand(2, 40, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    decay = (-0.1 * torch.rand(3, generator=gen, dtype=torch.float64)).requires_grad_()
    kw = {"gate": dict(g=g), "decay": dict(decay=decay), "none": {}}[kind]
    leaves = [q, k, v, *kw.values()]
    o = lasp2.linear_attention(q, k, v, scale=scale, **kw)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
    grads = torch.autograd.grad(o, leaves, do)
    log_a = {"gate": g, "decay": decay.expand(2, 40, 3), "none": torch.zeros(2, 40, 3, dtype=torch.float64)}[kind]
    return o.detach(), grads, _reference(q.detach(), k.detach(), v.detach(), log_a.detach(),
                                         8 ** -0.5 if scale is None else scale)


@pytest.mark.parametrize("kind", ["gate", "decay", "none"])
def test_eager_host_path_equals_custom_op_and_reference(kind, monkeypatch):
    # two scales in a row: the cached config of the first must not serve the second
    for scale in (None, 0.25, None):
        o, grads, ref = _run(kind, scale, True, monkeypatch)
        o_op, grads_op, _ = _run(kind, scale, False, monkeypatch)
        assert torch.equal(o, o_op)
        for a, b in zip(grads, grads_op):
            assert torch.equal(a, b)
        torch.testing.assert_close(o, ref, rtol=1e-10, atol=1e-10)


def test_eager_host_path_create_graph_refuses_double_backward():
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64).requires_grad_() for _ in range(3))
    o = lasp2.linear_attention(q, k, v)
    (dq,) = torch.autograd.grad(o.sum(), [q], create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()


def test_eager_host_path_checks_name_the_argument():
    q, k, v = (torch.randn(1, 16, 2, 8) for _ in range(3))
    with pytest.raises(ValueError, match="`k` has dtype"):
        lasp2.linear_attention(q, k.double(), v)
    with pytest.raises(ValueError, match="`v` must be a torch.Tensor"):
        lasp2.linear_attention(q, k, v.numpy())
    with pytest.raises(ValueError, match="`q` must have 4 dimensions"):
        lasp2.linear_attention(q[0], k, v)
