"""Decay and gate values of linear attention, shared by lasp2.nn and megatron_patches.

Log gates g <= 0 multiply the state by exp(g) at every token; they accumulate over
the whole sequence, so they are computed in float32 even when the logits are half.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def gate_from_logits(logits: torch.Tensor, normalizer: float = 16.0,
                     clamp_min: Optional[float] = None) -> torch.Tensor:
    """Log gates ``logsigmoid(logits) / normalizer`` (GLA / simple-GLA), at least float32,
    optionally clamped from below at ``clamp_min`` (a floor on how fast state decays)."""
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    g = F.logsigmoid(logits) / normalizer
    return g if clamp_min is None else torch.clamp_min(g, clamp_min)


def lightning_log_decay(num_heads: int) -> torch.Tensor:
    """Per-head log decays -2^(-8(h+1)/H) (ALiBi-style slopes, as in lightning attention)."""
    exponents = -8.0 * torch.arange(1, num_heads + 1, dtype=torch.float64) / num_heads
    return -(2.0 ** exponents)


__all__ = ["gate_from_logits", "lightning_log_decay"]
