"""Gated DeltaNet (Yang et al., 2024; the layer of Qwen3-Next's linear blocks) as a
token mixer whose forward is the same with or without sequence parallelism."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lasp2.nn.norms import rms_norm
from lasp2.nn._rank_checks import check_sp_context, module_group
from lasp2.ops._group_consistency import raised_on_every_rank
from lasp2.nn.delta_checks import check_delta_layer_ranks
from lasp2.nn.short_conv import ShortConvolution
from lasp2.distributed.context import SPContext, check_cu_seqlens_form, resolve_sp_context
from lasp2.ops._checks import check_bool, check_module_input, check_positive_float, check_positive_int
from lasp2.ops.gated_delta_rule import FAMILY, gated_delta_rule, kda
from lasp2.ops.providers.base import provider_names
from lasp2.options import LAYOUTS, SPLITS, check_choice


def init_gate_parameters(num_heads: int, gate_width: Optional[int] = None, device=None, dtype=None):
    """(A_log [num_heads], dt_bias [gate_width]) initialised as Mamba2 / fla do: A uniform in
    [1, 16]; dt_bias = softplus^{-1}(dt) with dt log-uniform in [1e-3, 1e-1]."""
    factory = {"device": device, "dtype": dtype}
    A_log = torch.log(torch.empty(num_heads, **factory).uniform_(1, 16))
    dt = torch.exp(torch.rand(gate_width or num_heads, **factory) * (math.log(0.1) - math.log(1e-3))
                   + math.log(1e-3))
    return A_log, dt + torch.log(-torch.expm1(-dt))


def _gate_dtype(x: torch.Tensor) -> torch.dtype:
    # gates accumulate over the sequence: float32 at least (float64 stays float64)
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def delta_log_gate(a: torch.Tensor, A_log: torch.Tensor, dt_bias: torch.Tensor, per_key: bool = False) -> torch.Tensor:
    """Log gates g = -exp(A_log) * softplus(a + dt_bias) <= 0 (Mamba2 style, as fla's gated
    DeltaNet), in float32 at least. a: [..., H] with dt_bias [H], or with per_key (KDA)
    [..., H, K] with dt_bias [H * K]."""
    dtype = _gate_dtype(a)
    A, dt_bias = torch.exp(A_log.to(dtype)), dt_bias.to(dtype)
    if per_key:
        return -(F.softplus(a.to(dtype) + dt_bias.view(A.shape[0], -1)) * A[:, None])
    return -(F.softplus(a.to(dtype) + dt_bias) * A)


def beta_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """The delta rule's write strength beta = sigmoid(logits) in (0, 1), float32 at least."""
    return torch.sigmoid(logits.to(_gate_dtype(logits)))


class GatedRMSNorm(nn.Module):
    """RMSNorm over the head dim, times silu(gate): the output gate + norm of fla's
    gated DeltaNet (FusedRMSNormGated)."""

    def __init__(self, head_dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim, device=device, dtype=dtype))

    def forward(self, x, gate):
        normed = rms_norm(x, self.weight, self.eps)
        return normed * F.silu(gate.to(normed.dtype))


class GatedDeltaNet(nn.Module):
    """Projections, short causal convolutions of q, k, v (SiLU), L2-normalised q and k,
    beta = sigmoid(W_b x), log gate g = -exp(A_log) softplus(W_a x + dt_bias) (Mamba2
    style, as fla), the gated delta rule, a gated RMSNorm per head and an output
    projection. `per_key_gate=True` gives Kimi Delta Attention's per-key-dim gate.

    Inputs are this rank's share of the sequence, ``[B, T_local, hidden]`` ("bthd") or
    ``[T_local, B, hidden]`` ("tbhd"); with ``group`` (or a forward's ``sp_context``,
    as lasp2.nn.HybridStack passes for "G" / "K" layers) the result equals running the
    module on the whole sequence (the short convolutions exchange a halo of
    kernel_size - 1 tokens with the previous part's rank, the delta rule runs LASP-2,
    or ``provider`` "lasp1" / "ulysses", as ``lasp2.gated_delta_rule``).
    Parameters are replicated; reduce their gradients over the group.
    """

    def __init__(self, hidden_size: int, num_heads: int, head_dim: Optional[int] = None,
                 value_head_dim: Optional[int] = None, conv_size: int = 4, per_key_gate: bool = False,
                 group=None, split: str = "contiguous", layout: str = "bthd", norm_eps: float = 1e-5, device=None, dtype=None,
                 provider: str = "lasp2"):
        super().__init__()
        check_positive_int("GatedDeltaNet", "hidden_size", hidden_size)
        check_positive_int("GatedDeltaNet", "num_heads", num_heads)
        check_positive_int("GatedDeltaNet", "head_dim", head_dim, optional=True)
        check_positive_int("GatedDeltaNet", "value_head_dim", value_head_dim, optional=True)
        check_positive_int("GatedDeltaNet", "conv_size", conv_size)
        check_positive_float("GatedDeltaNet", "norm_eps", norm_eps)
        # a gate kind, not a truth value: "no" crashed in the cross-rank check's int(), 1 built KDA
        check_bool("GatedDeltaNet", "per_key_gate", per_key_gate)
        head_dim = head_dim or hidden_size // num_heads
        value_head_dim = value_head_dim or head_dim
        if head_dim * num_heads == 0:
            raise ValueError(f"GatedDeltaNet: `hidden_size` {hidden_size} and `num_heads` {num_heads} give no heads")
        check_choice("GatedDeltaNet", "layout", layout, LAYOUTS)
        check_choice("GatedDeltaNet", "split", split, SPLITS)
        check_choice("GatedDeltaNet", "provider", provider, provider_names(FAMILY))
        factory = {"device": device, "dtype": dtype}
        self.hidden_size, self.num_heads = hidden_size, num_heads
        self.head_dim, self.value_head_dim = head_dim, value_head_dim
        self.per_key_gate = per_key_gate
        self.group, self.split, self.layout = group, split, layout
        self.provider = provider
        key_dim, value_dim = num_heads * head_dim, num_heads * value_head_dim
        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False, **factory)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False, **factory)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False, **factory)
        self.b_proj = nn.Linear(hidden_size, num_heads, bias=False, **factory)
        gate_width = key_dim if per_key_gate else num_heads
        self.a_proj = nn.Linear(hidden_size, gate_width, bias=False, **factory)
        A_log, dt_bias = init_gate_parameters(num_heads, gate_width, **factory)
        self.A_log, self.dt_bias = nn.Parameter(A_log), nn.Parameter(dt_bias)
        self.q_conv = ShortConvolution(key_dim, conv_size, **factory)
        self.k_conv = ShortConvolution(key_dim, conv_size, **factory)
        self.v_conv = ShortConvolution(value_dim, conv_size, **factory)
        self.g_proj = nn.Linear(hidden_size, value_dim, bias=False, **factory)
        self.o_norm = GatedRMSNorm(value_head_dim, eps=norm_eps, **factory)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                initial_state: Optional[torch.Tensor] = None, output_final_state: bool = False,
                sp_context: Optional[SPContext] = None):
        """Returns the output, or (output, final_state) when output_final_state.
        `sp_context` (``lasp2.build_sp_context``, once per batch; what HybridStack passes)
        replaces the module's ``group`` / ``split`` and ``cu_seqlens`` (a `cu_seqlens`
        given too must equal the context's)."""
        seq_dim = 1 if self.layout == "bthd" else 0
        group, split = module_group(self.group, sp_context), self.split
        with raised_on_every_rank("GatedDeltaNet", group, x):  # a failing rank's peers raise too
            check_sp_context("GatedDeltaNet", sp_context)
            check_module_input("GatedDeltaNet", x, self.hidden_size, self.q_proj.weight, seq_dim)
            if cu_seqlens is not None:  # its form before the convolutions read its values
                check_cu_seqlens_form("GatedDeltaNet", cu_seqlens)
            if sp_context is not None:  # the convolutions and the op run on the context's layout
                resolve_sp_context("GatedDeltaNet", sp_context, None, "contiguous", cu_seqlens, x.shape[seq_dim],
                                   x.shape[1 - seq_dim], x.device)
                split, cu_seqlens = sp_context.split, sp_context.cu_seqlens
        if self.layout == "tbhd":
            x = x.transpose(0, 1)
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_dim, self.value_head_dim
        q, k, v = (proj(x).unflatten(-1, (H, d)) for proj, d in ((self.q_proj, K), (self.k_proj, K), (self.v_proj, V)))
        beta = beta_from_logits(self.b_proj(x))
        a = self.a_proj(x)
        g = delta_log_gate(a.view(B, T, H, K) if self.per_key_gate else a, self.A_log, self.dt_bias, self.per_key_gate)
        op = kda if self.per_key_gate else gated_delta_rule
        convs = (self.q_conv, self.k_conv, self.v_conv)
        # ONE cross-rank check a call, before the three convolutions' halo all-gathers: what
        # they move, the layout (a square [B, T] would pass every size check read the other
        # way) and the delta rule's own check (the convolutions and the op get its proof: ranks_checked)
        checked = check_delta_layer_ranks(
            "GatedDeltaNet", x, self.hidden_size, self.q_conv.kernel_size, q, k, v, g, beta,
            per_key=self.per_key_gate, group=group, split=split, cu_seqlens=cu_seqlens, provider=self.provider,
            use_qk_l2norm=True, grad_inputs=[w for conv in convs for w in conv.parameters()],
            initial_state=initial_state, output_final_state=output_final_state,
            fields=(LAYOUTS.index(self.layout),), names=("layout (bthd/tbhd)",))
        conv = dict(group=group, split=split, cu_seqlens=checked.cu_seqlens, ranks_checked=checked)
        q, k, v = (c(t.flatten(2), **conv).view(t.shape) for c, t in zip(convs, (q, k, v)))
        # the context's own collectives reach the op; the per-call arguments otherwise
        where = ({"sp_context": sp_context} if sp_context is not None
                 else {"cu_seqlens": cu_seqlens, "group": group, "split": split})
        o, final = op(q, k, v, g, beta, initial_state=initial_state, output_final_state=output_final_state,
                      use_qk_l2norm=True, provider=self.provider, ranks_checked=checked, **where)
        o = self.o_norm(o, self.g_proj(x).view(B, T, H, V))
        out = self.o_proj(o.reshape(B, T, H * V))
        if self.layout == "tbhd":
            out = out.transpose(0, 1)
        return (out, final) if output_final_state else out
