"""`ranks_checked` is no flag a rank can set alone (session 22's red-team, item 1).

The delta-rule ops and the short convolution used to take `ranks_checked=True` on
trust: the op then skipped its cross-rank check (one all-gather). A rank passing it
while its peers did not went straight to the schedule's collectives while they
all-gathered the check's row: over gloo the mismatched all-gathers aborted the process
or, where the sizes met, mixed check rows into state summaries. Now only the proof a
successful check returns (lasp2.nn.delta_checks.RanksChecked, for the group it ran on)
lets a call skip its check; `True` is checked like `False`, so such ranks all check and
get the one-process answer."""

import torch
import torch.distributed as dist

import lasp2
from lasp2.nn.short_conv import causal_conv_sp
from rel_helpers import assert_all_ok, run_world

T, H, D, C, W = 8, 2, 4, 6, 3


# float64 inputs, but the delta rule carries its states in float32 (docs/delta_rule.md): 1e-6
def _inputs(world):
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, T * world, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(1, T * world, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(1, T * world, H, generator=gen, dtype=torch.float64)
    x = torch.randn(1, T * world, C, generator=gen, dtype=torch.float64)
    weight = torch.randn(C, W, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta, x, weight


def _one_rank_claims_checked(rank, world):
    group = dist.group.WORLD
    q, k, v, g, beta, x, weight = _inputs(world)
    mine = slice(rank * T, (rank + 1) * T)
    claim = rank == 0  # the others leave the flag at its default
    out = {}
    for op, gate in ((lasp2.gated_delta_rule, g), (lasp2.kda, g[..., None].expand(-1, -1, -1, D).contiguous())):
        for provider in ("lasp2", "lasp1", "ulysses"):
            o = op(q[:, mine], k[:, mine], v[:, mine], gate[:, mine], beta[:, mine], group=group,
                   provider=provider, ranks_checked=claim)[0]
            out[f"{op.__name__} {provider}"] = o
    out["causal_conv_sp"] = causal_conv_sp(x[:, mine], weight, None, group, "contiguous", None, claim)
    # a proof from a check on another group does not let a call skip this group's check
    from lasp2.nn.delta_checks import RanksChecked

    other = dist.new_group([0, 1])  # every rank makes it (new_group is collective)
    proof = RanksChecked(other, None, "lasp2.gated_delta_rule") if rank == 0 else False
    out["proof for another group"] = lasp2.gated_delta_rule(q[:, mine], k[:, mine], v[:, mine], g[:, mine],
                                                             beta[:, mine], group=group, ranks_checked=proof)[0]
    result = {name: t.tolist() for name, t in out.items()}
    # a `ranks_checked` of another type on one rank: every rank raises (it raised alone)
    try:
        causal_conv_sp(x[:, mine], weight, None, group, "contiguous", None, None if rank == 0 else False)
        result["bad type"] = "ran"
    except ValueError as e:
        result["bad type"] = str(e)
    return result


def test_a_rank_claiming_ranks_checked_alone_neither_hangs_nor_answers_wrongly():
    world = 2
    results = assert_all_ok(run_world(world, _one_rank_claims_checked, timeout=120, pg_timeout=20))
    q, k, v, g, beta, x, weight = _inputs(world)
    expected = {}
    for op, gate in ((lasp2.gated_delta_rule, g), (lasp2.kda, g[..., None].expand(-1, -1, -1, D).contiguous())):
        o = op(q, k, v, gate, beta)[0]
        for provider in ("lasp2", "lasp1", "ulysses"):
            expected[f"{op.__name__} {provider}"] = o
    expected["causal_conv_sp"] = causal_conv_sp(x, weight)
    expected["proof for another group"] = expected["gated_delta_rule lasp2"]
    for rank, got in enumerate(results):
        assert "`ranks_checked`" in got["bad type"] or "rejected their arguments" in got["bad type"], got["bad type"]
        mine = slice(rank * T, (rank + 1) * T)
        for name, want in expected.items():
            torch.testing.assert_close(torch.tensor(got[name], dtype=torch.float64), want[:, mine],
                                       rtol=1e-6, atol=1e-6, msg=lambda m, rank=rank, name=name: f"rank {rank}: {name}: {m}")
