"""torch.compile(fullgraph=True) over a gloo group of 2 for what runs its cross-rank
check inside its custom op since issue 13's second step: linear_attention's providers
"lasp1" (lasp2::lasp1_forward) and "ulysses" (lasp2::ulysses_forward) and
softmax_attention (LASP-2H, lasp2::softmax_forward). Each compiled call equals the
eager call bit for bit, loss and every gradient (rows and an SPContext's packed
documents, gates / decay / sequence states); softmax_attention also compiles without
fullgraph (its graph used to break before a handle registered too late); ranks that
disagree (scale, decay values, cu_seqlens, one rank's bad gates) raise the eager
call's ValueError on every rank; an SPContext with its own collectives names itself
under fullgraph and runs outside the graph otherwise; the three ops pass opcheck over
the group. (Provider "lasp2": test_linear_attention_compile_distributed.py.)"""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import expect_value_error
from lasp2.distributed import Collectives
from lasp2.distributed.collectives import TORCH_COLLECTIVES
from lasp2.ops._delta_library import group_handle
from lasp2.ops._softmax_library import collectives_handle, softmax_forward
from lasp2.ops.providers import lasp1, ulysses
from lasp2_testing.dist import run_distributed

OPCHECKS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def _draw(seed, *shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in shapes]


def _values_and_grads(fn, inputs):
    leaves = [x.clone().requires_grad_() for x in inputs]
    loss = fn(*leaves)
    return [loss.detach(), *torch.autograd.grad(loss, leaves)]


def _assert_compiled_equals_eager(f, inputs, names, what, fullgraph=True):
    got = _values_and_grads(torch.compile(f, fullgraph=fullgraph, backend="aot_eager"), inputs)
    want = _values_and_grads(f, inputs)
    for name, a, b in zip(("loss", *names), got, want):
        assert torch.equal(a, b), f"{what}: the compiled {name} differs from eager"




def check_linear_providers(rank, world):
    group = dist.group.WORLD
    T, H, K, V = 8 * world, 2, 4, 3
    q, k, v, do = _draw(1, (2, T, H, K), (2, T, H, K), (2, T, H, V), (2, T, H, V))
    g = F.logsigmoid(_draw(2, (2, T, H))[0] + 2)
    decay = torch.tensor([-0.1, -0.3], dtype=torch.float64)
    h0, w = _draw(3, (4, H, K, V), (4, H, K, V))  # 4: rows (B = 2) or the documents of cu
    # LASP-1 over rows: a per-head decay with initial / final states (contiguous split)
    lq, lk, lv, ldo = (lasp2.split_sequence(x, group, dim=1) for x in (q, k, v, do))

    def lasp1_states(q, k, v, decay, h0):
        o, final = lasp2.linear_attention(q, k, v, decay=decay, group=group, provider="lasp1", initial_state=h0,
                                          output_final_state=True)
        return (o * ldo).sum() + (final * w[:2]).sum()

    _assert_compiled_equals_eager(lasp1_states, (lq, lk, lv, decay, h0[:2]), ["q", "k", "v", "decay", "h0"],
                                  "lasp1 rows with states")

    # packed documents from an SPContext built outside the compiled function (B = 1):
    # LASP-1 (balanced split, gates, the documents carry their states), Ulysses (decay)
    cu = torch.tensor([0, 5, 6, 11, T])

    def lasp1_packed(q, k, v, g, h0):
        o, final = lasp2.linear_attention(q, k, v, g=g, sp_context=balanced, provider="lasp1", initial_state=h0,
                                          output_final_state=True)
        return (o * bdo).sum() + (final * w).sum()

    def ulysses_packed(q, k, v, decay):
        return (lasp2.linear_attention(q, k, v, decay=decay, sp_context=contiguous, provider="ulysses") * pdo).sum()

    balanced = lasp2.build_sp_context(group, "balanced", cu)
    bq, bk, bv, bdo, bg = (lasp2.split_sequence(x[:1], group, split="balanced", dim=1) for x in (q, k, v, do, g))
    _assert_compiled_equals_eager(lasp1_packed, (bq, bk, bv, bg, h0), ["q", "k", "v", "g", "h0"],
                                  "lasp1 packed documents (balanced)")
    contiguous = lasp2.build_sp_context(group, "contiguous", cu)
    pq, pk, pv, pdo = (lasp2.split_sequence(x[:1], group, dim=1) for x in (q, k, v, do))
    _assert_compiled_equals_eager(ulysses_packed, (pq, pk, pv, decay), ["q", "k", "v", "decay"],
                                  "ulysses packed documents")

    # Ulysses over rows with gates
    lg = lasp2.split_sequence(g, group, dim=1)

    def ulysses_gates(q, k, v, g):
        return (lasp2.linear_attention(q, k, v, g=g, group=group, provider="ulysses") * ldo).sum()

    _assert_compiled_equals_eager(ulysses_gates, (lq, lk, lv, lg), "qkvg", "ulysses gates")

    # opcheck over the group: schema, fake kernels against the real ops (sizes, strides,
    # deterministic outputs), AOT dispatch with the backward ops
    leaves = [x.clone().requires_grad_() for x in (lq, lk, lv, lg)]
    torch.library.opcheck(lasp1.lasp1_forward, (*leaves, None, None, None, 0.5, 64, group_handle(group, lq.device), 1,
                                                [], 2, False), test_utils=OPCHECKS)
    torch.library.opcheck(ulysses.ulysses_forward, (*leaves, None, None, 0.5, 64,
                                                    collectives_handle("test", group, TORCH_COLLECTIVES), rank,
                                                    world), test_utils=OPCHECKS)

    # disagreements: the eager ValueError on every rank, raised by the check inside the op
    scaled = torch.compile(lambda q, k, v: lasp2.linear_attention(q, k, v, group=group, scale=0.5 + rank,
                                                                  provider="lasp1"),
                           fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: scaled(lq, lk, lv), "ranks of `group` disagree on `scale`", "lasp1 scale per rank")
    per_rank = torch.tensor([-0.1, -0.2 - rank], dtype=torch.float64)  # a device value
    decays = torch.compile(lambda q, k, v: lasp2.linear_attention(q, k, v, decay=per_rank, group=group,
                                                                  provider="ulysses"),
                           fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: decays(lq, lk, lv), "disagree on `decay` values", "ulysses decay per rank")
    bad_g = lg.abs() + 0.1 if rank == 0 else lg  # rank 0's own bad gates: it names `g`, its peer raises too
    gates = torch.compile(lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g, group=group, provider="ulysses"),
                          fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: gates(lq, lk, lv, bad_g), "`g`" if rank == 0 else "rejected their arguments",
                        "ulysses: positive gates on rank 0")
    assert torch.equal(gates(lq, lk, lv, lg), lasp2.linear_attention(lq, lk, lv, g=lg, group=group,
                                                                     provider="ulysses"))

    # an SPContext's own collectives cannot be named by a compiled graph: fullgraph says so,
    # and without fullgraph the call runs eagerly through them
    exchanged = []

    def counting(out, inp, group=None):
        exchanged.append(inp.numel())
        return dist.all_to_all_single(out, inp, group=group)

    counted = lasp2.build_sp_context(group, seqlen=T, collectives=Collectives(all_to_all_single=counting))
    own = lambda q, k, v: lasp2.linear_attention(q, k, v, sp_context=counted, provider="ulysses")  # noqa: E731
    with pytest.raises(torch._dynamo.exc.Unsupported, match="with its own `collectives=`"):
        torch.compile(own, fullgraph=True, backend="aot_eager")(lq, lk, lv)
    torch._dynamo.reset()  # (the failed fullgraph attempt and the plain one share the lambda's code)
    assert torch.equal(torch.compile(own, backend="aot_eager")(lq, lk, lv), lasp2.linear_attention(lq, lk, lv,
                                                                                                  group=group,
                                                                                                  provider="ulysses"))
    assert len(exchanged) == 4, exchanged  # q, k, v and o went through the context's all-to-all


def check_softmax(rank, world):
    group = dist.group.WORLD
    T = 8 * world
    q, k, v, do = _draw(4, (2, T, 4, 4), (2, T, 2, 4), (2, T, 2, 3), (2, T, 4, 3))  # GQA: 4 query, 2 kv heads
    lq, lk, lv, ldo = (lasp2.split_sequence(x, group, split="balanced", dim=1) for x in (q, k, v, do))

    def rows(q, k, v):
        return (lasp2.softmax_attention(q, k, v, group=group, split="balanced") * ldo).sum()

    _assert_compiled_equals_eager(rows, (lq, lk, lv), "qkv", "softmax rows (balanced)")
    leaves = [x.clone().requires_grad_() for x in (lq, lk, lv)]
    torch.library.opcheck(softmax_forward, (*leaves, 0.5, "plain", collectives_handle("test", group, TORCH_COLLECTIVES),
                                            rank, world, 2, "balanced", True, None), test_utils=OPCHECKS)
    # without fullgraph too (the compiled call used to fail after its graph break); a
    # fresh cache, or the fullgraph graph of `rows` would be reused
    torch._dynamo.reset()
    _assert_compiled_equals_eager(rows, (lq, lk, lv), "qkv", "softmax rows, not fullgraph", fullgraph=False)

    sp = lasp2.build_sp_context(group, "contiguous", torch.tensor([0, 3, 9, T]))
    pq, pk, pv, pdo = (lasp2.split_sequence(x[:1], group, dim=1).transpose(0, 1) for x in (q, k, v, do))

    def packed(q, k, v):  # tbhd, as Megatron lays it out
        return (lasp2.softmax_attention(q, k, v, sp_context=sp, layout="tbhd") * pdo).sum()

    _assert_compiled_equals_eager(packed, (pq, pk, pv), "qkv", "softmax packed documents (tbhd)")

    scaled = torch.compile(lambda q, k, v: lasp2.softmax_attention(q, k, v, group=group, scale=0.5 + rank),
                           fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: scaled(lq, lk, lv), "ranks of `group` disagree on `scale`", "softmax scale per rank")
    per_rank = lasp2.build_sp_context(group, "contiguous", torch.tensor([0, 3 + rank, T]))
    docs = torch.compile(lambda q, k, v: lasp2.softmax_attention(q, k, v, sp_context=per_rank, layout="tbhd"),
                         fullgraph=True, backend="aot_eager")
    expect_value_error(lambda: docs(pq, pk, pv), "disagree on `cu_seqlens` contents", "softmax cu_seqlens per rank")
    # the group still works after the raises (every rank raised at the same point)
    plain = torch.compile(lambda q, k, v: lasp2.softmax_attention(q, k, v, group=group), fullgraph=True,
                          backend="aot_eager")
    assert torch.equal(plain(lq, lk, lv), lasp2.softmax_attention(lq, lk, lv, group=group))


def check_compiled(rank, world):
    check_linear_providers(rank, world)
    check_softmax(rank, world)


def test_compiled_over_gloo_group():
    run_distributed(2, check_compiled)  # one set of processes: torch.compile's warm-up is paid once
