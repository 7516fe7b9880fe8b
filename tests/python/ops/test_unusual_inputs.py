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



def _doc_call(kind, x, final, **kw):
    """(o, final_state or None) of the kind's op on the tensors x, no initial state."""
    if kind in ("gdn", "kda"):
        op = lasp2.gated_delta_rule if kind == "gdn" else lasp2.kda
        return op(x["q"], x["k"], x["v"], x["gate"], x["beta"], output_final_state=final, **kw)
    gate = {"g": x["gate"]} if kind == "gate" else ({"decay": x["gate"]} if kind == "decay" else {})
    out = lasp2.linear_attention(x["q"], x["k"], x["v"], output_final_state=final, **gate, **kw)
    return out if final else (out, None)


@pytest.mark.parametrize("kind", ["gate", "decay", "none", "gdn", "kda"])
@pytest.mark.parametrize("final", [False, True], ids=["o", "o-and-final"])
def test_non_finite_values_stay_in_their_document(kind, final):
    """An inf or NaN in one packed document never reaches the next one: its rows (and final
    state) equal a call on that document alone. The CPU linear-attention kernels multiplied
    the state entering a chunk by its weight 0 past a document start (0 * inf = NaN), so a
    document starting in a later 64-token chunk than the bad token came out all NaN (session 22)."""
    T2, cut = 140, 70  # the second document starts in the second 64-token chunk
    gen = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = {"q": rnd(1, T2, H, K), "k": rnd(1, T2, H, K) / K, "v": rnd(1, T2, H, V),
         "beta": torch.rand(1, T2, H, generator=gen, dtype=torch.float64)}
    x["gate"] = (-torch.rand(H, generator=gen, dtype=torch.float64) if kind == "decay"
                 else F.logsigmoid(rnd(1, T2, H, K) if kind == "kda" else rnd(1, T2, H) + 2) / 2)
    x["k"][0, 3, 0, 1] = float("inf")
    x["v"][0, 5, 1, 0] = float("nan")
    o, final_states = _doc_call(kind, x, final, cu_seqlens=torch.tensor([0, cut, T2]))
    second = {n: t if n == "gate" and kind == "decay" else t[:, cut:] for n, t in x.items()}
    o_alone, final_alone = _doc_call(kind, second, final)
    assert torch.isfinite(o[:, cut:]).all()
    torch.testing.assert_close(o[:, cut:], o_alone, rtol=1e-10, atol=1e-12)
    if final:
        torch.testing.assert_close(final_states[1], final_alone[0], rtol=1e-6, atol=1e-7)  # fp32 states
