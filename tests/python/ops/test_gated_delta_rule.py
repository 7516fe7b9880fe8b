"""lasp2.gated_delta_rule / lasp2.kda on one process against the float64 step-by-step
recurrence (delta_rule_reference.py): outputs, gradients of every input, initial
states in and final states out, packed documents, layouts, the L2 norm option,
gradcheck in float64, and errors that name the argument."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import assert_rel
from lasp2_testing.delta_rule_reference import delta_rule_reference

OPS = {"gdn": lasp2.gated_delta_rule, "kda": lasp2.kda}


def make_inputs(kind, B=2, T=19, H=2, K=6, V=5, dtype=torch.float64, seed=0, docs=None):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K) / K ** 0.5, rnd(B, T, H, V)
    g = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2.0) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    N = B if docs is None else len(docs) - 1
    h0 = rnd(N, H, K, V) * 0.5
    return [x.to(dtype) for x in (q, k, v, g, beta)] + [h0.to(dtype)]


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_matches_recurrence_float64(kind, packed, with_state):
    cu = torch.tensor([0, 3, 4, 11, 19], dtype=torch.int64) if packed else None
    q, k, v, g, beta, h0 = make_inputs(kind, B=1 if packed else 2, docs=cu.tolist() if packed else None)
    h0 = h0 if with_state else None
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta) + ((h0,) if with_state else ())]
    o, final = OPS[kind](*leaves[:5], scale=0.7, initial_state=leaves[5] if with_state else None,
                         output_final_state=True, cu_seqlens=cu, chunk_size=4)
    ref_leaves = [x.clone().requires_grad_() for x in leaves]
    o_ref, final_ref = delta_rule_reference(*ref_leaves[:5], 0.7, ref_leaves[5] if with_state else None, cu)
    # states (initial ones included) are fp32 in the core
    assert_rel(o, o_ref, 1e-6 if with_state else 1e-10, "o")
    assert_rel(final, final_ref, 1e-6, "final state")  # fp32 states
    do, dF = torch.randn_like(o), torch.randn_like(final)
    grads = torch.autograd.grad((o * do).sum() + (final * dF).sum(), leaves)
    grads_ref = torch.autograd.grad((o_ref * do).sum() + (final_ref * dF).sum(), ref_leaves)
    for name, got, want in zip(("q", "k", "v", "g", "beta", "initial_state"), grads, grads_ref):
        assert_rel(got, want, 1e-6, f"d{name}")  # the final state's gradient travels in fp32


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_float32_and_default_scale(kind):
    q, k, v, g, beta, _ = make_inputs(kind, dtype=torch.float32, T=70)
    o, final = OPS[kind](q, k, v, g, beta)
    assert final is None and o.dtype == torch.float32
    o_ref, _ = delta_rule_reference(q, k, v, g, beta, q.shape[-1] ** -0.5)
    assert_rel(o, o_ref, 2e-5, "o float32")


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_tbhd_layout_and_l2norm(kind):
    q, k, v, g, beta, _ = make_inputs(kind, T=9)
    o, _ = OPS[kind](q, k, v, g, beta, use_qk_l2norm=True)
    nq, nk = (x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6) for x in (q, k))
    o_ref, _ = delta_rule_reference(nq, nk, v, g, beta, q.shape[-1] ** -0.5)
    assert_rel(o, o_ref, 1e-10, "o with l2norm")
    t = lambda x: x.transpose(0, 1).contiguous()
    o_t, _ = OPS[kind](t(q), t(k), t(v), t(g), t(beta), use_qk_l2norm=True, layout="tbhd")
    assert_rel(o_t.transpose(0, 1), o, 1e-12, "tbhd")


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_gradcheck(kind):
    q, k, v, g, beta, h0 = make_inputs(kind, B=1, T=5, H=1, K=3, V=2, seed=3)
    cu = torch.tensor([0, 2, 5])
    h0 = torch.cat([h0, h0 * 0.5])  # two documents

    def fn(q, k, v, g, beta, h0):
        o, final = OPS[kind](q, k, v, g, beta, scale=0.9, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, chunk_size=2)
        return o, final

    inputs = [x.clone().requires_grad_() for x in (q, k, v, g, beta)]
    h0 = h0.requires_grad_()
    # o in float64 with the (fp32) initial states held fixed
    assert torch.autograd.gradcheck(lambda *a: fn(*a, h0.detach())[0], inputs, eps=1e-6, atol=1e-6, rtol=1e-5)
    # Both outputs are affine in the initial states, which the core keeps in fp32:
    # a large step is exact up to fp32 rounding.
    assert torch.autograd.gradcheck(lambda h: fn(*inputs, h), [h0], eps=1e-2, atol=1e-4, rtol=1e-3)
    # Final states come from the fp32 part summaries.
    assert torch.autograd.gradcheck(lambda *a: fn(*a, h0.detach())[1], inputs, eps=1e-3, atol=5e-4, rtol=5e-3)


def errors_case(kind, **overrides):
    q, k, v, g, beta, h0 = make_inputs(kind, B=2, T=6)
    args = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=h0)
    args.update(overrides)
    return args


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("name, make", [
    ("beta", lambda a: {"beta": a["beta"] + 1.0}),
    ("beta", lambda a: {"beta": -a["beta"]}),
    ("beta", lambda a: {"beta": a["beta"][..., :1]}),
    ("g", lambda a: {"g": a["g"].abs() + 0.1}),
    ("g", lambda a: {"g": a["g"][:, :3]}),
    ("k", lambda a: {"k": a["k"][..., :4]}),
    ("v", lambda a: {"v": a["v"][:, :4]}),
    ("initial_state", lambda a: {"initial_state": a["initial_state"][:1]}),
    ("initial_state", lambda a: {"initial_state": a["initial_state"].to(torch.int64)}),
    ("initial_state", lambda a: {"initial_state": a["initial_state"].transpose(2, 3)}),
    ("provider", lambda a: {"provider": "ulysses"}),
    ("split", lambda a: {"split": "zigzag"}),
    ("layout", lambda a: {"layout": "bhtd"}),
])
def test_bad_input_names_the_argument(kind, name, make):
    args = errors_case(kind)
    args.update(make(args))
    with pytest.raises(ValueError, match=f"`{name}`"):
        OPS[kind](**args)


def test_gdn_rejects_per_key_gates_and_empty_documents():
    q, k, v, g, beta, _ = make_inputs("kda", B=1, T=6)
    with pytest.raises(ValueError, match="`g`"):
        lasp2.gated_delta_rule(q, k, v, g, beta)
    with pytest.raises(ValueError, match="`cu_seqlens`"):
        lasp2.kda(q, k, v, g, beta, cu_seqlens=torch.tensor([0, 3, 3, 6]))
