"""Issue 13.4: double backward through an op is an error that names the op, not a
gradient silently returned without its graph (which drops a gradient penalty)."""

import pytest
import torch

import lasp2


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 6, 2, 4, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]


OPS = {
    "linear_attention": lambda q, k, v: lasp2.linear_attention(q, k, v),
    "softmax_attention": lambda q, k, v: lasp2.softmax_attention(q, k, v),
}


@pytest.mark.parametrize("name", sorted(OPS))
def test_gradient_penalty_raises(name):
    q, k, v = _inputs()
    o = OPS[name](q, k, v)
    (dq,) = torch.autograd.grad(o.square().sum(), q, create_graph=True)
    assert dq.requires_grad, "the first-order gradient must keep a graph (that raises)"
    with pytest.raises(RuntimeError, match=f"lasp2.{name}: double backward"):
        dq.square().sum().backward()


@pytest.mark.parametrize("name", sorted(OPS))
def test_create_graph_without_second_order_use_is_fine(name):
    q, k, v = _inputs(1)
    o = OPS[name](q, k, v)
    grads = torch.autograd.grad(o.sum(), (q, k, v), create_graph=True)
    plain = torch.autograd.grad(OPS[name](q, k, v).sum(), (q, k, v))
    for a, b in zip(grads, plain):
        torch.testing.assert_close(a.detach(), b)
