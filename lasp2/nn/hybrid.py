"""Hybrid models: pre-norm residual blocks mixing linear attention (LASP-2), softmax
attention (LASP-2H) and the delta rule (gated DeltaNet, Kimi Delta Attention) under one
sequence split and one SP group."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from lasp2.distributed.context import SPContext, resolve_sp_context, sp_context_for
from lasp2.nn.gated_deltanet import GatedDeltaNet
from lasp2.nn.linear_attention import LinearAttention
from lasp2.nn._rank_checks import check_sp_context, module_group
from lasp2.ops._group_consistency import raised_on_every_rank
from lasp2.nn.norms import RMSNorm
from lasp2.nn.softmax_attention import SoftmaxAttention
from lasp2.ops._checks import check_module_input
from lasp2.options import check_choice, parse_layer_pattern


def _delta_mixer(mixer: str, per_key_gate: bool):
    """GatedDeltaNet with its gate kind fixed by the mixer's name: "kda" is the per-key
    gate, "gated_deltanet" the per-head one (a `per_key_gate` kwarg would contradict it)."""

    def build(hidden_size, num_heads, **kwargs):
        if "per_key_gate" in kwargs:
            raise ValueError(f"HybridBlock: mixer {mixer!r} fixes `per_key_gate` to {per_key_gate}; "
                             "choose the mixer 'gated_deltanet' (per-head gate) or 'kda' (per-key gate) instead")
        return GatedDeltaNet(hidden_size, num_heads, per_key_gate=per_key_gate, **kwargs)

    return build


# mixer name -> (its builder, its letter in hybrid patterns, lasp2.options.LAYER_LETTERS)
MIXERS = {"linear": (LinearAttention, "L"), "softmax": (SoftmaxAttention, "S"),
          "gated_deltanet": (_delta_mixer("gated_deltanet", False), "G"), "kda": (_delta_mixer("kda", True), "K")}
MIXER_OF_LETTER = {letter: name for name, (_, letter) in MIXERS.items()}
# mixer name -> HybridStack's argument holding that kind's kwargs
KWARGS_ARGUMENT = {"linear": "linear_kwargs", "softmax": "softmax_kwargs", "gated_deltanet": "gdn_kwargs",
                   "kda": "kda_kwargs"}


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
    ``lasp2.nn.LinearAttention`` ("linear"), ``lasp2.nn.SoftmaxAttention`` ("softmax") or
    ``lasp2.nn.GatedDeltaNet`` with a per-head gate ("gated_deltanet") or Kimi Delta
    Attention's per-key gate ("kda").

    Token-wise parts (norms, MLP) need no communication; the mixer does its own
    (LASP-2: one AllGather of states; LASP-2H: one AllGather of K/V; the delta rule: a
    convolution halo and one AllGather of part summaries). ``mixer_kwargs`` go to the
    mixer's constructor (e.g. ``decay="fixed"``, ``num_kv_heads=2`` or ``conv_size=4``).
    """

    def __init__(self, hidden_size: int, num_heads: int, mixer: str = "linear",
                 intermediate_size: Optional[int] = None, group=None, split: str = "contiguous",
                 layout: str = "bthd", device=None, dtype=None, **mixer_kwargs):
        super().__init__()
        check_choice("HybridBlock", "mixer", mixer, tuple(MIXERS))
        factory = {"device": device, "dtype": dtype}
        self.mixer_kind = mixer
        cls = MIXERS[mixer][0]
        self.norm1 = RMSNorm(hidden_size, **factory)
        self.mixer = cls(hidden_size, num_heads, group=group, split=split, layout=layout, **factory, **mixer_kwargs)
        self.norm2 = RMSNorm(hidden_size, **factory)
        self.mlp = SwiGLU(hidden_size, intermediate_size or 4 * hidden_size, **factory)

    def set_sequence_parallel(self, group, split: str = "contiguous"):
        """Points the mixer at an SP group and split (None: one device)."""
        self.mixer.group, self.mixer.split = group, split

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                sp_context: Optional[SPContext] = None) -> torch.Tensor:
        with raised_on_every_rank("HybridBlock", module_group(self.mixer.group, sp_context), x):
            check_sp_context("HybridBlock", sp_context)
            check_module_input("HybridBlock", x, self.norm1.weight.shape[0], self.norm1.weight)
        x = x + self.mixer(self.norm1(x), cu_seqlens=cu_seqlens, sp_context=sp_context)
        return x + self.mlp(self.norm2(x))


class HybridStack(nn.Module):
    """A stack of HybridBlocks following ``pattern``, one letter a layer
    (``lasp2.options.LAYER_LETTERS``): "L" linear attention, "S" softmax attention,
    "G" gated DeltaNet, "K" Kimi Delta Attention; e.g. "LLLS" (3 linear : 1 softmax, as
    in the LASP-2H paper's hybrids), "KKKS" (Kimi Linear's 3 : 1) or "GGGS" (Qwen3-Next's).
    Every layer shares ``group``, ``split`` and ``layout``: one sequence layout serves
    the whole model, so activations never move between layers. ``linear_kwargs`` /
    ``softmax_kwargs`` / ``gdn_kwargs`` / ``kda_kwargs`` go to the mixers of the L / S /
    G / K layers; non-empty ones for a letter the pattern lacks are a ValueError."""

    def __init__(self, hidden_size: int, num_heads: int, pattern: str = "LLLS",
                 intermediate_size: Optional[int] = None, group=None, split: str = "contiguous",
                 layout: str = "bthd", linear_kwargs: Optional[dict] = None,
                 softmax_kwargs: Optional[dict] = None, gdn_kwargs: Optional[dict] = None,
                 kda_kwargs: Optional[dict] = None, device=None, dtype=None):
        super().__init__()
        letters = parse_layer_pattern(pattern)  # every letter has a mixer (MIXER_OF_LETTER)
        self.pattern = pattern
        self.group, self.split, self.layout = group, split, layout
        kwargs = {"linear": linear_kwargs, "softmax": softmax_kwargs, "gated_deltanet": gdn_kwargs,
                  "kda": kda_kwargs}
        # settings for a kind the pattern never builds would be dropped silently (a typo in
        # the pattern, or kwargs meant for another kind): refused, naming the argument
        for mixer, given in kwargs.items():
            letter = MIXERS[mixer][1]
            if given and letter not in letters:
                raise ValueError(f"HybridStack: `{KWARGS_ARGUMENT[mixer]}` {given!r} is given but `pattern` "
                                 f"{pattern!r} has no {letter!r} layer to take it")
        self.layers = nn.ModuleList(
            HybridBlock(hidden_size, num_heads, MIXER_OF_LETTER[c], intermediate_size, group=group, split=split,
                        layout=layout, device=device, dtype=dtype, **(kwargs[MIXER_OF_LETTER[c]] or {}))
            for c in letters)
        self.norm = RMSNorm(hidden_size, device=device, dtype=dtype)

    def set_sequence_parallel(self, group, split: str = "contiguous"):
        self.group, self.split = group, split
        for layer in self.layers:
            layer.set_sequence_parallel(group, split)

    def forward(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor] = None,
                sp_context: Optional[SPContext] = None) -> torch.Tensor:
        """x: this rank's tokens. The SP context (group, split, documents, positions) is
        built once here, unless given, and shared by every layer."""
        seq_dim = 1 if self.layout == "bthd" else 0
        with raised_on_every_rank("HybridStack", module_group(self.group, sp_context), x):
            check_sp_context("HybridStack", sp_context)
            check_module_input("HybridStack", x, self.norm.weight.shape[0], self.norm.weight, seq_dim)
            if sp_context is None:
                sp_context = sp_context_for(self.group, self.split, cu_seqlens, x.shape[seq_dim], x.device)
            elif cu_seqlens is not None:  # both given: they must agree (the layers see only the context)
                resolve_sp_context("HybridStack", sp_context, None, "contiguous", cu_seqlens, x.shape[seq_dim],
                                   x.shape[1 - seq_dim], x.device)
        for layer in self.layers:
            x = layer(x, sp_context=sp_context)
        return self.norm(x)
