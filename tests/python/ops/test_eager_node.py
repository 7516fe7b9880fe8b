"""The C++ autograd node of lasp2.linear_attention's one-device eager call
(csrc/torch/lasp2_eager_node.cpp) against the paths it replaced: the Python eager
Function (lasp2.ops._eager) and the registered custom op. Same kernels, so outputs and
gradients must be equal bit for bit, for every decay kind, dtype, layout and subset of
inputs that need gradients; and autograd must treat the node as it treated the Function
(no-grad / inference mode, retain_graph, in-place checks, saved-tensor hooks,
create_graph, torch.func)."""

import pytest
import torch

import lasp2
from lasp2.ops import _library
from lasp2.ops import linear_attention as la_module

PATHS = ("node", "function", "custom_op")


def _use(path, monkeypatch):
    """Routes lasp2.linear_attention's one-device call through `path`."""
    monkeypatch.undo()
    if path == "function":  # the Python eager Function, as before the node
        monkeypatch.setattr(la_module, "lasp2_one_device", lambda q, k, v, g, decay, scale, chunk, overlap:
                            _library.lasp2_linear_attention(q, k, v, g, decay, None, scale, chunk, None, 1, overlap))
    elif path == "custom_op":
        monkeypatch.setattr(_library, "eager_call", lambda *a: False)


def _inputs(kind, dtype, layout, needs, seed=0):
    gen = torch.Generator().manual_seed(seed)
    shape = (2, 24, 3, 8) if layout == "bthd" else (24, 2, 3, 8)
    q, k, v = (torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    g = (-0.2 * torch.rand(shape[:3], generator=gen, dtype=torch.float64)).to(dtype)
    decay = (-0.1 * torch.rand(3, generator=gen, dtype=torch.float64)).to(dtype)
    named = dict(q=q, k=k, v=v, **{"gate": dict(g=g), "decay": dict(decay=decay), "none": {}}[kind])
    for name in needs:
        if name in named:
            named[name].requires_grad_()
    do = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return named, do


def _run(path, monkeypatch, kind, dtype=torch.float64, layout="bthd", needs=("q", "k", "v", "g", "decay"),
         scale=None):
    _use(path, monkeypatch)
    named, do = _inputs(kind, dtype, layout, needs)
    q, k, v = named.pop("q"), named.pop("k"), named.pop("v")
    o = lasp2.linear_attention(q, k, v, scale=scale, layout=layout, **named)
    leaves = [x for x in (q, k, v, *named.values()) if x.requires_grad]
    grads = torch.autograd.grad(o, leaves, do) if leaves else ()
    return o, grads


def _graph_names(t):
    """The names of the autograd nodes behind t."""
    names, todo = [], [t.grad_fn]
    while todo:
        fn = todo.pop()
        if fn is not None:
            names.append(fn.name())
            todo.extend(nxt for nxt, _ in fn.next_functions)
    return names


def _equal(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("kind", ["gate", "decay", "none"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["bthd", "tbhd"])
def test_node_equals_function_and_custom_op(kind, dtype, layout, monkeypatch):
    results = [_run(path, monkeypatch, kind, dtype, layout) for path in PATHS]
    assert any("OneDevice" in n for n in _graph_names(results[0][0]))  # the node ran
    assert not any("OneDevice" in n for r in results[1:] for n in _graph_names(r[0]))
    for o, grads in results[1:]:
        _equal(results[0][0].detach(), o.detach())
        assert len(grads) == len(results[0][1])
        for a, b in zip(results[0][1], grads):
            _equal(a, b)


@pytest.mark.parametrize("kind", ["gate", "decay"])
@pytest.mark.parametrize("needs", [("q",), ("v",), ("k", "v"), ("g", "decay"), ("q", "g", "decay"), ()])
def test_node_requires_grad_subsets(kind, needs, monkeypatch):
    node, function = (_run(path, monkeypatch, kind, needs=needs, scale=0.3) for path in PATHS[:2])
    assert node[0].requires_grad == function[0].requires_grad == bool(node[1] or function[1] or
                                                                    node[0].requires_grad)
    _equal(node[0].detach(), function[0].detach())
    assert len(node[1]) == len(function[1])
    for a, b in zip(node[1], function[1]):
        _equal(a, b)


def test_node_no_grad_and_inference_mode(monkeypatch):
    named, _ = _inputs("gate", torch.float32, "bthd", ("q", "k", "v", "g"))
    want = lasp2.linear_attention(**named).detach()
    with torch.no_grad():
        o = lasp2.linear_attention(**named)
    assert not o.requires_grad and o.grad_fn is None
    _equal(o, want)
    with torch.inference_mode():
        o = lasp2.linear_attention(**named)
    assert o.is_inference()
    _equal(o, want)


def test_node_unused_rows_retain_graph_and_hooks(monkeypatch):
    """Gradient of part of o, twice through retain_graph, with saved-tensor hooks (as
    activation offloading installs them): the Function's results, and the second pass
    without retain_graph refused."""
    out = {}
    for path in PATHS[:2]:
        _use(path, monkeypatch)
        named, do = _inputs("decay", torch.float64, "bthd", ("q", "k", "v", "decay"))
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(1) or t, lambda t: t):
            o = lasp2.linear_attention(**named)
        assert packed  # the node's saved tensors went through the hooks
        loss = (o[:, :10] * do[:, :10]).sum()
        leaves = list(named.values())
        first = torch.autograd.grad(loss, leaves, retain_graph=True)
        second = torch.autograd.grad(loss, leaves)
        for a, b in zip(first, second):
            _equal(a, b)
        with pytest.raises(RuntimeError, match="backward through the graph a second time|freed"):
            torch.autograd.grad(loss, leaves)
        out[path] = first
    for a, b in zip(out["node"], out["function"]):
        _equal(a, b)


def test_node_in_place_change_of_a_saved_input_is_refused(monkeypatch):
    named, do = _inputs("gate", torch.float32, "bthd", ("q", "k", "v", "g"))
    q = named["q"].detach().clone().requires_grad_()
    x = q * 1  # a non-leaf the op saves, changed in place after the forward
    o = lasp2.linear_attention(x, named["k"], named["v"], g=named["g"])
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        o.backward(do)


def test_node_create_graph(monkeypatch):
    """create_graph=True: first-order gradients equal the Function's; a backward through
    them raises (the op's backward is not differentiable), with the Function's message."""
    got = {}
    for path in PATHS[:2]:
        _use(path, monkeypatch)
        named, do = _inputs("gate", torch.float64, "bthd", ("q", "k", "v", "g"))
        o = lasp2.linear_attention(**named)
        grads = torch.autograd.grad(o, list(named.values()), do, create_graph=True)
        assert all(gr.requires_grad for gr in grads)
        with pytest.raises(RuntimeError, match="lasp2.linear_attention: double backward .* is not supported"):
            grads[0].sum().backward()
        got[path] = grads
    for a, b in zip(got["node"], got["function"]):
        _equal(a.detach(), b.detach())


def test_node_refuses_torch_func():
    q, k, v = (torch.randn(1, 16, 2, 8, dtype=torch.float64) for _ in range(3))
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: lasp2.linear_attention(x, k, v).sum())(q)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_node_under_checkpoint_and_anomaly_mode(use_reentrant, monkeypatch):
    """Activation checkpointing recomputes the forward (the node saved through its
    hooks, or run again under a reentrant backward); anomaly mode records the forward's
    Python stack from inside the node (the binding runs it without the GIL): the
    Function's gradients, bit for bit."""
    from torch.utils.checkpoint import checkpoint
    got = {}
    for path in PATHS[:2]:
        _use(path, monkeypatch)
        named, do = _inputs("gate", torch.float32, "bthd", ("q", "k", "v", "g"))
        with torch.autograd.set_detect_anomaly(True):
            o = checkpoint(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g) * 1, *named.values(),
                           use_reentrant=use_reentrant)
            o.backward(do)  # reentrant checkpointing takes .backward() only
        got[path] = [x.grad for x in named.values()]
    for a, b in zip(got["node"], got["function"]):
        _equal(a, b)


def test_node_backward_error_as_the_function_gave_it(monkeypatch):
    """An error inside the backward (here a sparse output gradient the binding cannot
    lay out) arrives with the Function's type and message: prefixed with the op's name,
    without a C++ backtrace."""
    got = {}
    for path in PATHS[:2]:
        _use(path, monkeypatch)
        named, do = _inputs("none", torch.float32, "bthd", ("q", "k", "v"))
        o = lasp2.linear_attention(**named)
        with pytest.raises(RuntimeError) as err:
            torch.autograd.grad(o, [named["q"]], do.to_sparse())
        got[path] = (type(err.value), str(err.value))
    assert got["node"] == got["function"]
    assert got["node"][1].startswith("lasp2.linear_attention: ") and "Exception raised from" not in got["node"][1]


def test_forward_mode_ad_takes_the_function(monkeypatch):
    """Inside a forward-AD dual level the call keeps to the Python Function, whose
    missing jvp raises NotImplementedError (the node's would be a RuntimeError); outside
    one the node runs again."""
    import torch.autograd.forward_ad as fwAD
    q, k, v = (torch.randn(1, 8, 1, 8) for _ in range(3))
    with fwAD.dual_level():
        dual = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(NotImplementedError, match="jvp"):
            lasp2.linear_attention(dual, k, v)
    o = lasp2.linear_attention(q.requires_grad_(), k, v)
    assert any("OneDevice" in n for n in _graph_names(o))


class _RaisingMode:
    """A dispatch mode entered around the backward only (as a profiler or checker may be)
    that raises a Python error of its own on the first op inside the op's backward."""

    class Error(Exception):
        pass

    @staticmethod
    def make():
        from torch.utils._python_dispatch import TorchDispatchMode

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                raise _RaisingMode.Error(f"raised by the mode at {func}")

        return Mode()


def test_node_python_error_inside_the_backward_keeps_its_type_and_message(monkeypatch):
    """A Python exception raised inside the backward (here by a dispatch mode around it)
    reaches the caller as itself, with its message, on both paths (the node must not
    turn it into an empty RuntimeError)."""
    got = {}
    for path in PATHS[:2]:
        _use(path, monkeypatch)
        named, do = _inputs("gate", torch.float32, "bthd", ("q", "k", "v", "g"))
        o = lasp2.linear_attention(**named)
        with pytest.raises(_RaisingMode.Error, match="raised by the mode at") as err:
            with _RaisingMode.make():
                o.backward(do)
        got[path] = type(err.value)
    assert got["node"] is got["function"] is _RaisingMode.Error
