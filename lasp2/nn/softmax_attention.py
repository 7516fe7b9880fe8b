"""A softmax-attention token mixer (GQA, RoPE) whose forward is the same with or without SP."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from lasp2.distributed.context import SPContext, sp_context_for
from lasp2.nn._rank_checks import check_sp_context, module_group
from lasp2.ops._group_consistency import raised_on_every_rank
from lasp2.ops._checks import check_module_input, check_positive_int
from lasp2.ops.softmax_attention import softmax_attention
from lasp2.options import LAYOUTS, SOFTMAX_BACKENDS, SPLITS, check_choice


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
    *global* positions under ``split``, restarting at each document when
    ``cu_seqlens`` is given (``SPContext.positions``). ``sp_context`` (built once per
    batch, ``lasp2.build_sp_context``) replaces ``group`` / ``split`` / ``cu_seqlens``. Parameters are replicated across
    the group; reduce their gradients over it (as Megatron's DP x CP reduction does).
    """

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: Optional[int] = None,
                 head_dim: Optional[int] = None, rope: bool = True, rope_theta: float = 10000.0,
                 bias: bool = False, causal: bool = True, group=None, split: str = "contiguous",
                 layout: str = "bthd", backend: str = "auto", device=None, dtype=None):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            check_positive_int("SoftmaxAttention", name, value)
        check_positive_int("SoftmaxAttention", "num_kv_heads", num_kv_heads, optional=True)
        check_positive_int("SoftmaxAttention", "head_dim", head_dim, optional=True)
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

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                sp_context: Optional[SPContext] = None) -> torch.Tensor:
        seq_dim = 1 if self.layout == "bthd" else 0
        with raised_on_every_rank("SoftmaxAttention", module_group(self.group, sp_context), x):
            check_sp_context("SoftmaxAttention", sp_context)
            check_module_input("SoftmaxAttention", x, self.hidden_size, self.q_proj.weight, seq_dim)
            if sp_context is None:
                sp_context = sp_context_for(self.group, self.split, cu_seqlens, x.shape[seq_dim], x.device)
        lead = x.shape[:2]
        q = self.q_proj(x).view(*lead, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(*lead, self.num_kv_heads, self.head_dim)
        if self.rope:
            q = apply_rope(q, sp_context.positions, self.rope_theta, seq_dim)
            k = apply_rope(k, sp_context.positions, self.rope_theta, seq_dim)
        o = softmax_attention(q, k, v, layout=self.layout, causal=self.causal, backend=self.backend,
                              cu_seqlens=cu_seqlens, sp_context=sp_context)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))
