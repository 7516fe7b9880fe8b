"""Normalisation layers used by the attention modules."""

import torch
from torch import nn


class HeadRMSNorm(nn.Module):
    """RMSNorm over the last (head) dimension with one learned scale per channel,
    the output norm of GLA / lightning attention applied per head."""

    def __init__(self, head_dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)
