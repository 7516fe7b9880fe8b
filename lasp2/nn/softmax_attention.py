"""A softmax-attention token mixer (GQA, RoPE) whose forward is the same with or without SP."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lasp2.distributed.communicator import group_rank_and_size
from lasp2.distributed.sequence_split import global_token_index
from lasp2.ops.softmax_attention import softmax_attention
from lasp2.options import LAYOUTS, SOFTMAX_BACKENDS, SPLITS, check_choice


def rope_positions(local_len: int, group, split: str, cu_seqlens: Optional[torch.Tensor] = None,
                   device=None) -> torch.Tensor:
    """Global positions of this rank's tokens (int64 [local_len]); with cu_seqlens, the
    position within each token's document (positions restart at every document)."""
    rank, world = group_rank_and_size(group)
    if world == 1:
        split = "contiguous"
    pos = global_token_index(local_len, rank, world, split)
    if cu_seqlens is not None:
        cu = cu_seqlens.detach().to("cpu", torch.int64)
        doc = torch.searchsorted(cu, pos, right=True) - 1
        pos = pos - cu[doc.clamp(0, cu.numel() - 1)]
    return pos.to(device)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float, seq_dim: int) -> torch.Tensor:
    """Rotary embedding (rotate-half, as in Llama) of x [.., T, .., H, D] at the given positions."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64, device=x.device) / d)
    angles = positions.to(device=x.device, dtype=torch.float64)[:, None] * inv_freq[None, :]  # [T, D/2]
    shape = [1] * x.dim()
    shape[seq_dim], shape[-1] = x.shape[seq_dim], d // 2
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos, sin = (f(angles).to(compute).view(shape) for f in (torch.cos, torch.sin))
    x1, x2 = x.to(compute).chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Projections, rotary embeddings, causal softmax attention (GQA), output projection.

    Inputs are this rank's share of the sequence: ``[B, T_local, hidden]`` (layout
    "bthd") or ``[T_local, B, hidden]`` ("tbhd", Megatron's order). With ``group``
    set to the sequence-parallel group the result equals running the module on the
    whole sequence and splitting the output: rotary positions are the tokens'
    *global* positions under ``split`` (``lasp2.global_token_index``), restarting
    at each document when ``cu_seqlens`` is given. Parameters are replicated across
    the group; reduce their gradients over it (as Megatron's DP x CP reduction does).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, rope_theta: float = 10000.0,
                 bias: bool = False, causal: bool = True, group=None, split: str = "contiguous",
                 layout: str = "bthd", backend: str = "auto", device=None, dtype=None):
        super().__init__()
        num_kv_heads = num_kv_heads or num_heads
        head_dim = head_dim or hidden_size // num_heads
        if head_dim * num_heads == 0:
            raise ValueError(f"SoftmaxAttention: `hidden_size` {hidden_size} and `num_heads` {num_heads} give no heads")
        if num_heads % num_kv_heads:
            raise ValueError(f"SoftmaxAttention: `num_kv_heads` {num_kv_heads} must divide `num_heads` {num_heads}")
        if rope and head_dim % 2:
            raise ValueError(f"SoftmaxAttention: rotary embeddings need an even head dim, got {head_dim}")
        check_choice("SoftmaxAttention", "layout", layout, LAYOUTS)
        check_choice("SoftmaxAttention", "split", split, SPLITS)
        check_choice("SoftmaxAttention", "backend", backend, SOFTMAX_BACKENDS)
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.num_kv_heads, self.head_dim = hidden_size, num_heads, num_kv_heads, head_dim
        self.rope, self.rope_theta, self.causal = rope, rope_theta, causal
        self.group, self.split, self.layout, self.backend = group, split, layout, backend
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=bias, **factory)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=bias, **factory)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"SoftmaxAttention: `x` must be [*, *, {self.hidden_size}], got {list(x.shape)}")
        lead = x.shape[:2]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.rope:
            seq_dim = 1 if self.layout == "bthd" else 0
            pos = rope_positions(x.shape[seq_dim], self.group, self.split, cu_seqlens, device=x.device)
            q = apply_rope(q, pos, self.rope_theta, seq_dim)
            k = apply_rope(k, pos, self.rope_theta, seq_dim)
        o = softmax_attention(q, k, v, group=self.group, layout=self.layout, split=self.split,
                              cu_seqlens=cu_seqlens, causal=self.causal, backend=self.backend)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))
