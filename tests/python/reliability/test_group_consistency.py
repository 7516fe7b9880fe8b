"""Issue 13.3: every call checks that the ranks of the group agree (shapes, options
and small values: scale, cu_seqlens, decay, provider, split; whether a backward is built),
so ranks that disagree ALL raise the same ValueError, on every call (no per-signature
cache), and the process and the group stay usable afterwards."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world


def _qkv(T, H=2, D=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))


def _expect(fn, match):
    try:
        fn()
    except ValueError as e:
        assert match in str(e), f"expected {match!r} in {e}"
        return str(e)
    raise AssertionError(f"no error (expected one about {match})")


def _scenarios(rank, world):
    W = dist.group.WORLD
    la = lambda T, **kw: lasp2.linear_attention(*_qkv(T), group=W, **kw)  # noqa: E731
    sa = lambda T, **kw: lasp2.softmax_attention(*_qkv(T), group=W, **kw)  # noqa: E731
    seen = []
    for op in (la, sa):
        op(8)
        op(4)  # both signatures seen once: the old cache skipped the check from here on
        seen.append(_expect(lambda: op(8 if rank == 0 else 4), "local sequence length"))
        op(8)  # still usable, and in step
        seen.append(_expect(lambda: op(8, scale=0.5 if rank == 0 else 0.25), "`scale`"))
        cu = torch.tensor([0, 3, 16] if rank == 0 else [0, 5, 16])
        seen.append(_expect(lambda: op(8, cu_seqlens=cu), "`cu_seqlens` contents"))
        seen.append(_expect(lambda: op(8, split="balanced" if rank else "contiguous"), "split"))
    decay = torch.tensor([-0.1, -0.2 if rank == 0 else -0.3], dtype=torch.float64)
    seen.append(_expect(lambda: la(8, decay=decay), "`decay`"))
    seen.append(_expect(lambda: la(8, provider="lasp1" if rank else "lasp2"), "provider"))
    # inputs requiring grad on one rank only: its backward's collectives would wait for a
    # peer that built no backward (gloo aborted at the next collective before session 18);
    # which inputs need grad may differ (test_providers_distributed's mixed requires_grad)
    q, k, v = _qkv(8)
    g, beta = -torch.rand(1, 8, 2, dtype=torch.float64), torch.rand(1, 8, 2, dtype=torch.float64)
    qg = q.clone().requires_grad_(rank == 0)
    seen.append(_expect(lambda: lasp2.linear_attention(qg, k, v, g=g, group=W), "building a backward"))
    seen.append(_expect(lambda: lasp2.gated_delta_rule(qg, k, v, g, beta, group=W), "building a backward"))
    # a rank whose own argument check fails still takes part: its peers raise, not hang
    for op in (sa,):
        bad_cu = torch.tensor([0, 9, 7, 16] if rank == 0 else [0, 7, 16])
        seen.append(_expect(lambda: op(8, cu_seqlens=bad_cu), "cu_seqlens" if rank == 0 else "rejected their arguments")
                    and "checked")
    # the gates' dtypes set the size of provider "ulysses"' all-to-all of them: float32 gates
    # on one rank beside float64 ones aborted the process inside gloo (session 22)
    g64 = -torch.rand(1, 8, 2, dtype=torch.float64)
    g_mixed = g64.float() if rank else g64
    seen.append(_expect(lambda: la(8, g=g_mixed, provider="ulysses"), "dtype of `g`"))
    seen.append(_expect(lambda: lasp2.gated_delta_rule(q, k, v, g_mixed, beta, group=W, provider="ulysses"),
                        "dtype of `g`"))
    seen.append(_expect(lambda: lasp2.gated_delta_rule(q, k, v, g, beta.float() if rank else beta, group=W,
                                                       provider="ulysses"), "dtype of `beta`"))
    # a layout differing per rank where B == T_local passes every size check but reads other
    # tokens as the sequence: the delta rule ran silently (linear attention checks `layout`)
    sq = [torch.rand(2, 2, 2, 4, dtype=torch.float64) for _ in range(3)]
    sq_g, sq_beta = -torch.rand(2, 2, 2, dtype=torch.float64), torch.rand(2, 2, 2, dtype=torch.float64)
    seen.append(_expect(lambda: lasp2.gated_delta_rule(*sq, sq_g, sq_beta, group=W, layout="tbhd" if rank else "bthd"),
                        "layout"))
    # two different ops at the same point: a clear error, not a hang or garbage
    seen.append(_expect(lambda: la(8) if rank == 0 else sa(8), "different lasp2 ops"))
    la(8)
    sa(8)
    return seen


def test_disagreement_raises_on_every_rank_every_call():
    seen = assert_all_ok(run_world(2, _scenarios, timeout=240))
    # the same errors on both ranks (the last one names each rank's own op)
    assert seen[0][:-1] == seen[1][:-1], "ranks must raise the same errors"
    assert all("different lasp2 ops" in s[-1] for s in seen)
