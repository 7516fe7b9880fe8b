"""lasp2.gated_delta_rule / lasp2.kda on one process against the float64 step-by-step
recurrence (lasp2_testing/delta_rule.py): outputs, gradients of every input, initial
states in and final states out, packed documents, layouts, the L2 norm option,
gradcheck in float64, and errors that name the argument."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import assert_rel
from lasp2_testing.errors import ATTENTION_CASES, BadCall, call, expect_bad_call
from lasp2_testing.delta_rule import delta_rule_reference, l2norm_reference

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
    check_against_recurrence(kind, packed, with_state)


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("packed", [False, True])
def test_full_reset_gates_match_recurrence(kind, packed):
    """A log gate of -inf forgets the state (exp(g) = 0): valid input, finite results
    equal to the recurrence (the CPU kernels returned NaN from the first -inf on, and
    a gate of -1e30 cancelled its chunk neighbours' gates)."""

    def reset(g):
        # the part's first token, a chunk edge (64), inside chunks (70, 71), right after
        # a document start (141); for KDA some key dims only
        g = g.clone()
        dims = (slice(None), 0) if g.dim() == 3 else (slice(None), 0, slice(0, 3))
        for t in (0, 64, 70, 71, 141):
            g[(slice(None), t) + dims[1:]] = float("-inf")
        g[(slice(None), 100) + dims[1:]] = -1e30  # exp is 0 in double: a reset too
        return g

    check_against_recurrence(kind, packed, True, spoil_gates=reset)


def check_against_recurrence(kind, packed, with_state, spoil_gates=None):
    # 150 tokens cross the CPU kernels' 64-token chunk edges; a 1-token document, one over two edges
    cu = torch.tensor([0, 3, 4, 11, 140, 150], dtype=torch.int64) if packed else None
    q, k, v, g, beta, h0 = make_inputs(kind, B=1 if packed else 2, T=150, docs=cu.tolist() if packed else None)
    h0 = h0 if with_state else None
    if spoil_gates is not None:
        g = spoil_gates(g)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta) + ((h0,) if with_state else ())]
    o, final = OPS[kind](*leaves[:5], scale=0.7, initial_state=leaves[5] if with_state else None,
                         output_final_state=True, cu_seqlens=cu)
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
@pytest.mark.parametrize("dtype, tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_half_precision_inputs(kind, dtype, tol):
    """The CPU computes half-precision inputs in fp32 and returns their dtype."""
    q, k, v, g, beta, h0 = make_inputs(kind, T=40, dtype=torch.float32)
    qh, kh, vh = (x.to(dtype).requires_grad_() for x in (q, k, v))
    o, final = OPS[kind](qh, kh, vh, g, beta, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and final.dtype == torch.float32
    o_ref, final_ref = delta_rule_reference(qh.detach(), kh.detach(), vh.detach(), g, beta,
                                            q.shape[-1] ** -0.5, h0)
    assert_rel(o, o_ref, tol, f"o {dtype}")
    assert_rel(final, final_ref, 1e-5, f"final state {dtype}")
    o.float().sum().backward()
    assert qh.grad.dtype == dtype and torch.isfinite(qh.grad.float()).all()


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_tbhd_layout_and_l2norm(kind):
    q, k, v, g, beta, _ = make_inputs(kind, T=9)
    o, _ = OPS[kind](q, k, v, g, beta, use_qk_l2norm=True)
    nq, nk = l2norm_reference(q), l2norm_reference(k)
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
                             cu_seqlens=cu)
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


def test_sp_context_supplies_documents():
    from lasp2.distributed.context import build_sp_context

    q, k, v, g, beta, _ = make_inputs("gdn", B=1, T=9)
    cu = torch.tensor([0, 4, 9])
    o, _ = lasp2.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu)
    ctx = build_sp_context(group=None, split="contiguous", cu_seqlens=cu, seqlen=9)
    o_ctx, _ = lasp2.gated_delta_rule(q, k, v, g, beta, sp_context=ctx)
    assert torch.equal(o, o_ctx)
    with pytest.raises(ValueError, match="`sp_context`"):
        lasp2.gated_delta_rule(q, k, v, g, beta, sp_context=ctx, cu_seqlens=cu)


def qkv(B=1, T=8, H=2, D=4, dtype=torch.float32):
    return tuple(torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))


def valid_gates(kind):
    """The op with valid g and beta (shaped after q) unless the call gives its own."""
    op = OPS[kind]

    def call_op(q, k, v, g=None, beta=None, **kw):
        if isinstance(q, torch.Tensor) and q.dim() == 4:
            shape = list(q.shape[:3]) + ([q.shape[3]] if kind == "kda" else [])
            g = -0.1 * torch.ones(shape, dtype=torch.float64) if g is None else g
            beta = 0.5 * torch.ones(list(q.shape[:3]), dtype=torch.float64) if beta is None else beta
        return op(q, k, v, g, beta, **kw)
    return call_op


def with_gates(kind, name, match, spoil, **inputs):
    """A row whose spoil gets valid (q, k, v, g, beta, initial_state) to spoil."""
    def spoil_qkv(q, k, v):
        shape = list(q.shape[:3]) + ([q.shape[3]] if kind == "kda" else [])
        g = -0.1 * torch.ones(shape, dtype=q.dtype)
        beta = 0.5 * torch.ones(list(q.shape[:3]), dtype=q.dtype)
        h0 = torch.zeros(q.shape[0], q.shape[2], q.shape[3], v.shape[3], dtype=q.dtype)
        return spoil(q, k, v, g, beta, h0)
    return BadCall(name, match, spoil_qkv, inputs=inputs)


def delta_cases(kind):
    return [
        with_gates(kind, "beta above 1", "`beta` must lie in", lambda q, k, v, g, b, h: call(q, k, v, g, b + 1)),
        with_gates(kind, "beta below 0", "`beta` must lie in", lambda q, k, v, g, b, h: call(q, k, v, g, -b)),
        with_gates(kind, "beta nan", "`beta` must lie in", lambda q, k, v, g, b, h: call(q, k, v, g, b * float("nan"))),
        with_gates(kind, "beta shape", "`beta` must have shape", lambda q, k, v, g, b, h: call(q, k, v, g, b[..., :1])),
        with_gates(kind, "g positive", "`g` holds log gates, which must be <= 0",
                   lambda q, k, v, g, b, h: call(q, k, v, -g, b)),
        with_gates(kind, "g shape", "`g` must have shape", lambda q, k, v, g, b, h: call(q, k, v, g[:, :3], b)),
        with_gates(kind, "g rank", "`g` must have", lambda q, k, v, g, b, h: call(q, k, v, g[..., None], b)),
        with_gates(kind, "k shape", "`k` must have the shape of `q`", lambda q, k, v, g, b, h: call(q, k[..., :2], v, g, b)),
        with_gates(kind, "v shape", "`v` must match `q`", lambda q, k, v, g, b, h: call(q, k, v[:, :4], g, b)),
        with_gates(kind, "initial_state rows", r"`initial_state` must have shape \[1, 2, 4, 4\]",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=torch.cat([h, h]))),
        with_gates(kind, "initial_state dims", "`initial_state` must have shape",
                   lambda q, k, v, g, b, h: call(q, k, v[..., :3], g, b, initial_state=h)),
        with_gates(kind, "initial_state dtype", "`initial_state` must be float32",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h.long())),
        with_gates(kind, "initial_state not a tensor", "`initial_state` must be a torch.Tensor",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h.tolist())),
        with_gates(kind, "initial_state per document", r"`initial_state` must have shape \[3, 2, 4, 4\]",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h,
                                                 cu_seqlens=torch.tensor([0, 2, 3, 8]))),
        with_gates(kind, "empty document", "`cu_seqlens` must be strictly increasing",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, cu_seqlens=torch.tensor([0, 3, 3, 8]))),
        with_gates(kind, "provider", "`provider` must be one of", lambda q, k, v, g, b, h: call(q, k, v, g, b, provider="ring")),
        with_gates(kind, "output_final_state type", "`output_final_state` must be a bool",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, output_final_state="yes")),
        with_gates(kind, "use_qk_l2norm type", "`use_qk_l2norm` must be a bool",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, use_qk_l2norm="no")),
        with_gates(kind, "beta with a trailing unit dim", "`beta` must have 3 dimensions",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b[..., None])),
        with_gates(kind, "beta integer", "`beta` has dtype torch.int64",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b.round().long())),
        with_gates(kind, "g integer", "`g` has dtype torch.int64", lambda q, k, v, g, b, h: call(q, k, v, g.long(), b)),
        with_gates(kind, "g last dim", "`g` must have",
                   lambda q, k, v, g, b, h: call(q, k, v, torch.cat([g, g[..., :1]], -1), b)),
        with_gates(kind, "cu_seqlens int16", "`cu_seqlens` must be int32 or int64",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, cu_seqlens=torch.tensor([0, 4, 8], dtype=torch.int16))),
        with_gates(kind, "initial_state rows vs batch", r"`initial_state` must have shape \[2, 2, 4, 4\]",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h[:1]), B=2),
        with_gates(kind, "sp_context type", "`sp_context` must be an SPContext",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, sp_context="ctx")),
        with_gates(kind, "g on meta", "`g` is on meta but `q` is on cpu",
                   lambda q, k, v, g, b, h: call(q, k, v, g.to("meta"), b)),
        with_gates(kind, "beta on meta", "`beta` is on meta but `q` is on cpu",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b.to("meta"))),
        with_gates(kind, "g bool", "`g` has dtype torch.bool", lambda q, k, v, g, b, h: call(q, k, v, g < 0, b)),
        with_gates(kind, "initial_state on meta", "`initial_state` is on meta but `q` is on cpu",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h.to("meta"))),
        with_gates(kind, "initial_state half", "`initial_state` must be float32, float64 or the dtype of `q`",
                   lambda q, k, v, g, b, h: call(q, k, v, g, b, initial_state=h.half())),
        # a CPU-kernel detail, not an argument of the op
        BadCall("chunk size", "chunk_size", lambda q, k, v: call(q, k, v, chunk_size=4), error=TypeError),
    ]


CASES = [(kind, case) for kind in ("gdn", "kda") for case in ATTENTION_CASES + delta_cases(kind)]


@pytest.mark.parametrize("kind, case", CASES, ids=lambda x: x if isinstance(x, str) else str(x))
def test_bad_input_raises_naming_the_argument(kind, case):
    expect_bad_call(valid_gates(kind), case, qkv)


def test_gdn_rejects_per_key_gates():
    q, k, v, g, beta, _ = make_inputs("kda", B=1, T=6)
    with pytest.raises(ValueError, match="`g` must have 3 dimensions"):
        lasp2.gated_delta_rule(q, k, v, g, beta)


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_fla_spelling_of_l2norm(kind):
    """fla's keyword `use_qk_l2norm_in_kernel` (chunk_gated_delta_rule / chunk_kda) is
    accepted: a call written for fla runs unchanged and normalises q and k; False keeps
    them as they are; disagreeing with `use_qk_l2norm` is an error, not a silent pick."""
    q, k, v, g, beta, h0 = make_inputs(kind, B=1, T=9)
    op = OPS[kind]
    o, final = op(q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm_in_kernel=True)
    o_ref, final_ref = delta_rule_reference(l2norm_reference(q), l2norm_reference(k), v, g, beta,
                                            q.shape[-1] ** -0.5, h0)
    assert_rel(o, o_ref, 1e-6, "o, fla's spelling")  # states are fp32 in the core
    assert_rel(final, final_ref, 1e-6, "final state, fla's spelling")
    o_plain, _ = op(q, k, v, g, beta, use_qk_l2norm_in_kernel=False)
    assert_rel(o_plain, delta_rule_reference(q, k, v, g, beta, q.shape[-1] ** -0.5)[0], 1e-10, "o, no l2norm")
    o_both, _ = op(q, k, v, g, beta, use_qk_l2norm=True, use_qk_l2norm_in_kernel=True)
    assert torch.equal(o_both, op(q, k, v, g, beta, use_qk_l2norm=True)[0])
    with pytest.raises(ValueError, match="`use_qk_l2norm=True` and `use_qk_l2norm_in_kernel=False` disagree"):
        op(q, k, v, g, beta, use_qk_l2norm=True, use_qk_l2norm_in_kernel=False)
    with pytest.raises(ValueError, match="`use_qk_l2norm_in_kernel` must be a bool"):
        op(q, k, v, g, beta, use_qk_l2norm_in_kernel="yes")
    # fla's positional order puts the flag where lasp2 has cu_seqlens: named in the error
    with pytest.raises(ValueError, match="fla's `use_qk_l2norm_in_kernel`; pass the flag by keyword"):
        op(q, k, v, g, beta, None, None, False, True)
