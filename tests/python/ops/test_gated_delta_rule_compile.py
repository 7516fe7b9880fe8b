"""lasp2.gated_delta_rule / lasp2.kda are torch.library custom ops
(lasp2/ops/_delta_library.py) with fake kernels and an autograd formula: opcheck,
torch.compile(fullgraph=True) equal to eager (gradients of initial_state and from the
final state included), torch.export, the value checks of g and beta still inside a
compiled graph, double backward and torch.func transforms raising clear errors (CPU,
small shapes: seconds)."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops import _delta_library
from lasp2_testing.compiled import assert_compiled_matches_eager

OPS = {"gdn": lasp2.gated_delta_rule, "kda": lasp2.kda}
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def _inputs(kind, B=2, T=9, H=2, K=4, V=3, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    q, k, v = rnd(B, T, H, K), rnd(B, T, H, K) / 2, rnd(B, T, H, V)
    g = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    h0 = rnd(B, H, K, V) * 0.5
    return [x.to(dtype) for x in (q, k, v, g, beta, h0)]


def _op_args(q, k, v, g, beta, h0, cu_seqlens=None, final=True):
    n = q.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1
    return (q, k, v, g, beta, cu_seqlens, h0, 0.7, 4, 0, 1, False, n, final, [])


@pytest.mark.parametrize("kind, states", [("gdn", False), ("kda", True)])
def test_opcheck(kind, states):
    q, k, v, g, beta, h0 = (x.requires_grad_() for x in _inputs(kind, dtype=torch.float64))
    args = _op_args(q, k, v, g, beta, h0 if states else None, final=states)
    torch.library.opcheck(_delta_library.delta_rule_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_opcheck_packed_documents_with_states():
    q, k, v, g, beta, _ = _inputs("gdn", B=1, T=10, dtype=torch.float64)
    h0 = torch.randn(3, 2, 4, 3, dtype=torch.float64)
    cu_seqlens = torch.tensor([0, 3, 4, 10])
    args = _op_args(*(x.requires_grad_() for x in (q, k, v, g, beta, h0)), cu_seqlens=cu_seqlens)
    torch.library.opcheck(_delta_library.delta_rule_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_compile_fullgraph_matches_eager_with_states(kind):
    """Output, final state and the gradients of every input, initial_state's included."""
    inputs = _inputs(kind)

    def f(q, k, v, g, beta, h0):
        o, final = OPS[kind](q, k, v, g, beta, initial_state=h0, output_final_state=True, use_qk_l2norm=True)
        return o.square().sum() + (final * final.detach()).sum()

    assert_compiled_matches_eager(f, inputs, NAMES)


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_compile_fullgraph_packed_documents(kind):
    """cu_seqlens in a fullgraph compile: the op plans the documents from its values
    inside the kernel (no graph break); output, final states and every gradient equal
    eager, and a recompiled graph takes new boundaries without retracing their values."""
    q, k, v, g, beta, _ = _inputs(kind, B=1, T=12, seed=3)
    h0 = torch.randn(3, 2, 4, 3)

    def f(q, k, v, g, beta, h0, cu):
        o, final = OPS[kind](q, k, v, g, beta, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return o.square().sum() + (final * final.detach()).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for cu in (torch.tensor([0, 5, 7, 12]), torch.tensor([0, 1, 11, 12])):
        assert_compiled_matches_eager(f, (q, k, v, g, beta, h0), NAMES, cu, compiled=compiled)
    with pytest.raises(ValueError, match="`cu_seqlens` must be strictly increasing"):
        compiled(q, k, v, g, beta, h0, torch.tensor([0, 5, 5, 12]))


def test_compile_fullgraph_tbhd_without_states():
    q, k, v, g, beta, _ = (x.transpose(0, 1).contiguous() for x in _inputs("gdn", seed=1))
    f = lambda q, k, v, g, beta: lasp2.gated_delta_rule(q, k, v, g, beta, layout="tbhd")[0]  # noqa: E731
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v, g, beta), f(q, k, v, g, beta))


@pytest.mark.parametrize("spoil, match", [(lambda g, b: (g.abs() + 0.1, b), "`g` holds log gates"),
                                          (lambda g, b: (g, b + 1), "`beta` must lie in"),
                                          (lambda g, b: (g * float("nan"), b), "`g` contains NaN")],
                         ids=["g positive", "beta above 1", "g nan"])
def test_compiled_graph_still_checks_values(spoil, match):
    q, k, v, g, beta, _ = _inputs("gdn", seed=2)
    compiled = torch.compile(lambda *a: lasp2.gated_delta_rule(*a)[0], fullgraph=True, backend="aot_eager")
    compiled(q, k, v, g, beta)  # valid values pass
    with pytest.raises(ValueError, match=f"lasp2.gated_delta_rule: {match}"):
        compiled(q, k, v, *spoil(g, beta))


def test_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, g, beta, h0):
            return lasp2.kda(q, k, v, g, beta, initial_state=h0, output_final_state=True)

    args = tuple(_inputs("kda", seed=3))
    ep = torch.export.export(M(), args)
    assert any("lasp2.delta_rule_forward" in str(n.target) for n in ep.graph.nodes)
    for got, want in zip(ep.module()(*args), M()(*args)):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_double_backward_raises(kind):
    q, k, v, g, beta, h0 = (x.requires_grad_() for x in _inputs(kind, dtype=torch.float64, seed=4))
    o, final = OPS[kind](q, k, v, g, beta, initial_state=h0, output_final_state=True)
    dq, dh0 = torch.autograd.grad(o.sum() + final.sum(), (q, h0), create_graph=True)
    with pytest.raises(RuntimeError, match=f"{'lasp2.kda' if kind == 'kda' else 'lasp2.gated_delta_rule'}: "
                                           "double backward"):
        (dq.sum() + dh0.sum()).backward()


def test_func_transforms_raise_a_clear_error():
    q, k, v, g, beta, _ = _inputs("gdn", dtype=torch.float64, seed=5)
    fn = lambda q: lasp2.gated_delta_rule(q, k, v, g, beta)[0].sum()  # noqa: E731
    with pytest.raises(NotImplementedError, match="lasp2.gated_delta_rule: torch.func transforms"):
        torch.func.grad(fn)(q)


def test_only_the_final_state_in_the_loss():
    """A loss on the final state alone: o's gradient is None inside the op's backward."""
    q, k, v, g, beta, h0 = _inputs("gdn", dtype=torch.float64, seed=6)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    _, final = lasp2.gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    grads = torch.autograd.grad(final.sum(), leaves)
    o2, final2 = lasp2.gated_delta_rule(*leaves[:5], initial_state=leaves[5], output_final_state=True)
    grads2 = torch.autograd.grad(final2.sum() + 0 * o2.sum(), leaves)
    for a, b in zip(grads, grads2):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gdn", "kda"])
def test_cuda_opcheck_and_compile_with_states(kind):
    """The custom op on CUDA (the CUDA DeltaKernelBackend): opcheck of its fake kernel,
    and a compiled call with states equal to eager (inductor: the graph around the op)."""
    inputs = [x.cuda() for x in _inputs(kind, B=1, T=130, H=2, K=64, V=64, seed=7)]
    args = _op_args(*(x.clone().requires_grad_() for x in inputs))
    # the fake kernel's sizes and strides on CUDA (gradients: atomics, compared below with a tolerance)
    torch.library.opcheck(_delta_library.delta_rule_forward, args, test_utils=("test_schema", "test_faketensor"))

    def f(q, k, v, g, beta, h0):
        o, final = OPS[kind](q, k, v, g, beta, initial_state=h0, output_final_state=True)
        return o.square().sum() + (final * final.detach()).sum()

    # dq, dk, dg, dbeta are sums of fp32 atomics on CUDA: equal up to their order
    close = lambda name, a, b: torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4,  # noqa: E731
                                                          msg=lambda m: f"d{name}: {m}")
    assert_compiled_matches_eager(f, inputs, NAMES, backend="inductor", compare=close)
