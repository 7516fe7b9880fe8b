"""Issue 13.4: linear attention and softmax attention (LASP-2H) are torch.library custom
ops with fake kernels and an autograd formula, so torch.compile(fullgraph=True) and
torch.export trace them; torch.func transforms raise a clear NotImplementedError (CPU,
small shapes: fast)."""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2.ops import _library, _softmax_library
from lasp2_testing.compiled import assert_compiled_matches_eager


def _inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 10, 2, 4, generator=gen, dtype=dtype) for _ in range(3))
    g = F.logsigmoid(torch.randn(1, 10, 2, generator=gen, dtype=dtype))
    return q, k, v, g


def test_opcheck_forward_and_backward():
    q, k, v, g = _inputs(dtype=torch.float64)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g.requires_grad_(), None, None, None, 0.5, 4,
            0, 1, True, [], 0, False)
    torch.library.opcheck(_library.lasp2_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_fullgraph_matches_eager():
    q, k, v, g = _inputs()

    def f(q, k, v, g):
        return lasp2.linear_attention(q, k, v, g=g).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
    ref = f(*ref_leaves)
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    torch.testing.assert_close(out, ref)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_compile_fullgraph_with_documents_from_sp_context():
    """Packed documents through the batch's SPContext (built outside the compiled
    function, as a model does once per batch): the graph takes the context's per-token
    tensors and boundary ints without a break; output, final states and gradients
    (initial state's included) equal eager, for linear and softmax attention."""
    q, k, v, g = _inputs(seed=2)
    ctx = lasp2.build_sp_context(cu_seqlens=torch.tensor([0, 3, 4, 10]))
    h0 = torch.randn(3, 2, 4, 4)

    def f(q, k, v, g, h0):
        o, final = lasp2.linear_attention(q, k, v, g=g, sp_context=ctx, initial_state=h0, output_final_state=True)
        s = lasp2.softmax_attention(q, k, v, sp_context=ctx)
        return o.square().sum() + (final * final.detach()).sum() + s.square().sum()

    assert_compiled_matches_eager(f, (q, k, v, g, h0), ("q", "k", "v", "g", "initial_state"))


def test_compiled_graph_still_rejects_positive_gates():
    q, k, v, g = _inputs(1)
    compiled = torch.compile(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g), fullgraph=True,
                             backend="aot_eager")
    with pytest.raises(ValueError, match="`g`"):
        compiled(q, k, v, g.abs() + 0.1)


def test_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v, g):
            return lasp2.linear_attention(q, k, v, g=g)

    q, k, v, g = _inputs(2)
    ep = torch.export.export(M(), (q, k, v, g))
    assert any("lasp2.lasp2_forward" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, v, g), M()(q, k, v, g))


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_func_transforms_raise_a_clear_error(transform):
    q, k, v, g = _inputs(3, torch.float64)
    fn = lambda q: lasp2.linear_attention(q, k, v, g=g).sum()  # noqa: E731
    t = torch.func.grad(fn) if transform == "grad" else torch.func.vmap(fn, in_dims=0)
    with pytest.raises(NotImplementedError, match="lasp2.linear_attention: torch.func transforms"):
        t(q if transform == "grad" else q.unsqueeze(0))


# --- softmax attention (LASP-2H) ---------------------------------------------------------

def _softmax_inputs(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 10, 4, 8, generator=gen, dtype=dtype)
    k, v = (torch.randn(1, 10, 2, 8, generator=gen, dtype=dtype) for _ in range(2))  # GQA: 2 K/V heads
    return q, k, v


@pytest.mark.parametrize("cu_seqlens", [None, [0, 3, 10]], ids=["one-doc", "docs"])
def test_softmax_opcheck_forward_and_backward(cu_seqlens):
    q, k, v = (x.requires_grad_() for x in _softmax_inputs(dtype=torch.float64))
    args = (q, k, v, 0.35, "plain", 0, 0, 1, 1, "contiguous", True, cu_seqlens)
    torch.library.opcheck(_softmax_library.softmax_forward, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["plain", "sdpa"])
def test_softmax_compile_fullgraph_matches_eager(backend):
    q, k, v = _softmax_inputs(4)

    def f(q, k, v):
        return lasp2.softmax_attention(q, k, v, backend=backend).square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    ref_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    ref_grads = torch.autograd.grad(f(*ref_leaves), ref_leaves)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)


def test_softmax_export():
    class M(torch.nn.Module):
        def forward(self, q, k, v):
            return lasp2.softmax_attention(q, k, v)

    q, k, v = _softmax_inputs(5)
    ep = torch.export.export(M(), (q, k, v))
    assert any("lasp2.softmax_forward" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(q, k, v), M()(q, k, v))


def test_softmax_double_backward_raises():
    q, k, v = (x.requires_grad_() for x in _softmax_inputs(6, torch.float64))
    (dq,) = torch.autograd.grad(lasp2.softmax_attention(q, k, v).sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        dq.sum().backward()
