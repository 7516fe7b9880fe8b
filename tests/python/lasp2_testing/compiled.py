"""A function compiled with torch.compile(fullgraph=True) against itself in eager mode:
the gradients of its scalar loss with respect to every input (what the custom ops'
fake kernels and autograd formulas must get right)."""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def loss_grads(f: Callable, inputs: Sequence[torch.Tensor], *extra):
    """Gradients of f(*fresh leaves, *extra) with respect to fresh copies of `inputs`."""
    leaves = [x.clone().requires_grad_() for x in inputs]
    return torch.autograd.grad(f(*leaves, *extra), leaves)


def assert_compiled_matches_eager(f: Callable, inputs: Sequence[torch.Tensor], names: Sequence[str], *extra,
                                  compiled: Optional[Callable] = None, backend: str = "aot_eager",
                                  compare: Optional[Callable] = None):
    """compile(f) and f give the same gradient for every input. `compiled` reuses a
    compiled f (e.g. to call one graph with new `extra` arguments); `compare(name, got,
    want)` replaces torch.testing.assert_close."""
    if compiled is None:
        compiled = torch.compile(f, fullgraph=True, backend=backend)
    if len(names) != len(inputs):
        raise ValueError(f"{len(names)} names for {len(inputs)} inputs")
    got, want = loss_grads(compiled, inputs, *extra), loss_grads(f, inputs, *extra)
    for name, a, b in zip(names, got, want):
        if compare is None:
            torch.testing.assert_close(a, b, msg=lambda m: f"d{name}: {m}")
        else:
            compare(name, a, b)
