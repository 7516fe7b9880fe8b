"""A `cu_seqlens` edited in place between forward and backward (session 22's red-team,
item 3): the backward uses the documents the forward used.

The ops passed the caller's tensor into their autograd node, whose backward planned the
documents from it again. An edit through memory autograd does not watch (a numpy view of
the tensor, a buffer a data loader refills) bumps no version counter, so the backward ran
over other documents than the output and returned wrong gradients without a word. Each op
now hands its node a private copy (a context built by build_sp_context holds one already)."""

import torch
import torch.distributed as dist

import lasp2
from rel_helpers import assert_all_ok, run_world

T, H, D = 24, 2, 4


def _grads(call, edit: bool, world: int = 1, rank: int = 0):
    """Gradients of q, k, v with cu_seqlens [0, 7, 15, T * world]; edit: its second entry
    is rewritten through a numpy view after the forward."""
    cu = torch.tensor([0, 7, 15, T * world])
    gen = torch.Generator().manual_seed(5)
    full = [torch.randn(1, T * world, H, D, generator=gen, dtype=torch.float64) for _ in range(3)]
    leaves = [x[:, rank * T:(rank + 1) * T].clone().requires_grad_() for x in full]
    out = call(leaves, cu)
    if edit:
        cu.numpy()[1] = 11  # numpy shares the memory; the tensor's version counter stays
    out.pow(2).sum().backward()
    return [x.grad for x in leaves]


def _gates(world):
    gen = torch.Generator().manual_seed(9)
    return (-torch.rand(1, T * world, H, generator=gen, dtype=torch.float64),
            torch.rand(1, T * world, H, generator=gen, dtype=torch.float64))


def _delta(leaves, cu, group=None, provider="lasp2"):
    world = 1 if group is None else dist.get_world_size(group)
    rank = 0 if group is None else dist.get_rank(group)
    g, beta = (x[:, rank * T:(rank + 1) * T] for x in _gates(world))
    return lasp2.gated_delta_rule(*leaves, g, beta, cu_seqlens=cu, group=group, provider=provider)[0]


def _module(leaves, cu):
    torch.manual_seed(0)
    gdn = lasp2.nn.GatedDeltaNet(H * D, H, conv_size=3, dtype=torch.float64)
    return gdn(leaves[0].reshape(1, T, H * D), cu_seqlens=cu) * leaves[1].sum() * leaves[2].sum()


ONE_DEVICE = {
    "gated_delta_rule": _delta,
    "linear_attention": lambda leaves, cu: lasp2.linear_attention(*leaves, cu_seqlens=cu),
    "softmax_attention": lambda leaves, cu: lasp2.softmax_attention(*leaves, cu_seqlens=cu),
    "GatedDeltaNet": _module,
}


def test_one_device_backward_uses_the_forwards_documents():
    for name, call in ONE_DEVICE.items():
        for got, want in zip(_grads(call, True), _grads(call, False)):
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=lambda m, name=name: f"{name}: {m}")


def _group_body(rank, world):
    errors = []
    for provider in ("lasp2", "ulysses"):
        def call(leaves, cu):
            return _delta(leaves, cu, dist.group.WORLD, provider)
        for got, want in zip(_grads(call, True, world, rank), _grads(call, False, world, rank)):
            if not torch.equal(got, want):
                errors.append(f"{provider}: max error {(got - want).abs().max():.3g}")
    return errors


def test_over_a_group_backward_uses_the_forwards_documents():
    for rank, errors in enumerate(assert_all_ok(run_world(2, _group_body, timeout=90, pg_timeout=20))):
        assert not errors, f"rank {rank}: {errors}"
