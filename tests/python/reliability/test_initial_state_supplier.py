"""`initial_state` over a group (session 22's red-team, item 2): every rank passes the
same values, and ranks whose copies differ all raise.

The rule in the docs ("sequence n starts from initial_state[n] wherever its first token
lives") did not say whose copy counts, and with copies that differed no single answer
came out: LASP-2 (linear attention and the delta rule) combines the states on every rank
from that rank's copy, so each rank returned other final states; provider "ulysses"
started each head from the copy of the rank running it. Now the copies' bits are compared
in the cross-rank check (ValueError naming `initial_state` on every rank; compiled
linear_attention over a group too, inside its custom op). With equal
copies the output and final states are one process's on every rank, and the ranks'
gradients of initial_state sum to one process's: LASP-2 and LASP-1 give a sequence's
whole gradient to the rank holding its first token, "ulysses" each rank its heads'.
float64 inputs; the delta rule carries its states in float32 (1e-5)."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world

T_LOCAL, H, D = 8, 2, 4
# documents starting on rank 0 and rank 1 under both splits (balanced, P = 2: rank 0 holds
# tokens [0, 4) and [12, 16), rank 1 [4, 12))
CU = [0, 3, 6, 13, 16]


def _first_token_rank(position, world, split):
    if split == "contiguous":
        return position // T_LOCAL
    part = position // (T_LOCAL // 2)
    return part if part < world else 2 * world - 1 - part


def _inputs(world, family, packed):
    gen = torch.Generator().manual_seed(11)
    B, T = (1 if packed else 2), T_LOCAL * world
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand((B, T, H, D) if family == "kda" else (B, T, H), generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    N = len(CU) - 1 if packed else B
    state = torch.randn(N, H, D, D, generator=gen, dtype=torch.float64)
    do = torch.randn(B, T, H, D, generator=gen, dtype=torch.float64)
    dfinal = torch.randn(N, H, D, D, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, state, do, dfinal


def _call(family, q, k, v, g, beta, h0, **kw):
    if family == "linear":
        return lasp2.linear_attention(q, k, v, g=g, initial_state=h0, output_final_state=True, **kw)
    op = lasp2.kda if family == "kda" else lasp2.gated_delta_rule
    return op(q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw)


CASES = [(family, packed, split, provider) for family in ("gdn", "kda", "linear") for packed in (True, False)
         for split in ("contiguous", "balanced") for provider in ("lasp2", "lasp1", "ulysses")
         if not (family == "linear" and provider == "ulysses")  # linear attention's ulysses takes no states
         and (packed or (family, split) == ("gdn", "contiguous"))]


def _body(rank, world):
    group = dist.group.WORLD
    failures = []
    for case in CASES:
        family, packed, split, provider = case
        q, k, v, g, beta, state, do, dfinal = _inputs(world, family, packed)
        cu = torch.tensor(CU) if packed else None
        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)  # noqa: E731
        # different copies: every rank raises, naming the argument
        try:
            _call(family, *(local(x) for x in (q, k, v, g, beta)), state + rank, cu_seqlens=cu, group=group,
                  split=split, provider=provider)
            failures.append(f"{case}: different copies ran")
        except ValueError as e:
            if "`initial_state`" not in str(e):
                failures.append(f"{case}: {e}")
        # equal copies: one process's output, final states and summed gradient
        h0 = state.clone().requires_grad_()
        o, final = _call(family, *(local(x) for x in (q, k, v, g, beta)), h0, cu_seqlens=cu, group=group,
                         split=split, provider=provider)
        # the loss is the sum of the ranks' losses; the final states' term on rank 0's only
        ((o * local(do)).sum() + (final * dfinal).sum() * (rank == 0)).backward()
        grads = [torch.empty_like(h0.grad) for _ in range(world)]
        dist.all_gather(grads, h0.grad)
        ref = state.clone().requires_grad_()
        o_ref, final_ref = _call(family, q, k, v, g, beta, ref, cu_seqlens=cu)
        ((o_ref * do).sum() + (final_ref * dfinal).sum()).backward()
        starts = CU[:-1] if packed else [0] * q.shape[0]
        holder = torch.tensor([_first_token_rank(p, world, split) == rank for p in starts])[:, None, None, None]
        for name, got, want in (("o", o, local(o_ref)), ("final", final, final_ref),
                                ("summed d initial_state", sum(grads), ref.grad),
                                *([("d initial_state on this rank", h0.grad, ref.grad * holder)]
                                  if provider != "ulysses" else [])):
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                failures.append(f"{case} {name}: max error {(got - want).abs().max():.3g}")
    # compiled over a group, the check runs in the custom op: the same error there
    q, k, v, _, _, state, _, _ = _inputs(world, "linear", False)
    compiled = torch.compile(lambda q, k, v, h: lasp2.linear_attention(q, k, v, group=group, initial_state=h),
                             fullgraph=True, backend="eager")
    try:
        compiled(*(x[:, rank * T_LOCAL:(rank + 1) * T_LOCAL] for x in (q, k, v)), state + rank)
        failures.append("compiled linear_attention: different copies ran")
    except ValueError as e:
        if "`initial_state`" not in str(e):
            failures.append(f"compiled linear_attention: {e}")
    # a module folds the values into its one check (check_call_early)
    torch.manual_seed(0)
    gdn = lasp2.nn.GatedDeltaNet(8, 2, conv_size=3, group=group)
    try:
        gdn(torch.randn(1, T_LOCAL, 8), initial_state=torch.zeros(1, 2, 4, 4) + rank, output_final_state=True)
        failures.append("GatedDeltaNet: different copies ran")
    except ValueError as e:
        if "`initial_state`" not in str(e):
            failures.append(f"GatedDeltaNet: {e}")
    return failures


def test_ranks_pass_the_same_initial_state_or_all_raise():
    for rank, failures in enumerate(assert_all_ok(run_world(2, _body, timeout=180, pg_timeout=30))):
        assert not failures, f"rank {rank}: " + "\n".join(failures)
