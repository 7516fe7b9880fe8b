"""lasp2.nn.GatedDeltaNet and its short convolution: one process against plain
references, and over gloo groups (both splits; packed documents) equal to
one process in output, input gradient and (group-summed) parameter gradients.
P = 2 keeps CI short; the op itself runs at P = 2, 3, 4 in distributed/."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import assert_rel
from lasp2_testing.dist import run_distributed
from lasp2.nn.short_conv import causal_conv_sp


def conv_reference(x, weight, cu_seqlens=None):
    """Depthwise causal conv per document via F.conv1d on each document alone."""
    B, T, C = x.shape
    W = weight.shape[1]
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    pieces = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        seg = F.pad(x[:, a:b].transpose(1, 2), (W - 1, 0))
        pieces.append(F.conv1d(seg, weight[:, None, :], groups=C).transpose(1, 2))
    return torch.cat(pieces, dim=1)


def test_short_conv_matches_conv1d_with_documents():
    x = torch.randn(1, 17, 6, dtype=torch.float64)
    w = torch.randn(6, 4, dtype=torch.float64)
    cu = torch.tensor([0, 2, 3, 9, 17])
    assert_rel(causal_conv_sp(x, w), conv_reference(x, w), 1e-12, "conv, one document")
    assert_rel(causal_conv_sp(x, w, cu_seqlens=cu), conv_reference(x, w, cu), 1e-12, "conv, documents")
    # empty documents (the last one's boundary is the sequence's end: an IndexError before)
    empty = torch.tensor([0, 0, 2, 3, 3, 9, 17, 17])
    assert_rel(causal_conv_sp(x, w, cu_seqlens=empty), conv_reference(x, w, cu), 1e-12, "conv, empty documents")


@pytest.mark.parametrize("per_key_gate", [False, True])
def test_module_runs_and_returns_states(per_key_gate):
    torch.manual_seed(0)
    layer = lasp2.nn.GatedDeltaNet(16, 2, conv_size=3, per_key_gate=per_key_gate).double()
    x = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    y, final = layer(x, output_final_state=True)
    assert y.shape == x.shape and final.shape == (2, 2, 8, 8)
    # the layer is causal: changing the last token changes only the last output
    x2 = x.detach().clone()
    x2[:, -1] += 1.0
    y2 = layer(x2)
    assert (y2[:, :-1] - y.detach()[:, :-1]).abs().max() < 1e-12
    assert (y2[:, -1] - y.detach()[:, -1]).abs().max() > 1e-6
    y.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


# (split, packed documents, per-key gate (KDA), provider)
CONFIGS = [("contiguous", False, False, "lasp2"), ("balanced", True, False, "lasp2"), ("contiguous", True, True, "lasp2"),
           ("balanced", True, True, "lasp1"), ("contiguous", False, False, "ulysses")]


def check_module_rank(rank, world):
    group = dist.new_group(list(range(world)))
    for index, (split, packed, per_key, provider) in enumerate(CONFIGS):
        torch.manual_seed(20 + index)
        T = 8 * world
        layer = lasp2.nn.GatedDeltaNet(12, 2, conv_size=4, per_key_gate=per_key, provider=provider).double()
        x = torch.randn(1 if packed else 2, T, 12, dtype=torch.float64)
        do = torch.randn_like(x)
        cu = torch.tensor([0, 3, 9, T - 2, T]) if packed else None
        xf = x.clone().requires_grad_()
        y_full = layer(xf, cu_seqlens=cu)
        grads_full = torch.autograd.grad((y_full * do).sum(), [xf] + list(layer.parameters()))

        layer.group, layer.split = group, split
        local = lambda t: lasp2.split_sequence(t, group, split=split, dim=1)
        xl = local(x).requires_grad_()
        y = layer(xl, cu_seqlens=cu)
        layer.group, layer.split = None, "contiguous"
        what = f"P={world} {split} packed={packed} per_key={per_key} {provider} rank {rank}"
        assert_rel(y, local(y_full), 1e-5, f"output, {what}")
        grads = torch.autograd.grad((y * local(do)).sum(), [xl] + list(layer.parameters()))
        assert_rel(grads[0], local(grads_full[0]), 1e-5, f"dx, {what}")
        for (name, _), got, want in zip(layer.named_parameters(), grads[1:], grads_full[1:]):
            got = got.clone()
            dist.all_reduce(got, group=group)
            assert_rel(got, want, 1e-5, f"d{name}, {what}")
    # the provider reaches the op: ulysses shards 3 heads over 2 ranks no more than the op does
    odd = lasp2.nn.GatedDeltaNet(12, 3, head_dim=4, provider="ulysses", group=group).double()
    with pytest.raises(ValueError, match=r"provider=\"ulysses\" shards heads .* heads \(3\)"):
        odd(torch.randn(1, 8, 12, dtype=torch.float64))


def test_module_same_with_and_without_group():
    run_distributed(2, check_module_rank)
