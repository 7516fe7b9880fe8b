"""A depthwise short causal convolution (fla's ShortConvolution) whose result is the
same with or without sequence parallelism.

Token t of a part needs the previous kernel_size - 1 tokens of the *global*
sequence, which for the first tokens of a part live on the rank holding the
previous part. One AllGather of every part's last kernel_size - 1 tokens (the
halo; all of a part shorter than that, the halo then spanning several parts) brings
them; in backward one AllGather of the halo gradients returns each part's share to the
rank that owns the tokens. Packed documents (cu_seqlens) are
respected: no output mixes tokens of two documents.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from lasp2.distributed.collectives import all_gather_single
from lasp2.distributed.communicator import check_group, group_rank_and_size
from lasp2.distributed.context import check_cu_seqlens, document_starts
from lasp2.distributed.sequence_split import global_token_index
from lasp2.ops._checks import DTYPE_CODES, builds_backward, guard_double_backward
from lasp2.ops._group_consistency import raised_on_every_rank, verify_group_consistency
from lasp2.ops._ranks_checked import check_ranks_checked, covers


class _GatherHalo(torch.autograd.Function):
    """tails [parts, B, W-1, C] of this rank's parts -> the same for every rank, stacked
    [world * parts, ...] in rank order; backward returns to each rank the summed
    gradients of its own tails. anchor: a leaf requiring grad, passed where the call builds
    a backward but this rank's tails need no gradient (its projection frozen, `x` without
    grad): the node, and so its all-gather, exists on every rank alike. Without it such a
    rank skipped the backward all-gather its peers made, which then met its next call's
    collectives (gloo aborted, or the peers' halo gradients went to another convolution)."""

    @staticmethod
    def forward(ctx, tails, group, anchor=None):
        world = dist.get_world_size(group)
        out = tails.new_empty((world * tails.shape[0],) + tuple(tails.shape[1:]))
        all_gather_single(out, tails.contiguous(), group=group)
        ctx.group, ctx.parts = group, tails.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad):
        group, parts = ctx.group, ctx.parts
        rank = dist.get_rank(group)
        world = dist.get_world_size(group)
        # no_grad: under create_graph=True (grad mode on here) the all-gather's in-place write
        # into its output raised torch's "A view was created in no_grad mode ..." on every
        # rank, so a module over a group refused what it ran on one device; its double
        # backward raises lasp2's clear error instead (guard_double_backward)
        with torch.no_grad():
            gathered = grad.new_empty((world * grad.shape[0],) + tuple(grad.shape[1:]))
            all_gather_single(gathered, grad.contiguous(), group=group)
            # every rank's gradient for this rank's tails, summed
            gathered = gathered.view((world,) + tuple(grad.shape))
            mine = gathered[:, rank * parts:(rank + 1) * parts].sum(0)
        return guard_double_backward("lasp2.nn.ShortConvolution (halo exchange)", (mine, None, None))


def _global_doc_ids(cu_seqlens, global_len):
    if cu_seqlens is None:
        return torch.zeros(global_len, dtype=torch.int64)
    # checked: unchecked values would index out of range or mislabel tokens; document_starts
    # drops the boundary of an empty last document (= global_len), which indexed past the end
    values = check_cu_seqlens("ShortConvolution", cu_seqlens, global_len)
    return torch.cumsum(document_starts(values, global_len).to(torch.int64), 0)


# the size fields of the cross-rank check before the halo's all-gather (check_conv_ranks)
CONV_CHECK_NAMES = ("batch size", "local sequence length", "channels", "kernel size", "dtype", "split",
                    "use of cu_seqlens")
BACKWARD_FIELD = "building a backward (grad mode and an input requiring grad)"


def _check_local_conv(owner: str, x, channels: int, kernel_size: int, world: int, parts: int, cu_seqlens):
    """What one rank can check of a convolution's input before the halo exchange."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[2] != channels:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{owner}: `x` must be [B, T_local, {channels}], got {got}")
    T = x.shape[1]
    if T % parts:
        raise ValueError(f"{owner}: the balanced split needs an even local sequence length, `x` has {T} tokens")
    return None if cu_seqlens is None else check_cu_seqlens(owner, cu_seqlens, T * world)


def check_conv_ranks(owner: str, x, channels: int, kernel_size: int, group, split: str, cu_seqlens,
                     fields=(), names=(), more=None):
    """Before the halo's all-gather over a group: this rank's checks (a failing rank tells
    its peers, which raise too), then ONE cross-rank check that every rank gathers halos of
    the same size and kind (batch, length, channels, kernel, dtype, split, documents; plus
    the caller's `fields` named by `names`). Without it a rank whose `x` or `cu_seqlens`
    failed left its peers waiting in the all-gather, and ranks with different batch sizes
    or dtypes aborted the process inside gloo (a size mismatch). Returns the checked
    cu_seqlens as an int64 CPU tensor (None without documents): the convolutions read
    their document ids from it, so a CUDA `cu_seqlens` is copied to the host once a call.

    more: over a group, a callable run among this rank's checks, given the checked cu_seqlens
    (as returned), that returns (fields, names, host values) to fold into the same check: a
    delta-rule module's op checks
    (gated_delta_rule.check_call_early), so its call makes one check, not one here and one
    in the op."""
    check_group(owner, group)  # before its size is read (a non-member's placeholder gave "world_size -1")
    world = group_rank_and_size(group)[1]
    parts = 2 if split == "balanced" and world > 1 else 1
    more_fields, more_names, more_values = (), (), ()
    with raised_on_every_rank(owner, group, x):
        cu_host = _check_local_conv(owner, x, channels, kernel_size, world, parts, cu_seqlens)
        if more is not None and world > 1:
            more_fields, more_names, more_values = more(cu_host)
    if world > 1:
        signature = [x.shape[0], x.shape[1], channels, kernel_size, DTYPE_CODES.get(x.dtype, -1), parts,
                     int(cu_seqlens is not None), *fields, *more_fields]
        verify_group_consistency(owner, group, signature, CONV_CHECK_NAMES + tuple(names) + tuple(more_names),
                                 x.device, host_values=[("`cu_seqlens` contents", cu_host), *more_values])
    return cu_host


def _slot(part: int, world: int, parts: int) -> int:
    """Where global part `part`'s tail lies in the gathered halo (rank order, `parts` a rank;
    the balanced split: rank r holds parts r and 2P-1-r)."""
    owner = part if part < world else 2 * world - 1 - part
    return owner * parts + (0 if parts == 1 or part < world else 1)


def causal_conv_sp(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                   group=None, split: str = "contiguous", cu_seqlens: Optional[torch.Tensor] = None,
                   ranks_checked=False):
    """y_t = sum_i weight[c, i] x_{t - (W-1) + i} (+ bias) per channel, over the global
    sequence; x is this rank's share [B, T_local, C]. ranks_checked: the RanksChecked of
    the caller's check of this call over `group` (lasp2.nn.delta_checks.
    check_delta_layer_ranks: a module with several convolutions of one input checks once;
    its documents replace `cu_seqlens`). Anything else, True included, checks here: a
    rank that skipped the check's all-gather alone met its peers' check with the halo's."""
    W = weight.shape[1]
    with raised_on_every_rank("causal_conv_sp", group, x):  # its peers, checking, raise too
        check_ranks_checked("causal_conv_sp", ranks_checked)
    rank, world = group_rank_and_size(group)
    if covers(ranks_checked, group):
        cu_seqlens, backward = ranks_checked.cu_seqlens, ranks_checked.backward
    else:
        # which inputs need gradients may differ per rank; whether the call builds a backward
        # may not (the halo's backward all-gather runs on every rank or none)
        backward = builds_backward(x, weight, bias)
        cu_seqlens = check_conv_ranks("causal_conv_sp", x, weight.shape[0], W, group, split, cu_seqlens,
                                      (backward,), (BACKWARD_FIELD,))
    B, T, Cn = x.shape
    parts = 2 if split == "balanced" and world > 1 else 1
    n = T // parts
    halo = W - 1
    global_len = T * world
    position = global_token_index(T, rank, world, "balanced" if parts == 2 else "contiguous")
    doc = _global_doc_ids(cu_seqlens, global_len)
    xs = x.view(B, parts, n, Cn)
    m = min(halo, n)  # a part's tail: all of a part shorter than the halo
    if world > 1 and halo > 0:
        tails = xs[:, :, n - m:].permute(1, 0, 2, 3)  # [parts, B, m, C]
        anchor = tails.new_zeros((), requires_grad=True) if backward and not tails.requires_grad else None
        every = _GatherHalo.apply(tails, group, anchor)  # [world * parts, B, m, C], rank order
    outputs = []
    for i in range(parts):
        first = int(position[i * n])  # global position of the part's first token
        if halo == 0:
            ext = xs[:, i]
        elif world == 1:
            ext = F.pad(xs[:, i], (0, 0, halo, 0))
        else:
            # The halo is the last `halo` tokens before the part, from as many preceding parts
            # as it spans (parts shorter than kernel_size - 1 tokens: several; such parts were
            # refused before session 23). Parts before the sequence's start read part 0's tail,
            # masked to zero below (positions < 0): every rank's output then depends on the
            # gathered halo, so every rank joins the collective of its backward.
            span = -(-halo // m)
            pieces = [every[_slot(max(p, 0), world, parts)] for p in range(first // n - span, first // n)]
            ext = torch.cat([*pieces, xs[:, i]], dim=1)[:, span * m - halo:]
        # positions of ext rows: first - halo ... first + n - 1
        pos = torch.arange(first - halo, first + n)
        doc_ext = torch.where(pos >= 0, doc[pos.clamp_min(0)], torch.full_like(pos, -1))
        y = 0
        for j in range(W):  # tap j reads x_{t - (W-1) + j}
            src = ext[:, j:j + n]
            same_doc = (doc_ext[j:j + n] == doc_ext[halo:halo + n]).to(x.dtype).to(x.device)
            y = y + src * weight[:, j] * same_doc[None, :, None]
        if bias is not None:
            y = y + bias
        outputs.append(y)
    return torch.cat(outputs, dim=1)


class ShortConvolution(nn.Module):
    """Depthwise causal convolution of width kernel_size with an optional SiLU, over
    [B, T_local, C] inputs, the same with or without `group`."""

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = False, activation: str = "silu",
                 device=None, dtype=None):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"ShortConvolution: `kernel_size` must be >= 1, got {kernel_size}")
        if activation not in ("silu", None, "identity"):
            raise ValueError(f"ShortConvolution: `activation` must be 'silu' or None, got {activation!r}")
        self.kernel_size, self.activation = kernel_size, activation
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(channels, kernel_size, **factory))
        self.bias = nn.Parameter(torch.zeros(channels, **factory)) if bias else None
        bound = kernel_size ** -0.5
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, x, group=None, split="contiguous", cu_seqlens=None, ranks_checked=False):
        y = causal_conv_sp(x, self.weight, self.bias, group, split, cu_seqlens, ranks_checked)
        return F.silu(y) if self.activation == "silu" else y
