"""The bad inputs refused since session 11 (NaN gates on CPU, an empty batch, a
cu_seqlens whose values cannot be read, fla's L2-norm flag disagreeing with lasp2's)
on ONE rank of a group: that rank raises the ValueError naming its argument, its peer
raises too instead of waiting in a collective, and the group stays usable."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world, value_error_text


def _inputs(B=1, T=8, H=2, D=4):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64) for _ in range(3))
    g = -torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    beta = torch.rand(B, T, H, generator=gen, dtype=torch.float64)
    return q, k, v, g, beta


def _scenarios(rank, world):
    W = dist.group.WORLD
    bad = rank == 0
    q, k, v, g, beta = _inputs()
    nan_g = g.clone()
    nan_g[0, 3, 1] = float("nan")
    empty = _inputs(B=0)
    cu_meta = torch.tensor([0, 5, 16], device="meta")
    calls = {
        "g nan": lambda: lasp2.linear_attention(q, k, v, g=nan_g if bad else g, group=W),
        "empty batch": lambda: lasp2.linear_attention(*(empty if bad else (q, k, v))[:3], group=W),
        "cu_seqlens on meta": lambda: lasp2.linear_attention(
            q, k, v, group=W, cu_seqlens=cu_meta if bad else torch.tensor([0, 5, 16])),
        "delta empty batch": lambda: lasp2.gated_delta_rule(*(empty if bad else (q, k, v, g, beta)), group=W),
        "l2norm flags disagree": lambda: lasp2.kda(
            q, k, v, g[..., None].expand(1, 8, 2, 4), beta, group=W, use_qk_l2norm=True,
            use_qk_l2norm_in_kernel=not bad),
    }
    seen = {}
    for name, fn in calls.items():
        seen[name] = value_error_text(fn)
        lasp2.linear_attention(q, k, v, g=g, group=W)  # still usable, and in step
    return seen


def test_one_ranks_bad_input_raises_on_every_rank():
    seen = assert_all_ok(run_world(2, _scenarios, timeout=240))
    named = {"g nan": "`g` contains NaN", "empty batch": "`q` has an empty batch dimension",
             "cu_seqlens on meta": "`cu_seqlens` is on meta", "delta empty batch": "`q` has an empty batch dimension",
             "l2norm flags disagree": "disagree"}
    for name, match in named.items():
        assert match in seen[0][name], (name, seen[0][name])  # the bad rank names its argument
        assert "rejected their arguments" in seen[1][name], (name, seen[1][name])  # its peer raises, not hangs
