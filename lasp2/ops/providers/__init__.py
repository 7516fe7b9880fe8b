"""Sequence-parallel providers: one face (base.py), one registry, one module each.

For lasp2.linear_attention (family "linear_attention"):
  "lasp2":   one AllGather of d_k x d_v states per layer and direction (the default;
             lasp2.py).
  "lasp1":   a ring of P2P state passes, P-1 serial hops per direction (lasp1.py).
  "ulysses": all-to-all from sequence- to head-sharding and back, the whole sequence
             on every rank for H/P heads (ulysses.py).

All three compute the same function; docs/providers.md compares their costs. A new
family registers its providers here with `register(family, provider)`.

For lasp2.gated_delta_rule / lasp2.kda (family "gated_delta_rule"), the op's module
registers "lasp2", "lasp1" and "ulysses" (ulysses_delta.py) in that order, which the
per-call cross-rank check's provider field relies on.
"""

from lasp2.ops.providers.base import Provider, get_provider, provider_names, register
from lasp2.ops.providers.lasp1 import Lasp1Provider
from lasp2.ops.providers.lasp2 import Lasp2Provider
from lasp2.ops.providers.ulysses import UlyssesProvider
from lasp2.options import PROVIDERS

LINEAR_ATTENTION = "linear_attention"
for _provider in (Lasp2Provider(), Lasp1Provider(), UlyssesProvider()):
    register(LINEAR_ATTENTION, _provider)

__all__ = ["LINEAR_ATTENTION", "PROVIDERS", "Provider", "get_provider", "provider_names", "register"]
