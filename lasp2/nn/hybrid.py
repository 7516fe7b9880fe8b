"""Hybrid models: pre-norm residual blocks mixing linear attention (LASP-2) and
softmax attention (LASP-2H) under one sequence split and one SP group."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lasp2.nn.linear_attention import LinearAttention
from lasp2.nn.softmax_attention import SoftmaxAttention

MIXERS = ("linear", "softmax")


class RMSNorm(nn.Module):
    """RMSNorm over the hidden dimension, computed in float32."""

    def __init__(self, hidden_size: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        xc = x.to(compute)
        return (xc * torch.rsqrt(xc.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(compute)).to(x.dtype)


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int, device=None, dtype=None):
        super().__init__()
        factory = {"device": device, "dtype": dtype, "bias": False}
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class HybridBlock(nn.Module):
    """``x + mixer(norm(x))`` then ``x + mlp(norm(x))``; the mixer is
    ``lasp2.nn.LinearAttention`` ("linear") or ``lasp2.nn.SoftmaxAttention`` ("softmax").

    Token-wise parts (norms, MLP) need no communication; the mixer does its own
    (LASP-2: one AllGather of states; LASP-2H: one AllGather of K/V). ``mixer_kwargs``
    go to the mixer's constructor (e.g. ``decay="fixed"`` or ``num_kv_heads=2``).
    """

    def __init__(self, hidden_size: int, num_heads: int, mixer: str = "linear",
                 intermediate_size: Optional[int] = None, group=None, split: str = "contiguous",
                 layout: str = "bthd", device=None, dtype=None, **mixer_kwargs):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"HybridBlock: `mixer` must be one of {MIXERS}, got {mixer!r}")
        factory = {"device": device, "dtype": dtype}
        self.mixer_kind = mixer
        cls = LinearAttention if mixer == "linear" else SoftmaxAttention
        self.norm1 = RMSNorm(hidden_size, **factory)
        self.mixer = cls(hidden_size, num_heads, group=group, split=split, layout=layout, **factory, **mixer_kwargs)
        self.norm2 = RMSNorm(hidden_size, **factory)
        self.mlp = SwiGLU(hidden_size, intermediate_size or 4 * hidden_size, **factory)

    def set_sequence_parallel(self, group, split: str = "contiguous"):
        """Points the mixer at an SP group and split (None: one device)."""
        self.mixer.group, self.mixer.split = group, split

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), cu_seqlens=cu_seqlens)
        return x + self.mlp(self.norm2(x))


class HybridStack(nn.Module):
    """A stack of HybridBlocks following ``pattern``, one letter a layer: "L" linear
    attention, "S" softmax attention; e.g. "LLLS" (3 linear : 1 softmax, as in the
    LASP-2H paper's hybrids). Every layer shares ``group``, ``split`` and ``layout``:
    one sequence layout serves the whole model, so activations never move between
    layers. ``linear_kwargs`` / ``softmax_kwargs`` go to the mixers."""

    def __init__(self, hidden_size: int, num_heads: int, pattern: str = "LLLS",
                 intermediate_size: Optional[int] = None, group=None, split: str = "contiguous",
                 layout: str = "bthd", linear_kwargs: Optional[dict] = None,
                 softmax_kwargs: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        if not pattern or set(pattern) - {"L", "S"}:
            raise ValueError(f"HybridStack: `pattern` must be a non-empty string of 'L' and 'S', got {pattern!r}")
        self.pattern = pattern
        self.layers = nn.ModuleList(
            HybridBlock(hidden_size, num_heads, "linear" if c == "L" else "softmax", intermediate_size,
                        group=group, split=split, layout=layout, device=device, dtype=dtype,
                        **((linear_kwargs if c == "L" else softmax_kwargs) or {}))
            for c in pattern)
        self.norm = RMSNorm(hidden_size, device=device, dtype=dtype)

    def set_sequence_parallel(self, group, split: str = "contiguous"):
        for layer in self.layers:
            layer.set_sequence_parallel(group, split)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cu_seqlens=cu_seqlens)
        return self.norm(x)
