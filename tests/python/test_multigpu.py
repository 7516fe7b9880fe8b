"""LASP-2 over NCCL on 2+ GPUs equals one GPU (marker: multigpu; needs >= 2 GPUs).

Both communicators are checked: the torch ProcessGroup (ProcessGroupNCCL) and the
native NcclCommunicator (LASP2_COMMUNICATOR=nccl).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lasp2
from dist_utils import free_port

pytestmark = pytest.mark.multigpu


def _rank(rank, world, port, kind, split, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LASP2_COMMUNICATOR=kind)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    try:
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
        results.put((rank, errors))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["torch", "nccl"])
@pytest.mark.parametrize("split", ["contiguous", "balanced"])
def test_multi_gpu_equals_single_gpu(kind, split):
    world = torch.cuda.device_count()
    if world < 2:
        pytest.skip("needs at least 2 GPUs")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, kind, split, results)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    assert all(p.exitcode == 0 for p in procs)
    for _ in range(world):
        rank, errors = results.get(timeout=10)
        assert max(errors) < 2e-2, (rank, errors)

