"""Eager calls of lasp2's custom ops without torch.library's Python dispatch.

An op defined in Python with torch.library.custom_op pays, on every eager call, for
its dispatcher round trip, the filling of default arguments from its schema and the
autograd wrapper around it: tens of microseconds per op, measured as most of the
host time of one layer at T = 4K on an H200 (docs/history/kernels-log.md, "Performance"). Each
op module therefore builds, from the SAME implementation, setup_context and backward
functions it registers with torch.library, a torch.autograd.Function, and its public
entry point calls that Function in plain eager mode. Under torch.compile,
torch.export, a dispatch mode (fake tensors, make_fx) or with tensor subclasses the
registered custom op runs, so tracing still sees one opaque op with its fake kernel;
opcheck calls the op itself.
"""

from __future__ import annotations

from operator import itemgetter
from typing import Callable, Sequence

import torch
from torch._C import _len_torch_dispatch_stack

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def eager_call(*tensors) -> bool:
    """True when the op may bypass its custom-op registration: plain eager mode and
    plain tensors (None allowed). Runs twice per fwd + bwd, so it avoids Python frames:
    the dispatch-mode stack's length (what torch.utils._python_dispatch's
    _get_current_dispatch_mode reads) and a loop instead of all() over a generator."""
    if torch.compiler.is_compiling() or torch.compiler.is_exporting():
        return False
    if _len_torch_dispatch_stack() > 0:
        return False
    for t in tensors:
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def under_functorch() -> bool:
    """Inside a torch.func transform (grad, vmap, ...)."""
    peek = getattr(getattr(torch._C, "_functorch", None), "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def reject_functorch(op: str):
    """NotImplementedError naming `op` inside a torch.func transform (outside torch.compile,
    which traces the custom op instead): lasp2's ops do not support them."""
    if not torch.compiler.is_compiling() and under_functorch():
        raise NotImplementedError(
            f"{op}: torch.func transforms (grad, vmap, jacrev, ...) are not supported by this op; "
            "use torch.autograd (torch.autograd.grad / .backward) or torch.compile")


def eager_function(name: str, impl: Callable, setup_context: Callable, backward: Callable,
                   internal_outputs: Sequence[int] = (), leading_inputs: int = 0) -> type:
    """A torch.autograd.Function running impl(*inputs) with the op's registered
    setup_context / backward (gradients of unused outputs arrive as zeros, as they do
    for the custom op).

    internal_outputs: indices of outputs that only carry what the backward needs (saved
    buffers the entry point never returns): they are marked non-differentiable and the
    gradients are not materialised, so the backward gets None, not a zeros tensor per
    unused output (an allocation and a fill each, on every backward); the backward must
    then accept None for any output's gradient.

    leading_inputs: when > 0, the Function is applied as apply(*inputs[:n], inputs[n:])
    (the op's trailing non-tensor arguments as ONE tuple): torch.autograd.Function.apply
    walks every argument in Python (functorch's dead-wrapper unwrapping), a cost per
    argument on every call. The op's inputs after the first n must then need no
    gradient (the backward's extra gradients, all None, are dropped by autograd)."""
    internal = tuple(internal_outputs)
    pick = itemgetter(*internal) if len(internal) > 1 else (lambda out: (out[internal[0]],))

    # ctx-style forward: a separate setup_context would make every call bind the
    # arguments to forward's signature through inspect (measurable at small T)
    def forward(ctx, *inputs):
        if leading_inputs:
            inputs = (*inputs[:leading_inputs], *inputs[leading_inputs])
        output = impl(*inputs)
        setup_context(ctx, inputs, output)
        if internal:
            ctx.mark_non_differentiable(*pick(output))
            ctx.set_materialize_grads(False)
        return output

    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward),
                                                   "backward": staticmethod(backward)})
