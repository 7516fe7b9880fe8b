"""Helpers of the tests of the lagged cross-rank check (tests/python/reliability:
test_lagged_consistency.py, test_poison_at_call.py): small float64 inputs every rank
builds alike, and the message of the ValueError a call raises."""

from __future__ import annotations

from typing import Callable, Optional

import torch


def qkv(T: int = 8, H: int = 2, D: int = 4, seed: int = 0, grad: bool = False):
    """q, k, v of shape [1, T, H, D] in float64, the same on every rank for one seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, T, H, D, generator=gen, dtype=torch.float64).requires_grad_(grad) for _ in range(3))


def value_error(fn: Callable[[], object]) -> Optional[str]:
    """The message of the ValueError fn() raises, or None when it returns."""
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None
