"""A linear-attention token mixer whose forward is the same with or without SP."""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from lasp2.distributed.context import SPContext
from lasp2.ops._checks import check_module_input, check_positive_float, check_positive_int
from lasp2.nn._rank_checks import check_sp_context, module_group
from lasp2.ops._group_consistency import raised_on_every_rank
from lasp2.nn.norms import RMSNorm
from lasp2.ops.gates import gate_from_logits, lightning_log_decay
from lasp2.ops.linear_attention import linear_attention
from lasp2.options import DECAYS, FEATURE_MAPS, LAYOUTS, PROVIDERS, SPLITS, check_choice


class LinearAttention(nn.Module):
    """Projections, a feature map, causal linear attention, a per-head output norm.

    Inputs are this rank's share of the sequence: ``[B, T_local, hidden]`` (layout
    "bthd") or ``[T_local, B, hidden]`` ("tbhd", Megatron's order). With ``group``
    set to the sequence-parallel group the result equals running the module on the
    whole sequence and splitting the output (``split`` says how the sequence is laid
    out). Parameters are replicated across the group; reduce their gradients over it
    (Megatron does this over its data-parallel-with-context-parallel group).

    decay: "none" (plain linear attention), "fixed" (per-head log decays, lightning
    attention / retention style) or "gate" (data-dependent scalar gate per head and
    token, ``logsigmoid(W_g x) / gate_logit_normalizer``, simple-GLA / Mamba2 style).
    feature_map: applied to q and k (``lasp2.options.FEATURE_MAPS``; "elu" is elu + 1).

    provider: the sequence-parallel algorithm, "lasp2" (default), "lasp1" or "ulysses"
    (see ``lasp2.linear_attention``); all give the same result.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: Optional[int] = None,
                 decay: str = "gate", feature_map: str = "identity", output_norm: bool = True,
                 gate_logit_normalizer: float = 16.0, bias: bool = False, group=None,
                 split: str = "contiguous", layout: str = "bthd", device=None, dtype=None,
                 provider: str = "lasp2"):
        super().__init__()
        check_choice("LinearAttention", "decay", decay, DECAYS)
        check_choice("LinearAttention", "feature_map", feature_map, FEATURE_MAPS)
        check_choice("LinearAttention", "provider", provider, PROVIDERS)
        check_choice("LinearAttention", "split", split, SPLITS)
        check_choice("LinearAttention", "layout", layout, LAYOUTS)
        check_positive_int("LinearAttention", "hidden_size", hidden_size)
        check_positive_int("LinearAttention", "num_heads", num_heads)
        check_positive_int("LinearAttention", "head_dim", head_dim, optional=True)
        check_positive_float("LinearAttention", "gate_logit_normalizer", gate_logit_normalizer)
        head_dim = head_dim or hidden_size // num_heads
        if head_dim * num_heads == 0:
            raise ValueError(f"LinearAttention: `hidden_size` {hidden_size} and `num_heads` {num_heads} give no heads")
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, head_dim
        self.decay_kind, self.feature_map_name = decay, feature_map
        self.gate_logit_normalizer = gate_logit_normalizer
        self.group, self.split, self.layout = group, split, layout
        self.provider = provider
        inner = num_heads * head_dim
        self.q_proj = nn.Linear(hidden_size, inner, bias=bias, **factory)
        self.k_proj = nn.Linear(hidden_size, inner, bias=bias, **factory)
        self.v_proj = nn.Linear(hidden_size, inner, bias=bias, **factory)
        self.g_proj = nn.Linear(hidden_size, num_heads, bias=True, **factory) if decay == "gate" else None
        if decay == "fixed":
            self.register_buffer("log_decay", lightning_log_decay(num_heads).to(device=device, dtype=torch.float32))
        else:
            self.log_decay = None
        self.norm = RMSNorm(head_dim, **factory) if output_norm else None
        self.o_proj = nn.Linear(inner, hidden_size, bias=bias, **factory)
        self.reset_parameters()

    def reset_parameters(self):
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2 ** -2.5)
            if proj.bias is not None:
                nn.init.zeros_(proj.bias)
        if self.g_proj is not None:
            nn.init.xavier_uniform_(self.g_proj.weight, gain=2 ** -2.5)
            nn.init.constant_(self.g_proj.bias, math.log(15.0))  # start near a_t = 1 - 1/16

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                sp_context: Optional[SPContext] = None) -> torch.Tensor:
        """x: this rank's tokens; `sp_context` (``lasp2.build_sp_context``, once per batch)
        replaces the module's ``group`` / ``split`` and ``cu_seqlens``."""
        with raised_on_every_rank("LinearAttention", module_group(self.group, sp_context), x):
            check_sp_context("LinearAttention", sp_context)
            check_module_input("LinearAttention", x, self.hidden_size, self.q_proj.weight,
                               1 if self.layout == "bthd" else 0)
        lead = x.shape[:2]
        heads = (*lead, self.num_heads, self.head_dim)
        feature = FEATURE_MAPS[self.feature_map_name]
        q = feature(self.q_proj(x).view(heads))
        k = feature(self.k_proj(x).view(heads))
        v = self.v_proj(x).view(heads)
        g = gate_from_logits(self.g_proj(x), self.gate_logit_normalizer) if self.g_proj is not None else None
        where = {"sp_context": sp_context} if sp_context is not None else {"group": self.group, "split": self.split}
        o = linear_attention(q, k, v, g=g, decay=self.log_decay, layout=self.layout, cu_seqlens=cu_seqlens,
                             provider=self.provider, **where)
        if self.norm is not None:
            o = self.norm(o)
        return self.o_proj(o.reshape(*lead, self.num_heads * self.head_dim))
