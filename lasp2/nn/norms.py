"""RMSNorm, the one normalisation of lasp2's modules (and of megatron_patches' output
norms): the hidden or head dimension is normalised in float32 (float64 inputs stay
float64), then scaled by a learned weight, and cast back to the input dtype."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def rms_norm(x: torch.Tensor, weight: Optional[torch.Tensor] = None, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(mean(x^2, -1) + eps) * weight`` over the last dimension; `weight`
    broadcasts against x (e.g. ``[D]``, or ``[H, D]`` for one scale per head and channel)."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xc = x.to(compute)
    normed = xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        normed = normed * weight.to(compute)
    return normed.to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension with one learned scale per channel: the pre-norm
    of hybrid blocks and the per-head output norm of GLA / lightning attention."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)

__all__ = ["RMSNorm", "rms_norm"]
