"""The eager path of lasp2.linear_attention (lasp2/ops/_eager.py: an autograd.Function
instead of the registered custom op) skips host work the custom op needs (zero fills of
internal saved buffers, zero gradients of outputs the loss does not use, a second gate
check): its results must stay the custom op's, bit for bit, whichever outputs the loss
uses, and its checks must still fire."""

import pytest
import torch

import lasp2
from lasp2.ops import _library


def _inputs(seed=0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 16, 2, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(2, 16, 2, generator=gen, dtype=torch.float64))
    s0 = torch.randn(2, 2, 8, 8, generator=gen, dtype=torch.float64)
    return [x.requires_grad_() for x in (q, k, v, g, s0)]


def _grads(loss_of, eager, monkeypatch):
    monkeypatch.setattr(_library, "eager_call", _library.eager_call if eager else (lambda *a: False))
    q, k, v, g, s0 = leaves = _inputs()
    o, final = lasp2.linear_attention(q, k, v, g=g, initial_state=s0, output_final_state=True)
    return [o.detach(), final.detach(), *torch.autograd.grad(loss_of(o, final), leaves)]


@pytest.mark.parametrize("uses", ["o", "final", "both"])
def test_eager_path_equals_the_custom_op(uses, monkeypatch):
    def loss(o, final):
        parts = {"o": (o * o).sum(), "final": final.sum() * 0.5}
        return sum(parts[u] for u in (("o", "final") if uses == "both" else (uses,)))

    eager = _grads(loss, True, monkeypatch)
    custom = _grads(loss, False, monkeypatch)
    for a, b in zip(eager, custom):
        assert torch.equal(a, b)
    assert all(bool(torch.isfinite(x).all()) for x in eager)
    if uses == "final":  # o took no part: its gradient arrives as None on the eager path, as zeros here
        assert eager[3].abs().sum() > 0  # dk (the final state does not depend on q)


def test_eager_path_keeps_the_gate_check():
    q, k, v, g, _ = _inputs()
    with pytest.raises(ValueError, match="`g`"):
        lasp2.linear_attention(q, k, v, g=g.detach().abs() + 0.1)
