"""LASP-2 (and LASP-1 with sequence states) over NCCL on 2+ GPUs equals one GPU
(marker: multigpu; needs >= 2 GPUs).

Both communicators are checked: the torch ProcessGroup (ProcessGroupNCCL) and the
native NcclCommunicator (LASP2_COMMUNICATOR=nccl).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.dist import run_distributed

pytestmark = pytest.mark.multigpu


def _rank(rank, world, kind, split):
    os.environ["LASP2_COMMUNICATOR"] = kind  # read when the group's communicator is made
    gen = torch.Generator(device="cuda").manual_seed(0)
    B, T, H, D = 2, 1024 * world, 4, 128
    q, k, v, do = (torch.randn(B, T, H, D, device="cuda", generator=gen, dtype=torch.bfloat16) for _ in range(4))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 8
    full = [x.clone().requires_grad_() for x in (q, k, v, g)]
    o_full = lasp2.linear_attention(*full[:3], g=full[3])
    grads_full = torch.autograd.grad(o_full, full, do)
    group = dist.new_group(list(range(world)))
    split_fn = lambda x: lasp2.split_sequence(x, group, split=split)
    local = [split_fn(x).detach().requires_grad_() for x in (q, k, v, g)]
    o = lasp2.linear_attention(*local[:3], g=local[3], group=group, split=split)
    grads = torch.autograd.grad(o, local, split_fn(do))
    err = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
    errors = [err(o, split_fn(o_full))] + [err(a, split_fn(b)) for a, b in zip(grads[:3], grads_full[:3])]
    assert max(errors) < 2e-2, (rank, errors)


@pytest.mark.parametrize("kind", ["torch", "nccl"])
@pytest.mark.parametrize("split", ["contiguous", "balanced"])
def test_multi_gpu_equals_single_gpu(kind, split):
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs at least 2 GPUs")
    run_distributed(world, _rank, kind, split, timeout=300, backend="nccl")


def _lasp1_states_rank(rank, world, split):
    """LASP-1 with sequence states over NCCL (P2P ring + the final states' AllGather):
    linear attention and the gated delta rule equal one GPU, final states on every rank,
    the ranks' initial-state gradient shares summing to one GPU's."""
    gen = torch.Generator(device="cuda").manual_seed(1)
    B, T, H, D = 2, 256 * world, 2, 64
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)  # noqa: E731
    q, k, v, do = rnd(B, T, H, D), rnd(B, T, H, D) / 8, rnd(B, T, H, D), rnd(B, T, H, D)
    g = F.logsigmoid(rnd(B, T, H)) / 8
    beta = torch.sigmoid(rnd(B, T, H))
    h0, dF = rnd(B, H, D, D) / 4, rnd(B, H, D, D)
    group = dist.new_group(list(range(world)))
    split_fn = lambda x: lasp2.split_sequence(x, group, split=split)  # noqa: E731
    err = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()  # noqa: E731
    ops = {
        "linear_attention": lambda q, k, v, g, beta, h0, **kw: lasp2.linear_attention(
            q, k, v, g=g, initial_state=h0, output_final_state=True, **kw),
        "gated_delta_rule": lambda q, k, v, g, beta, h0, **kw: lasp2.gated_delta_rule(
            q, k, v, g, beta, initial_state=h0, output_final_state=True, **kw),
    }
    for name, op in ops.items():
        full = [x.clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
        o_full, f_full = op(*full)
        want = torch.autograd.grad((o_full * do).sum() + (f_full * dF).sum(), full, allow_unused=True)
        local = [split_fn(x).detach().requires_grad_() for x in (q, k, v, g, beta)] + [h0.clone().requires_grad_()]
        o, final = op(*local, group=group, split=split, provider="lasp1")
        loss = (o * split_fn(do)).sum() + (final * dF).sum() / world  # the ranks' losses sum to one GPU's
        got = torch.autograd.grad(loss, local, allow_unused=True)
        d_h0 = got[5].clone()
        dist.all_reduce(d_h0, group=group)
        errors = [err(o, split_fn(o_full)), err(final, f_full), err(d_h0, want[5])]
        errors += [err(a, split_fn(b)) for a, b in zip(got[:4], want[:4])]
        assert max(errors) < 5e-3, (name, split, rank, errors)


@pytest.mark.parametrize("split", ["contiguous", "balanced"])
def test_lasp1_with_states_equals_single_gpu(split):
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs at least 2 GPUs")
    run_distributed(world, _lasp1_states_rank, split, timeout=300, backend="nccl")
