"""lasp2.linear_attention: causal linear attention, sequence-parallel with LASP-2
(or, with `provider=`, LASP-1's P2P ring or an all-to-all over heads)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from lasp2._extension import _C, has_cuda_kernels
from lasp2.distributed.communicator import get_communicator, group_rank_and_size
from lasp2.ops import _checks as C
from lasp2.ops._cu_seqlens import doc_starts_from_cu_seqlens
from lasp2.ops._group_consistency import verify_group_consistency
from lasp2.options import PROVIDERS, SPLITS, check_choice

OP = "lasp2.linear_attention"
# The CPU kernels' chunk length, not a knob of the op (the CUDA kernels pick their own
# tiles); passed until the binding takes its own default.
CPU_CHUNK_SIZE = 64


class _Lasp2LinearAttention(torch.autograd.Function):
    """Inputs are [B, T, H, D] views; the C++ core does the LASP-2 schedule."""

    @staticmethod
    def forward(ctx, q, k, v, g, decay, doc_start, scale, chunk_size, comm, parts_per_rank, overlap):
        args = _C.LinearAttentionArgs(q, k, v, g=g, decay=decay, doc_start=doc_start, scale=scale, comm=comm,
                                      parts_per_rank=parts_per_rank, chunk_size=chunk_size)
        o, _, saved = _C.lasp2_forward(args, overlap)
        # The argument tensors go through save_for_backward (version checks, hooks); the rest stays aside.
        ctx.save_for_backward(*args.tensors(), *saved)
        ctx.args = args.config()
        return o

    @staticmethod
    def backward(ctx, do):
        n = _C.LinearAttentionArgs.num_tensors
        args = ctx.args.with_tensors(ctx.saved_tensors[:n])
        need_dg = bool(ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dg, d_decay, _ = _C.lasp2_backward(args, ctx.saved_tensors[n:], do, need_dg)
        return dq, dk, dv, dg, d_decay, None, None, None, None, None, None


def _validate(q, k, v, g, decay, scale, group, layout, split, provider="lasp2"):
    check_choice(OP, "provider", provider, PROVIDERS)
    C.check_layout(OP, layout)
    C.check_tensor(OP, "q", q, 4)
    C.check_tensor(OP, "k", k, 4)
    C.check_tensor(OP, "v", v, 4)
    C.check_same_device_dtype(OP, "q", q, k=k, v=v)
    C.check_device_supported(OP, q, has_cuda_kernels())
    if k.shape != q.shape:
        C.fail(OP, f"`k` must have the shape of `q` {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        C.fail(OP, f"`v` must match `q` in its first three dims {list(q.shape[:3])} "
                   f"({layout}), got {list(v.shape)}")
    C.check_head_dim(OP, "q", q.shape[3])
    C.check_head_dim(OP, "v", v.shape[3])
    seq_dim = 1 if layout == "bthd" else 0
    bth = [q.shape[0], q.shape[1], q.shape[2]]
    if g is not None and decay is not None:
        C.fail(OP, "pass either `g` (per-token gates) or `decay` (per-head decay), not both")
    if g is not None:
        C.check_tensor(OP, "g", g, 3, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if list(g.shape) != bth:
            C.fail(OP, f"`g` must have shape {bth} (the first three dims of `q`, {layout}), got {list(g.shape)}")
        if g.device != q.device:
            C.fail(OP, f"`g` is on {g.device} but `q` is on {q.device}")
    if decay is not None:
        C.check_tensor(OP, "decay", decay, 1, (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        if decay.shape[0] != q.shape[2]:
            C.fail(OP, f"`decay` must have shape [{q.shape[2]}] (one log decay per head), got {list(decay.shape)}")
        if decay.device != q.device:
            C.fail(OP, f"`decay` is on {decay.device} but `q` is on {q.device}")
    scale = C.check_scale(OP, scale)
    C.check_group(OP, group)
    check_choice(OP, "split", split, SPLITS)
    parts = 1 if split == "contiguous" else 2
    _, world = group_rank_and_size(group)
    if world > 1 and q.shape[seq_dim] % parts:
        C.fail(OP, f"the balanced split needs an even local sequence length, got {q.shape[seq_dim]}")
    if q.shape[seq_dim] < 1:
        C.fail(OP, "`q` has an empty sequence dimension")
    if provider != "lasp2" and split != "contiguous":
        C.fail(OP, f"provider {provider!r} supports split=\"contiguous\" only, got split={split!r} "
                   "(use provider=\"lasp2\" for the balanced split)")
    if provider == "ulysses" and world > 1 and q.shape[2] % world:
        C.fail(OP, f"provider \"ulysses\" shards heads over the group: the number of heads "
                   f"({q.shape[2]}) must be divisible by the group size ({world})")
    return scale, seq_dim, parts


def linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor] = None,
    decay: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "bthd",
    split: str = "contiguous",
    cu_seqlens: Optional[torch.Tensor] = None,
    overlap: Optional[bool] = None,
    provider: str = "lasp2",
) -> torch.Tensor:
    r"""Causal linear attention over a sequence that may be split across `group`.

    Computes, per batch row and head, ``S_t = a_t S_{t-1} + k_t v_t^T`` and
    ``o_t = scale * q_t^T S_t`` with ``a_t = 1`` (no decay), ``exp(decay[h])`` or
    ``exp(g[..., t, h])``. With a process group of size P each rank passes its local
    share of the sequence (see ``lasp2.split_sequence``) and receives the same output
    rows a single device would compute: LASP-2 gathers one d_k x d_v state per part
    in forward and one state gradient per part in backward.

    Args:
        q, k: ``[B, T, H, Dk]`` (``layout="bthd"``) or ``[T, B, H, Dk]`` (``"tbhd"``,
            Megatron's order). v: the same with ``Dv``.
        g: optional log gates ``[B, T, H]`` (``[T, B, H]`` for "tbhd"), typically
            ``logsigmoid(...)``; values <= 0.
        decay: optional per-head log decay ``[H]`` (<= 0), e.g. lightning attention's
            ``-slope``. Mutually exclusive with ``g``.
        scale: multiplies q; default ``Dk ** -0.5``.
        group: the sequence-parallel process group (e.g. Megatron's context-parallel
            group); None means one device. The group is used, never created.
        split: how the sequence is laid out over the group, "contiguous" or "balanced".
        cu_seqlens: optional cumulative document lengths of the *global* packed
            sequence (B must be 1), int32/int64, starting at 0 and ending at the
            global length: documents never attend across boundaries.
        overlap: LASP-2's forward schedule. True: the state AllGather runs while the
            local attention computes, and the prefix term is added in an extra pass
            over q and o. False: wait for the AllGather and run one fused pass with the
            prefix as the entering state. None (default): False on CUDA, where the
            gather takes tens of microseconds but the extra pass about a millisecond at
            64K tokens (measured on H100, see docs/results.md), True on the CPU. The
            backward always overlaps its AllGather with the dq pass. LASP-2 only.
        provider: the sequence-parallel algorithm, all computing the same result:
            "lasp2" (default; one AllGather of states per direction), "lasp1" (a ring
            of P2P state passes, P-1 serial hops; contiguous split only) or "ulysses"
            (all-to-all to head sharding and back; contiguous split only, the number
            of heads must be divisible by the group size). See docs/providers.md.

    Returns:
        o with the shape of v, in the layout of the inputs.
    """
    scale, seq_dim, parts = _validate(q, k, v, g, decay, scale, group, layout, split, provider)
    chunk_size = CPU_CHUNK_SIZE
    if scale is None:
        scale = q.shape[3] ** -0.5
    rank, world = group_rank_and_size(group)
    if world == 1:
        parts = 1  # on one device both splits are the plain order
    local_len = q.shape[seq_dim]
    doc_start = None
    if cu_seqlens is not None:
        batch = q.shape[1 - seq_dim]
        if provider == "ulysses" and world > 1:  # the whole sequence is local after the all-to-all
            doc_start = doc_starts_from_cu_seqlens(OP, cu_seqlens, batch, local_len * world, 0, 1,
                                                   "contiguous", q.device)
        else:
            doc_start = doc_starts_from_cu_seqlens(OP, cu_seqlens, batch, local_len, rank, world,
                                                   "contiguous" if parts == 1 else "balanced", q.device)
    comm = get_communicator(group, q.device)
    if comm is not None:
        verify_group_consistency(
            OP, group,
            [q.shape[1 - seq_dim], local_len, q.shape[2], q.shape[3], v.shape[3], C.DTYPE_CODES[q.dtype],
             0 if g is None and decay is None else (1 if decay is not None else 2), parts,
             int(cu_seqlens is not None), PROVIDERS.index(provider)],
            ["batch size", "local sequence length", "heads", "key head dim", "value head dim", "dtype",
             "decay mode (none/decay/g)", "split", "use of cu_seqlens",
             f"provider {PROVIDERS}"],
            q.device)

    if layout == "tbhd":
        q, k, v = (x.transpose(0, 1) for x in (q, k, v))
        if g is not None:
            g = g.transpose(0, 1)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if overlap is None:
        overlap = q.device.type != "cuda"
    if comm is None or provider == "lasp2":
        o = _Lasp2LinearAttention.apply(q, k, v, g, decay, doc_start, float(scale), chunk_size, comm, parts,
                                        bool(overlap))
    elif provider == "lasp1":
        from lasp2.ops.providers.lasp1 import Lasp1LinearAttention

        o = Lasp1LinearAttention.apply(q, k, v, g, decay, doc_start, float(scale), chunk_size, comm)
    else:
        from lasp2.ops.providers.ulysses import ulysses_linear_attention

        o = ulysses_linear_attention(q, k, v, g, decay, doc_start, float(scale), chunk_size, group, rank, world)
    return o.transpose(0, 1) if layout == "tbhd" else o
