"""lasp2.build_sp_context: the part layout, positions and document starts it caches,
its errors, and that ops given a context equal ops given the per-call arguments."""

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2.distributed import SPContext
from lasp2_testing.dist import run_distributed


def context(rank, world, split, seqlen, cu=None):
    """A context for `rank` of `world` without processes (the fields a group would give)."""
    cu = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    return SPContext(None, rank, world, split, seqlen, cu, torch.device("cpu"))


def expected_positions(seqlen, world, split, cu):
    """Per rank: (global index, position within its document, starts a document) of each
    local token, from the split's definition (parts of seqlen / parts_count tokens)."""
    parts_count = world * (2 if split == "balanced" and world > 1 else 1)
    part = seqlen // parts_count
    owner_parts = [[r] if parts_count == world else [r, parts_count - 1 - r] for r in range(world)]
    starts = set(cu[1:-1]) if cu else set()
    out = []
    for r in range(world):
        index = [p * part + i for p in owner_parts[r] for i in range(part)]
        doc_begin = [max([c for c in (cu or [0]) if c <= t]) for t in index]
        out.append((index, [t - b for t, b in zip(index, doc_begin)], [int(t in starts and t > 0) for t in index]))
    return out


@pytest.mark.parametrize("split", ["contiguous", "balanced"])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("cu", [None, [0, 5, 6, 17, 24], [0, 8, 8, 24]])  # a 1-token and an empty document
def test_positions_and_document_starts(split, world, cu):
    seqlen = 24
    for rank, (index, positions, starts) in enumerate(expected_positions(seqlen, world, split, cu)):
        ctx = context(rank, world, split, seqlen, cu)
        assert ctx.global_index.tolist() == index
        assert ctx.positions.tolist() == positions
        if cu is None:
            assert ctx.doc_start is None and ctx.global_doc_start is None
        else:
            assert ctx.doc_start.tolist() == starts
            assert ctx.global_doc_start.tolist() == [int(t in cu[1:-1] and t > 0) for t in range(seqlen)]
        # the parts: (local start, length, global start), in local order, covering the index
        assert [g + i for _, length, g in ctx.parts for i in range(length)] == index
        local_len = seqlen // world
        halves = split == "balanced" and world > 1
        assert [p[:2] for p in ctx.parts] == ([(0, local_len // 2), (local_len // 2, local_len // 2)] if halves
                                              else [(0, local_len)])
        assert torch.equal(ctx.global_index,
                           lasp2.global_token_index(seqlen // world, rank, world, ctx.effective_split))


def test_build_defaults_and_errors():
    ctx = lasp2.build_sp_context(cu_seqlens=torch.tensor([0, 3, 10], dtype=torch.int32))
    assert (ctx.rank, ctx.world_size, ctx.seqlen, ctx.local_len, ctx.parts_per_rank) == (0, 1, 10, 10, 1)
    assert ctx.cu_seqlens.dtype == torch.int64 and ctx.comm() is None
    # one device: both splits are the plain order
    assert lasp2.build_sp_context(split="balanced", seqlen=7).effective_split == "contiguous"
    with pytest.raises(ValueError, match="lasp2.build_sp_context: `split` must be one of"):
        lasp2.build_sp_context(split="zigzag", seqlen=8)
    with pytest.raises(ValueError, match="pass `seqlen`"):
        lasp2.build_sp_context()
    with pytest.raises(ValueError, match="`seqlen` must be a positive int"):
        lasp2.build_sp_context(seqlen=0)
    with pytest.raises(ValueError, match="must end at the global sequence length 9"):
        lasp2.build_sp_context(cu_seqlens=torch.tensor([0, 8]), seqlen=9)
    with pytest.raises(ValueError, match="`group` must be a torch.distributed ProcessGroup"):
        lasp2.build_sp_context("world", seqlen=8)


def test_ops_check_the_context_against_their_inputs():
    q = torch.randn(1, 8, 2, 4)
    ctx = lasp2.build_sp_context(cu_seqlens=torch.tensor([0, 3, 8]))
    for op in (lasp2.linear_attention, lasp2.softmax_attention):
        torch.testing.assert_close(op(q, q, q, sp_context=ctx), op(q, q, q, cu_seqlens=torch.tensor([0, 3, 8])),
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match="`q` has 6 tokens a rank but `sp_context` was built for 8"):
            op(q[:, :6], q[:, :6], q[:, :6], sp_context=ctx)
        with pytest.raises(ValueError, match="`cu_seqlens` differs from the cu_seqlens of `sp_context`"):
            op(q, q, q, sp_context=ctx, cu_seqlens=torch.tensor([0, 4, 8]))
        with pytest.raises(ValueError, match="batch size 1"):
            op(q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), q.expand(2, -1, -1, -1), sp_context=ctx)
        with pytest.raises(ValueError, match="`sp_context` must be an SPContext"):
            op(q, q, q, sp_context="ctx")
        # beside a context, cu_seqlens' form is checked as without one (a list raised
        # AttributeError, which a group's other ranks were never told of; floats passed)
        with pytest.raises(ValueError, match="`cu_seqlens` must be a torch.Tensor, got list"):
            op(q, q, q, sp_context=ctx, cu_seqlens=[0, 3, 8])
        with pytest.raises(ValueError, match="`cu_seqlens` must be int32 or int64, got torch.float32"):
            op(q, q, q, sp_context=ctx, cu_seqlens=torch.tensor([0.0, 3.0, 8.0]))


def test_the_delta_rule_checks_the_context_against_its_inputs():
    """gated_delta_rule / kda replaced an explicit `split` by the context's (inputs split
    "balanced" over a group ran as "contiguous", silently) and never compared the context's
    length with q's: now the checks of linear_attention's (session 22)."""
    q = torch.randn(1, 8, 2, 4)
    g, beta = -torch.rand(1, 8, 2), torch.rand(1, 8, 2)
    ctx = lasp2.build_sp_context(seqlen=8)
    for op, gate in ((lasp2.gated_delta_rule, g), (lasp2.kda, g[..., None].expand(1, 8, 2, 4))):
        torch.testing.assert_close(op(q, q, q, gate, beta, sp_context=ctx)[0], op(q, q, q, gate, beta)[0],
                                   rtol=0, atol=0)
        with pytest.raises(ValueError, match="`split` 'balanced' differs from the split of `sp_context` 'contiguous'"):
            op(q, q, q, gate, beta, sp_context=ctx, split="balanced")
        with pytest.raises(ValueError, match="`q` has 6 tokens a rank but `sp_context` was built for 8"):
            op(q[:, :6], q[:, :6], q[:, :6], gate[:, :6], beta[:, :6], sp_context=ctx)


def test_hybrid_stack_checks_cu_seqlens_against_its_context():
    """HybridStack given both used the context's documents and silently ignored
    cu_seqlens (its layers see only the context); now they must agree, as in the mixers."""
    torch.manual_seed(0)
    stack = lasp2.nn.HybridStack(16, 2, pattern="LS")
    x = torch.randn(1, 8, 16)
    ctx = lasp2.build_sp_context(cu_seqlens=torch.tensor([0, 3, 8]))
    torch.testing.assert_close(stack(x, sp_context=ctx, cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32)),
                               stack(x, cu_seqlens=torch.tensor([0, 3, 8])), rtol=0, atol=0)
    with pytest.raises(ValueError, match="HybridStack: `cu_seqlens` differs from the cu_seqlens of `sp_context`"):
        stack(x, sp_context=ctx, cu_seqlens=torch.tensor([0, 4, 8]))


def context_rank(rank, world):
    group = dist.new_group(list(range(world)))
    gen = torch.Generator().manual_seed(11)
    T = 8 * world
    q, k, v = (torch.randn(1, T, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    g = torch.nn.functional.logsigmoid(torch.randn(1, T, 2, generator=gen, dtype=torch.float64))
    for split in ("contiguous", "balanced"):
        for cu in (None, torch.tensor([0, 3, 8, 9, T - 2, T])):
            local = lambda x: lasp2.split_sequence(x, group, split=split)
            ctx = lasp2.build_sp_context(group, split, cu, seqlen=T)
            assert (ctx.rank, ctx.world_size, ctx.group) == (rank, world, group)
            assert torch.equal(ctx.global_index, local(torch.arange(T).view(1, T))[0])
            per_call = dict(group=group, split=split, cu_seqlens=cu)
            for provider in ("lasp2", "lasp1", "ulysses") if split == "contiguous" else ("lasp2",):
                a = lasp2.linear_attention(local(q), local(k), local(v), g=local(g), provider=provider, sp_context=ctx)
                b = lasp2.linear_attention(local(q), local(k), local(v), g=local(g), provider=provider, **per_call)
                torch.testing.assert_close(a, b, rtol=0, atol=0)
            a = lasp2.softmax_attention(local(q), local(k), local(v), sp_context=ctx)
            torch.testing.assert_close(a, lasp2.softmax_attention(local(q), local(k), local(v), **per_call),
                                       rtol=0, atol=0)
    other = lasp2.build_sp_context(group, seqlen=T)  # contiguous
    with pytest.raises(ValueError, match="`split` 'balanced' differs from the split of `sp_context` 'contiguous'"):
        lasp2.softmax_attention(q[:, :8], k[:, :8], v[:, :8], split="balanced", sp_context=other)
    with pytest.raises(ValueError, match="`group` differs from the group of `sp_context`"):
        lasp2.linear_attention(q[:, :8], k[:, :8], v[:, :8], group=dist.group.WORLD, sp_context=other)


def test_contexts_equal_per_call_arguments():
    run_distributed(2, context_rank)
