"""LASP-2 over NCCL on 2+ GPUs equals one GPU (marker: multigpu; needs >= 2 GPUs).

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
