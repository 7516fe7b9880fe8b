"""lasp2.linear_attention (provider "lasp2") under torch.compile(fullgraph=True) over a
gloo group of 2: the cross-rank consistency check runs inside the custom op, so the
call compiles without a graph break; its output and every gradient equal the eager
call's bit for bit (rows and packed documents of an SPContext), and ranks that disagree
(scale, cu_seqlens, decay values; bad gates on one rank) raise the eager call's
ValueError on every rank. Providers "lasp1" and "ulysses" and softmax_attention
(LASP-2H): tests/python/distributed/test_compile_group_providers.py."""

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import expect_value_error
from lasp2_testing.dist import run_distributed


def _inputs(rank, world, gated):
    gen = torch.Generator().manual_seed(7)
    T, H, K, V = 8 * world, 2, 4, 3
    q, k, v, do = (torch.randn(2, T, H, d, generator=gen, dtype=torch.float64) for d in (K, K, V, V))
    g = F.logsigmoid(torch.randn(2, T, H, generator=gen, dtype=torch.float64) + 2) if gated else None
    local = lambda x: lasp2.split_sequence(x, dist.group.WORLD, split="balanced", dim=1)  # noqa: E731
    return [local(x) for x in (q, k, v)], (local(g) if gated else None), local(do)




def check_compiled(rank, world):
    group = dist.group.WORLD
    for gated, with_states in ((True, False), (False, True)):
        (q, k, v), g, do = _inputs(rank, world, gated)
        h0 = torch.randn(2, 2, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

        def f(q, k, v, h0):
            if with_states:
                o, final = lasp2.linear_attention(q, k, v, g=g, group=group, split="balanced", initial_state=h0,
                                                  output_final_state=True)
                return (o * do).sum() + final.sum()
            return (lasp2.linear_attention(q, k, v, g=g, group=group, split="balanced") * do).sum() + h0.sum()

        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
        results = []
        for fn in (compiled, f):
            leaves = [x.clone().requires_grad_() for x in (q, k, v, h0)]
            loss = fn(*leaves)
            results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
        for name, a, b in zip(("loss", "dq", "dk", "dv", "dh0"), *results):
            assert torch.equal(a, b), f"compiled {name} differs from eager (gated={gated}, rank {rank})"

    # packed documents from an SPContext built outside the compiled function
    (q, k, v), g, do = _inputs(rank, world, True)
    q, k, v, g, do = (x[:1] for x in (q, k, v, g, do))
    sp = lasp2.build_sp_context(group, "balanced", torch.tensor([0, 5, 6, 11, 8 * world]))
    packed = lambda q, k, v: (lasp2.linear_attention(q, k, v, g=g, sp_context=sp) * do).sum()  # noqa: E731
    results = []
    for fn in (torch.compile(packed, fullgraph=True, backend="aot_eager"), packed):
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        loss = fn(*leaves)
        results.append([loss.detach(), *torch.autograd.grad(loss, leaves)])
    for name, a, b in zip(("loss", "dq", "dk", "dv"), *results):
        assert torch.equal(a, b), f"compiled packed {name} differs from eager (rank {rank})"

    # disagreements: the same ValueError on every rank, raised by the check inside the op
    (q, k, v), g, _ = _inputs(rank, world, True)
    scaled = torch.compile(lambda q, k, v: lasp2.linear_attention(q, k, v, g=g, group=group, scale=0.5 + rank),
                           fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: scaled(q, k, v), "ranks of `group` disagree on `scale`", "scale per rank")
    per_rank = lasp2.build_sp_context(group, "contiguous", torch.tensor([0, 3 + rank, 8 * world]))
    docs = torch.compile(lambda q, k, v: lasp2.linear_attention(q[:1], k[:1], v[:1], sp_context=per_rank),
                         fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: docs(q, k, v), "disagree on `cu_seqlens` contents", "cu_seqlens per rank")
    decay = torch.tensor([-0.1, -0.2 - rank], dtype=torch.float64)  # a device value
    decays = torch.compile(lambda q, k, v: lasp2.linear_attention(q, k, v, decay=decay, group=group),
                           fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: decays(q, k, v), "disagree on `decay` values", "decay per rank")
    bad_g = g.abs() + 0.1 if rank == 0 else g  # rank 0's own bad gates: it names `g`, its peer raises too
    gates = torch.compile(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g, group=group),
                          fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: gates(q, k, v, bad_g), "`g`" if rank == 0 else "rejected their arguments",
                        "positive gates on rank 0")
    # the group still works after the raises (every rank raised at the same point)
    o = gates(q, k, v, g)
    assert torch.equal(o, lasp2.linear_attention(q, k, v, g=g, group=group))


def test_compiled_over_gloo_group():
    run_distributed(2, check_compiled)
