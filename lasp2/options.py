"""The one vocabulary of lasp2: every name a caller can choose, defined once.

lasp2's ops and modules, megatron_patches and the examples all import these sets
instead of spelling their own, so a word means one thing everywhere:

  PROVIDERS         sequence-parallel algorithms of linear attention (docs/providers.md)
  SPLITS            how a sequence is laid out over the ranks of an SP group
  LAYOUTS           dimension orders of q, k, v: [B, T, H, D] or Megatron's [T, B, H, D]
  DECAYS            decay modes of the linear-attention module
  SOFTMAX_BACKENDS  block kernels of LASP-2H (lasp2.softmax_attention)
  FEATURE_MAPS      name -> function applied to q and k before linear attention
  LAYER_LETTERS     one letter per layer kind in hybrid patterns ("LLLS", "KKKS")
"""

from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
import torch.nn.functional as F

# "lasp2": one AllGather of states per direction (default, any split); "lasp1": a ring
# of P2P state passes; "ulysses": all-to-all to head sharding and back.
PROVIDERS = ("lasp2", "lasp1", "ulysses")

# "contiguous": rank r holds tokens [rT/P, (r+1)T/P); "balanced": the sequence is cut
# into 2P parts and rank r holds parts r and 2P-1-r (even causal work).
SPLITS = ("contiguous", "balanced")

LAYOUTS = ("bthd", "tbhd")

# "none": plain linear attention; "fixed": one log decay per head (lightning
# attention); "gate": a data-dependent log gate per head and token.
DECAYS = ("none", "fixed", "gate")

SOFTMAX_BACKENDS = ("auto", "sdpa", "plain")


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """elu(x) + 1 > 0: the positive feature map of Katharopoulos et al. (2020)."""
    return F.elu(x) + 1.0


FEATURE_MAPS: Dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": _identity,
    "elu": _elu_plus_one,  # always elu(x) + 1: "elu" never means plain F.elu in lasp2
    "relu": F.relu,
    "silu": F.silu,
}

LAYER_LETTERS: Dict[str, str] = {
    "L": "linear attention (LASP-2)",
    "S": "softmax attention (LASP-2H)",
    "G": "gated DeltaNet (delta rule)",
    "K": "Kimi Delta Attention (KDA, per-key gate)",
}


def check_choice(owner: str, name: str, value, choices: Sequence) -> None:
    """Raises ValueError "owner: `name` must be one of (...), got value" unless value is a choice."""
    if value not in choices:
        raise ValueError(f"{owner}: `{name}` must be one of {tuple(choices)}, got {value!r}")


def parse_layer_pattern(pattern, name: str = "pattern") -> List[str]:
    """The layer letters of a hybrid pattern such as "LLLS", one per layer.

    Raises ValueError naming the argument unless `pattern` is a non-empty string of
    LAYER_LETTERS. Callers that build only some kinds check the letters they get.
    """
    if not isinstance(pattern, str) or not pattern or set(pattern) - set(LAYER_LETTERS):
        kinds = ", ".join(f"{letter!r} {kind}" for letter, kind in LAYER_LETTERS.items())
        raise ValueError(f"`{name}` must be a non-empty string of layer letters ({kinds}), got {pattern!r}")
    return list(pattern)


__all__ = ["DECAYS", "FEATURE_MAPS", "LAYER_LETTERS", "LAYOUTS", "PROVIDERS", "SOFTMAX_BACKENDS", "SPLITS",
           "check_choice", "parse_layer_pattern"]
