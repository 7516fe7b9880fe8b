"""Issue 13.4: linear attention and softmax attention (LASP-2H) are torch.library custom
ops with fake kernels and an autograd formula, so torch.compile(fullgraph=True) and
torch.export trace them (per-call cu_seqlens included: the ops plan the documents
inside); torch.func transforms raise a clear NotImplementedError (CPU, small shapes: fast)."""

import re

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


@pytest.mark.parametrize("documents", [False, True], ids=["rows", "per-call-docs-with-states"])
def test_opcheck_forward_and_backward(documents):
    q, k, v, g = _inputs(dtype=torch.float64)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), g.requires_grad_(), None, None, None, 0.5, 4,
            0, 1, True, [], 0, False)
    if documents:  # the op plans cu_seqlens' documents itself; 3 documents with their states
        h0 = torch.randn(3, 2, 4, 4, dtype=torch.float64, requires_grad=True)
        args = args[:6] + (h0,) + args[7:13] + (3, True, torch.tensor([0, 3, 4, 10]))
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


def _values_and_grads(f, inputs, *extra):
    """f's value and its gradients with respect to fresh copies of `inputs`."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    out = f(*leaves, *extra)
    return [out, *torch.autograd.grad(out, leaves)]


def _assert_bitwise(got, want, what):
    for i, (a, b) in enumerate(zip(got, want)):
        assert torch.equal(a, b), f"{what}: output {i} differs from eager"


def test_compile_fullgraph_with_per_call_cu_seqlens():
    """Per-call `cu_seqlens=` (one device) enter the graph as a tensor: the custom ops
    read and plan the documents themselves (as the delta-rule ops do), so fullgraph
    compiles; the value, final states and every gradient (initial state's included) equal
    eager bit for bit, and eager equals the SPContext route. A second batch with other
    boundaries (same count) reuses the graph: no recompilation."""
    q, k, v, g = _inputs(seed=4)
    h0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))

    def f(q, k, v, g, h0, cu):
        o, final = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu, initial_state=h0, output_final_state=True)
        plain = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu)  # documents without states
        s = lasp2.softmax_attention(q, k, v, cu_seqlens=cu)
        return o.square().sum() + (final * final.detach()).sum() + plain.sin().sum() + s.square().sum()

    def f_context(q, k, v, g, h0, cu):
        ctx = lasp2.build_sp_context(cu_seqlens=cu)
        o, final = lasp2.linear_attention(q, k, v, g=g, sp_context=ctx, initial_state=h0, output_final_state=True)
        plain = lasp2.linear_attention(q, k, v, g=g, sp_context=ctx)
        s = lasp2.softmax_attention(q, k, v, sp_context=ctx)
        return o.square().sum() + (final * final.detach()).sum() + plain.sin().sum() + s.square().sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    inputs = (q, k, v, g, h0)
    for cu in (torch.tensor([0, 3, 4, 10]), torch.tensor([0, 6, 7, 10])):
        with torch._dynamo.config.patch(error_on_recompile=cu[1].item() == 6):
            got = _values_and_grads(compiled, inputs, cu)
        want = _values_and_grads(f, inputs, cu)
        _assert_bitwise(got, want, f"compiled, cu_seqlens {cu.tolist()}")
        _assert_bitwise(want, _values_and_grads(f_context, inputs, cu), f"eager, cu_seqlens {cu.tolist()}")


_BAD_CU = [([1, 4, 10], False, "must start at 0"), ([0, 6, 3, 10], False, "must be non-decreasing"),
           ([0, 4, 8], False, "must end at the global sequence length 10"),
           ([0, 4, 4, 10], True, "must be strictly increasing .*with `initial_state` / `output_final_state`")]


@pytest.mark.parametrize("op, cu, states, match", [("linear", *case) for case in _BAD_CU] +
                         [("softmax", *case) for case in _BAD_CU if not case[1]])  # softmax: no states
def test_compiled_graph_rejects_bad_cu_seqlens_values(op, cu, states, match):
    """The value checks of per-call cu_seqlens run inside the custom ops, so the compiled
    graph raises the eager ValueError naming `cu_seqlens`."""
    q, k, v, _ = _inputs(6)

    def f(q, k, v, cu):
        if op == "softmax":
            return lasp2.softmax_attention(q, k, v, cu_seqlens=cu)
        return lasp2.linear_attention(q, k, v, cu_seqlens=cu, output_final_state=states)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for run in (f, compiled):
        with pytest.raises(ValueError, match=f"`cu_seqlens` {match}"):
            run(q, k, v, torch.tensor(cu))


def test_export_with_per_call_cu_seqlens():
    class M(torch.nn.Module):
        def forward(self, q, k, v, cu):
            return lasp2.linear_attention(q, k, v, cu_seqlens=cu) + lasp2.softmax_attention(q, k, v, cu_seqlens=cu)

    q, k, v, _ = _inputs(7)
    cu = torch.tensor([0, 2, 9, 10])
    ep = torch.export.export(M(), (q, k, v, cu))
    targets = [str(n.target) for n in ep.graph.nodes]
    assert any("lasp2.lasp2_forward" in t for t in targets) and any("lasp2.softmax_forward" in t for t in targets)
    other = torch.tensor([0, 5, 6, 10])  # the exported program plans the documents it is given
    assert torch.equal(ep.module()(q, k, v, other), M()(q, k, v, other))


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


@pytest.mark.parametrize("cu_seqlens", [None, [0, 3, 10], torch.tensor([0, 3, 10])],
                         ids=["one-doc", "docs", "per-call-docs"])
def test_softmax_opcheck_forward_and_backward(cu_seqlens):
    q, k, v = (x.requires_grad_() for x in _softmax_inputs(dtype=torch.float64))
    per_call = isinstance(cu_seqlens, torch.Tensor)  # the op reads the tensor itself
    args = (q, k, v, 0.35, "plain", 0, 0, 1, 1, "contiguous", True, None if per_call else cu_seqlens,
            cu_seqlens if per_call else None)
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


def test_bad_arguments_under_compile_raise_the_eager_message():
    """A shape / dtype check fails while tracing: default torch.compile breaks the graph and
    raises the eager ValueError; fullgraph=True raises torch._dynamo's Unsupported, whose
    message must still hold the eager text (what a user reads to fix the call); a check of
    tensor contents runs inside the op and raises the ValueError itself."""
    q, k, v, g = _inputs()

    def f(q, k, v, g, cu_seqlens=None):
        return lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu_seqlens)

    calls = {"shape": (q, k[:, :9], v, g), "contents": (q, k, v, g, torch.tensor([0, 5, 3, 10]))}
    for name, args in calls.items():
        with pytest.raises(ValueError) as eager:
            f(*args)
        torch._dynamo.reset()
        with pytest.raises(ValueError, match=re.escape(str(eager.value))):
            torch.compile(f, backend="eager")(*args)
        torch._dynamo.reset()
        with pytest.raises(Exception) as full:
            torch.compile(f, fullgraph=True, backend="eager")(*args)
        assert str(eager.value) in str(full.value), (name, str(full.value)[:300])
        assert isinstance(full.value, ValueError) == (name == "contents"), (name, type(full.value))
    torch._dynamo.reset()
