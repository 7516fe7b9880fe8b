"""The nn modules and lasp2.gather_sequence over a group when ONE rank's arguments are
bad or the ranks disagree (session 18's audit): every rank raises a ValueError at that
call, none waits, and the group stays in step for the next call.

Before: a module's own checks (`x`, `cu_seqlens`) ran before the op's cross-rank check
without telling the peers, so they waited in that check's all-gather (until the group's
timeout), or took the failing rank's next call as this one and raised a wrong error
("calling different lasp2 ops"). GatedDeltaNet's short convolutions all-gather their
halo before the delta rule's check: a batch or dtype that differed per rank aborted the
process inside gloo (a size mismatch, SIGABRT), a bad `x` or `cu_seqlens` on one rank
did the same to the next collective; a layout differing per rank (bthd / tbhd) with
square inputs gave each rank a wrong answer without an error. gated_delta_rule with both `sp_context` and `group`
on one rank raised there alone (its peers hung in the op's check). gather_sequence
all-gathered whatever each rank passed: a local length or dtype differing per rank
aborted a process inside gloo (and handed the other a sequence with garbage rows), a
split or `dim` differing per rank reassembled a wrong sequence without an error."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world, value_error_text

HIDDEN, HEADS, T = 16, 2, 8


def _scenarios(rank, world):
    W = dist.group.WORLD
    bad = rank == 0
    torch.manual_seed(0)  # the same weights on every rank
    x = torch.randn(1, T, HIDDEN)
    cu = torch.tensor([0, 9, 7, T * world] if bad else [0, 7, T * world])  # rank 0's is not non-decreasing
    gdn = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=3, group=W)
    gdn_wide = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=4 if bad else 3, group=W)
    gdn_balanced = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=2, group=W, split="balanced")
    gdn_tbhd = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=3, group=W, layout="tbhd" if bad else "bthd")
    gdn_lasp1 = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=3, group=W, provider="lasp1" if bad else "lasp2")
    state = torch.zeros(1, HEADS, HIDDEN // HEADS, HIDDEN // HEADS)
    modules = {"LinearAttention": lasp2.nn.LinearAttention(HIDDEN, HEADS, decay="gate", group=W),
               "SoftmaxAttention": lasp2.nn.SoftmaxAttention(HIDDEN, HEADS, group=W),
               "HybridBlock": lasp2.nn.HybridBlock(HIDDEN, HEADS, group=W),
               "HybridStack": lasp2.nn.HybridStack(HIDDEN, HEADS, pattern="LS", group=W),
               # its delta-rule layers take the stack's SP context (session 19)
               "KDA HybridStack": lasp2.nn.HybridStack(HIDDEN, HEADS, pattern="KG", group=W,
                                                       kda_kwargs={"conv_size": 3}, gdn_kwargs={"conv_size": 3}),
               "GatedDeltaNet": gdn}
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, T, HEADS, 4, generator=gen) for _ in range(3))
    g, beta = -torch.rand(1, T, HEADS, generator=gen), torch.rand(1, T, HEADS, generator=gen)
    ctx = lasp2.build_sp_context(W, seqlen=T * world)
    calls = {f"{name} x dtype": (lambda m=m: m(x.double() if bad else x)) for name, m in modules.items()}
    calls.update({f"{name} cu_seqlens": (lambda m=m: m(x, cu_seqlens=cu))
                  for name, m in modules.items() if name not in ("LinearAttention", "HybridBlock")})
    calls.update({
        "GatedDeltaNet batch": lambda: gdn(torch.cat([x, x]) if bad else x),
        "GatedDeltaNet kernel size": lambda: gdn_wide(x),
        "GatedDeltaNet odd balanced length": lambda: gdn_balanced(x[:, :7]),
        # a square [T, T] input: every size agrees, only the layout tells the ranks apart
        "GatedDeltaNet layout": lambda: gdn_tbhd(x.expand(T, T, HIDDEN)),
        "gated_delta_rule sp_context and group": lambda: lasp2.gated_delta_rule(
            q, k, v, g, beta, sp_context=ctx, group=W if bad else None),
        "HybridStack sp_context": lambda: modules["HybridStack"](x, sp_context="ctx" if bad else ctx),
        "GatedDeltaNet sp_context": lambda: gdn(x, sp_context="ctx" if bad else ctx),
        # what the delta rule's own check covered before it was folded into the module's one
        "GatedDeltaNet provider": lambda: gdn_lasp1(x),
        "GatedDeltaNet output_final_state": lambda: gdn(x, output_final_state=bad),
        "GatedDeltaNet initial_state": lambda: gdn(x, initial_state=state if bad else None),
        "GatedDeltaNet NaN gates": lambda: gdn(x * float("nan") if bad else x),
        "gather_sequence length": lambda: lasp2.gather_sequence(x[:, :6] if bad else x, W),
        "gather_sequence dtype": lambda: lasp2.gather_sequence(x.double() if bad else x, W),
        "gather_sequence split": lambda: lasp2.gather_sequence(x, W, split="balanced" if bad else "contiguous"),
        "gather_sequence dim": lambda: lasp2.gather_sequence(x, W, dim=1 if bad else 2),
        "gather_sequence bad split": lambda: lasp2.gather_sequence(x, W, split="halves" if bad else "contiguous"),
    })
    seen = {}
    for name, fn in calls.items():
        seen[name] = value_error_text(fn)
        gdn(x)  # the group is still in step: a module (halo + delta rule) and an op
        lasp2.linear_attention(q, k, v, g=g, group=W)
    return seen


def test_one_ranks_bad_input_raises_on_every_rank():
    seen = assert_all_ok(run_world(2, _scenarios, timeout=240, pg_timeout=30))
    own = {"x dtype": "`x` has dtype torch.float64", "cu_seqlens": "`cu_seqlens` must be non-decreasing",
           "GatedDeltaNet batch": "disagree on batch size: [2, 1]",
           "GatedDeltaNet kernel size": "disagree on kernel size: [4, 3]",
           "GatedDeltaNet layout": "disagree on layout (bthd/tbhd): [1, 0]",
           "GatedDeltaNet provider": "disagree on provider (lasp2/lasp1/ulysses): [1, 0]",
           "GatedDeltaNet output_final_state": "disagree on output_final_state: [1, 0]",
           # the module folds "use of initial_state" into the digest of its values (session 23)
           "GatedDeltaNet initial_state": "disagree on `initial_state` values",
           "GatedDeltaNet NaN gates": "`g` contains NaN",
           "GatedDeltaNet odd balanced length": "the balanced split needs an even local sequence length, `x`",
           "gated_delta_rule sp_context and group": "pass either `sp_context` or `group`",
           "sp_context": "`sp_context` must be an SPContext",
           "gather_sequence length": "disagree on local sequence length: [6, 8]",
           "gather_sequence dtype": "disagree on `x` dtype", "gather_sequence split": "disagree on split: [2, 1]",
           "gather_sequence dim": "disagree on `dim`: [1, 2]", "gather_sequence bad split": "split must be one of"}
    # the errors every rank raises alike (a disagreement, or the same bad argument on every rank)
    peer = {key: own[key] for key in own if "disagree" in own[key] or key.endswith("odd balanced length")}
    for name in seen[0]:
        key = next(k for k in own if name.endswith(k))
        assert own[key] in seen[0][name], (name, seen[0][name])  # the bad rank names its argument
        # its peer raises at the same call (not a later one's error, not a hang)
        assert peer.get(key, "rejected their arguments") in seen[1][name], (name, seen[1][name])


def _checks_per_call(rank, world):
    """Cross-rank checks (exchanges of lasp2.ops._group_consistency, its STATS counter) of one
    forward and backward of the delta-rule modules over the group."""
    from lasp2.ops import _group_consistency as GC

    W = dist.group.WORLD
    torch.manual_seed(0)
    x = torch.randn(1, T, HIDDEN, requires_grad=True)
    cu = torch.tensor([0, 5, T + 3, T * world])
    ctx = lasp2.build_sp_context(W, seqlen=T * world, cu_seqlens=cu)
    calls = {
        "GatedDeltaNet": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, group=W)(x),
        "KDA balanced": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, per_key_gate=True, group=W, split="balanced")(x),
        "GatedDeltaNet cu_seqlens": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, group=W)(x, cu_seqlens=cu),
        "GatedDeltaNet sp_context": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS)(x, sp_context=ctx),
        "GatedDeltaNet lasp1": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, group=W, provider="lasp1")(x),
        "GatedDeltaNet ulysses": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, group=W, provider="ulysses")(x),
        "GatedDeltaNet final state": lambda: lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, group=W)(
            x, initial_state=torch.zeros(1, HEADS, 8, 8), output_final_state=True)[0],
    }
    counts = {}
    for name, call in calls.items():
        before = GC.STATS["sync"]
        call().sum().backward()
        counts[name] = GC.STATS["sync"] - before
    return counts


def test_a_delta_rule_module_checks_the_ranks_once_per_call():
    """One cross-rank check (one collective) a call covers the convolutions' halo and the
    delta rule (the op is called with ranks_checked=True); there were two. The scenarios
    above show that what either covered still raises on every rank."""
    counts = assert_all_ok(run_world(2, _checks_per_call, timeout=240, pg_timeout=30))
    for rank in (0, 1):
        assert counts[rank] and set(counts[rank].values()) == {1}, counts[rank]
