"""Whole-sequence float64 inputs of the distributed delta-rule tests (every provider's
gloo test draws them alike, so a one-process run on them is the reference).

    q, k, v, do, g, beta, cu, h0, dF = delta_rule_inputs(world, kind, packed, seed, heads, tokens_per_rank)

kind "gdn" (g [B, T, H]) or "kda" (g [B, T, H, K]); packed: B = 1 and documents of
uneven lengths (cu_seqlens int32), one ending mid-rank, one at a rank edge, a 1-token
one and one spanning ranks; h0 / dF: initial states and final-state gradients, one per
sequence (B rows, or the documents).
"""

import torch
import torch.nn.functional as F

HEAD_DIMS = (4, 3)  # (K, V): unequal, so a swapped key / value dimension shows


def delta_rule_inputs(world: int, kind: str, packed: bool, seed: int, heads: int, tokens_per_rank: int):
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    B, H, (K, V) = 1 if packed else 2, heads, HEAD_DIMS
    T = tokens_per_rank * world
    q, k, v, do = rnd(B, T, H, K), rnd(B, T, H, K) / 2, rnd(B, T, H, V), rnd(B, T, H, V)
    g = F.logsigmoid(rnd(B, T, H, K) if kind == "kda" else rnd(B, T, H) + 2) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    cu = None
    if packed:
        per = tokens_per_rank
        cuts = sorted({per // 2 - 1, per, per + 1, T // 2 + 1, T - 1})
        cu = torch.tensor([0, *cuts, T], dtype=torch.int32)
    N = B if cu is None else cu.numel() - 1
    h0 = rnd(N, H, K, V) * 0.5
    dF = rnd(N, H, K, V)
    return q, k, v, do, g, beta, cu, h0, dF
