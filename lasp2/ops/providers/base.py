"""The face every sequence-parallel provider has, and the one registry of them.

A *provider* is one algorithm that runs an op of some *family* over an SP group
("linear_attention": LASP-2, LASP-1, Ulysses; a new family registers its own, e.g.
"gated_delta_rule"). Every provider is an object with

    name      its key, as the user spells it (``provider="lasp2"``)
    splits    the sequence splits it supports (lasp2.options.SPLITS or a subset)
    takes_states
              whether it runs sequence states (initial_state / output_final_state)
              across ranks; such a provider of "linear_attention" also has
              ``apply_with_states(...) -> (o, final_state or None)``
    check(owner, *, heads, split, world_size)
              raises ValueError naming the argument for a call it cannot run; cheap,
              no communication, so callers (Megatron's option checks too) run it
              before building anything
    apply(...)
              runs the op; inside, a torch.autograd.Function holds the provider's
              forward and backward. For "linear_attention":
              ``apply(q, k, v, g, decay, *, scale, sp_context, overlap) -> o`` on
              [B, T_local, H, D] views (layout already "bthd"); other families
              define the tensors of their own op.
    checks_in_op
              whether its torch.library custom op runs the per-call cross-rank
              check (``apply(..., check=, consistency=)``, lasp2.ops._library.
              compiled_check's arguments): then torch.compile(fullgraph=True) takes
              a call over a group; otherwise the op checks the ranks in Python and
              a compiled call breaks the graph there (an error under fullgraph)

Register with ``register(family, provider)``; the op looks it up with
``get_provider(owner, family, name)``, which raises ValueError listing the names.
The gradient epilogue (dg in the dtype of g, the decay gradient summed over tokens)
is the binding's (csrc/torch/attention_params.cpp: input_grads), shared by every provider.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from lasp2.options import SPLITS

# The CPU kernels' chunk length, not a knob of the ops (the CUDA kernels pick their
# own tiles); passed to the binding until it takes its own default.
CPU_CHUNK_SIZE = 64


class Provider:
    """Base of the providers: a name, the splits it supports, check and apply."""

    name: str = ""
    splits: Tuple[str, ...] = SPLITS
    takes_states: bool = False
    checks_in_op: bool = False

    def check(self, owner: str, *, heads: int, split: str, world_size: int) -> None:
        if split not in self.splits:
            only = " or ".join(f'split="{s}"' for s in self.splits)
            raise ValueError(f"{owner}: provider {self.name!r} supports {only} only, got split={split!r} "
                             "(use provider=\"lasp2\" for the balanced split)")

    def apply(self, *args, **kwargs) -> torch.Tensor:
        raise NotImplementedError


_REGISTRY: Dict[str, Dict[str, Provider]] = {}


def register(family: str, provider: Provider) -> Provider:
    """Adds `provider` to `family` (names are unique within a family) and returns it."""
    providers = _REGISTRY.setdefault(family, {})
    if provider.name in providers and providers[provider.name] is not provider:
        raise ValueError(f"a provider named {provider.name!r} is already registered for {family!r}")
    providers[provider.name] = provider
    return provider


def provider_names(family: str) -> Tuple[str, ...]:
    return tuple(_REGISTRY.get(family, {}))


def get_provider(owner: str, family: str, name: str) -> Provider:
    """The provider `name` of `family`; ValueError naming `provider` if there is none."""
    provider = _REGISTRY.get(family, {}).get(name)
    if provider is None:
        raise ValueError(f"{owner}: `provider` must be one of {provider_names(family)}, got {name!r}")
    return provider


@dataclass(frozen=True)
class KernelCall:
    """What the C++ schedules take besides the tensors (one object instead of a train
    of positional values): the scale, this rank's document starts, the communicator
    (None: one device), parts per rank (2 for the balanced split), LASP-2's forward
    schedule flag and the CPU chunk length."""

    scale: float
    doc_start: Optional[torch.Tensor]
    comm: Any
    parts_per_rank: int = 1
    overlap: bool = True
    chunk_size: int = CPU_CHUNK_SIZE


__all__ = ["CPU_CHUNK_SIZE", "KernelCall", "Provider", "get_provider", "provider_names", "register"]
