"""Unusual but valid inputs to lasp2.linear_attention / gated_delta_rule / kda on CPU:
views with a zero stride (expand) or a step (slices of larger buffers) give the same
outputs, final states and gradients as contiguous copies of them; scale 0 and a
negative scale give zeros and the negated output; int32 and strided cu_seqlens give
what contiguous int64 ones give. (The bad inputs: the *_errors.py tables and
test_gated_delta_rule.py's delta_cases.)"""

import pytest
import torch
import torch.nn.functional as F

import lasp2

B, T, H, K, V = 1, 13, 2, 4, 3


def _inputs(kind, seed=0):
    """Contiguous float64 leaves: q, k, v, the gate (g, or decay for "decay"), beta (delta
    kinds), initial_state."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": rnd(B, T, H, K), "k": rnd(B, T, H, K) / K, "v": rnd(B, T, H, V), "h0": rnd(B, H, K, V)}
    if kind == "decay":
        x["gate"] = -torch.rand(H, generator=gen, dtype=torch.float64)
    else:
        x["gate"] = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2) / 2
    if kind in ("gdn", "kda"):
        x["beta"] = torch.sigmoid(rnd(B, T, H))
    return {n: t.requires_grad_() for n, t in x.items()}


def _run(kind, x, **kw):
    """(o, final_state) of the kind's op on the tensors x."""
    if kind in ("gdn", "kda"):
        op = lasp2.gated_delta_rule if kind == "gdn" else lasp2.kda
        return op(x["q"], x["k"], x["v"], x["gate"], x["beta"], initial_state=x["h0"], output_final_state=True, **kw)
    gate = {"g": x["gate"]} if kind == "gate" else {"decay": x["gate"]}
    return lasp2.linear_attention(x["q"], x["k"], x["v"], initial_state=x["h0"], output_final_state=True,
                                  **gate, **kw)


def _step_view(t, dim):
    """t's values as every other element along dim of a buffer twice as long (a
    differentiable view of t with a step of 2)."""
    both = torch.stack([t, torch.zeros_like(t)], dim + 1).flatten(dim, dim + 1)
    return both[(slice(None),) * dim + (slice(0, None, 2),)]


def _expanded(t, dim):
    """t's first slice along dim repeated with stride 0 (a differentiable view of t)."""
    return t.narrow(dim, 0, 1).expand(t.shape)


# (name, views of the inputs): each view is a function of the contiguous leaf
VIEWS = {
    "expanded over tokens": {"q": lambda t: _expanded(t, 1), "v": lambda t: _expanded(t, 1),
                             "gate": lambda t: _expanded(t, 0 if t.dim() == 1 else 1),
                             "beta": lambda t: _expanded(t, 1)},
    "expanded over heads": {"k": lambda t: _expanded(t, 2), "gate": lambda t: _expanded(t, 0 if t.dim() == 1 else 2),
                            "h0": lambda t: _expanded(t, 1)},
    "stepped": {"q": lambda t: _step_view(t, 1), "k": lambda t: _step_view(t, 3), "v": lambda t: _step_view(t, 3),
                "gate": lambda t: _step_view(t, t.dim() - 1), "beta": lambda t: _step_view(t, 1),
                "h0": lambda t: _step_view(t, 2)},
}


@pytest.mark.parametrize("kind", ["gate", "decay", "gdn", "kda"])
@pytest.mark.parametrize("views", list(VIEWS), ids=lambda s: s.replace(" ", "-"))
def test_views_match_contiguous_copies(kind, views):
    x = _inputs(kind)
    viewed = {n: VIEWS[views].get(n, lambda t: t)(t) for n, t in x.items()}
    assert any(v.stride() != v.contiguous().stride() for v in viewed.values())
    copied = {n: t.contiguous() for n, t in viewed.items()}
    leaves = list(x.values())
    results = []
    for inputs in (viewed, copied):
        o, final = _run(kind, inputs)
        grads = torch.autograd.grad((o * o.detach().cos()).sum() + (final * final.detach().sin()).sum(), leaves)
        results.append((o, final, grads))
    (o1, f1, g1), (o2, f2, g2) = results
    torch.testing.assert_close(o1, o2, rtol=0, atol=0)
    torch.testing.assert_close(f1, f2, rtol=0, atol=0)
    for name, a, b in zip(x, g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("kind", ["gate", "decay", "gdn", "kda"])
def test_scale_zero_and_negative(kind):
    """o = scale * (state^T q): scale 0 gives zeros, -s the negated output of s; the states
    do not depend on it."""
    x = _inputs(kind)
    o, final = _run(kind, x, scale=0.7)
    o_neg, final_neg = _run(kind, x, scale=-0.7)
    o_zero, final_zero = _run(kind, x, scale=0.0)
    assert o.abs().max() > 0.1
    torch.testing.assert_close(o_neg, -o, rtol=0, atol=0)
    assert torch.equal(o_zero, torch.zeros_like(o))
    torch.testing.assert_close(final_neg, final, rtol=0, atol=0)
    torch.testing.assert_close(final_zero, final, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["gate", "decay", "gdn", "kda"])
def test_cu_seqlens_int32_and_strided(kind):
    x = _inputs(kind)
    x["h0"] = torch.randn(3, H, K, V, dtype=torch.float64)
    cu = torch.tensor([0, 5, 6, T])
    o, final = _run(kind, x, cu_seqlens=cu)
    strided = torch.tensor([0, 99, 5, 99, 6, 99, T])[::2]
    assert not strided.is_contiguous()
    for other in (cu.to(torch.int32), strided, strided.to(torch.int32)):
        o2, final2 = _run(kind, x, cu_seqlens=other)
        torch.testing.assert_close(o2, o, rtol=0, atol=0)
        torch.testing.assert_close(final2, final, rtol=0, atol=0)
