"""Sequence-parallel providers for lasp2.linear_attention besides LASP-2 itself.

  "lasp2":   one AllGather of d_k x d_v states per layer and direction (the default;
             lasp2/ops/linear_attention.py).
  "lasp1":   a ring of P2P state passes, P-1 serial hops per direction (lasp1.py).
  "ulysses": all-to-all from sequence- to head-sharding and back, the whole sequence
             on every rank for H/P heads (ulysses.py).

All three compute the same function; docs/providers.md compares their costs.
"""

from lasp2.options import PROVIDERS

__all__ = ["PROVIDERS"]
