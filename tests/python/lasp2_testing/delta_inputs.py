"""Whole-sequence float64 inputs of the distributed delta-rule tests (every provider's
gloo test draws them alike, so a one-process run on them is the reference).

    q, k, v, do, g, beta, cu, h0, dF = delta_rule_inputs(world, kind, packed, seed, heads, tokens_per_rank)

kind "gdn" (g [B, T, H]) or "kda" (g [B, T, H, K]); packed: B = 1 and documents of
uneven lengths (cu_seqlens int32), one ending mid-rank, one at a rank edge, a 1-token
one and one spanning ranks; h0 / dF: initial states and final-state gradients, one per
sequence (B rows, or the documents).

check_ranks_equal_one_process(op, inputs, group, rank, world, split, provider, what) is the
check every provider's test makes on such inputs.
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


def check_ranks_equal_one_process(op, inputs, group, rank: int, world: int, split: str, provider: str, what: str):
    """One rank of a distributed delta-rule test (the providers' tests share it): op over
    `group` (provider, split), with initial states in and final states out, equals the
    one-process run on the whole sequence (float64, 1e-5 relative: the part summaries
    travel in fp32): this rank's output rows, the final states, its q/k/v/g/beta
    gradients (their dtypes and shapes too) and the initial-state gradient summed over
    the ranks (each rank's is a share). Each rank's loss uses its own output rows and
    the share (rank + 1) / (1 + ... + world) of the final-state loss."""
    import torch.distributed as dist

    import lasp2
    from lasp2_testing.checks import assert_rel

    q, k, v, do, g, beta, cu, h0, dF = inputs
    kw = dict(scale=0.8, output_final_state=True, cu_seqlens=cu)
    full = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o_full, final_full = op(*full[:5], initial_state=full[5], **kw)
    grads_full = torch.autograd.grad((o_full * do).sum() + (final_full * dF).sum(), full)

    local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)  # noqa: E731
    leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g, beta)]
    h0_local = h0.clone().requires_grad_()
    o, final = op(*leaves, initial_state=h0_local, group=group, split=split, provider=provider, **kw)
    assert torch.isfinite(o_full).all() and torch.isfinite(final_full).all(), what
    assert o.shape == leaves[2].shape and final.shape == h0.shape and final.dtype == h0.dtype, what
    assert_rel(o, local(o_full), 1e-5, f"o, {what}")
    assert_rel(final, final_full, 1e-5, f"final state, {what}")
    weight = (rank + 1) / (world * (world + 1) / 2)
    loss = (o * local(do)).sum() + (final * dF * weight).sum()
    grads = torch.autograd.grad(loss, leaves + [h0_local])
    for name, got, want in zip(("q", "k", "v", "g", "beta"), grads, grads_full):
        assert got.dtype == want.dtype and got.shape == local(want).shape, f"d{name}, {what}"
        assert_rel(got, local(want), 1e-5, f"d{name}, {what}")
    d_h0 = grads[5].clone()
    dist.all_reduce(d_h0, group=group)  # the data/context-parallel gradient reduction
    assert_rel(d_h0, grads_full[5], 1e-5, f"d initial_state (summed), {what}")
