"""LASP-2H softmax attention as torch.library custom ops.

Registered ops (opaque to torch.compile / torch.export, with fake kernels for
tracing and an autograd formula):
  lasp2::softmax_forward(q, k, v, scale, backend, group, rank, world, parts, split, causal, cu_seqlens?,
                         cu_seqlens_tensor?, consistency?)
      -> (o, lse, kv_global)
  lasp2::softmax_backward(do, q, k, v, o, lse, kv_global, <the same plan arguments but the tensor>,
                          need_kv_grads, cu_seqlens_tensor?)
      -> (dq, dk, dv)

The block plan is rebuilt from the integers inside each op (it is a pure function of
them); the group and its collectives travel as one int handle (lasp2.ops._opaque;
collectives_handle: under torch.compile a constant of the graph, looked up by the
group's name). `consistency` (compiled calls over a group; None otherwise: the eager
entry point checks the ranks before the op) holds the cross-rank check's size fields
and host-value digests, taken while tracing: the op runs the check before its
AllGather, as the linear-attention and delta-rule ops do.
Document boundaries come as python ints (cu_seqlens: an SPContext's, read when it was
built; the fake kernel sizes kv_global from them) or, on one device, where no size
depends on them, as the per-call tensor (cu_seqlens_tensor) that the op reads and
checks itself, so a compiled graph takes per-call documents without a graph break.
q, k, v are bthd views. lse and kv_global are what backward needs besides the inputs:
the merged log-sum-exp [B, H, T] and the gathered keys|values the remote blocks used
(empty on one device or when a rank has no remote block). Plain eager calls run the
same functions through a torch.autograd.Function (lasp2.ops._eager).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

import torch.distributed as dist

from lasp2.distributed.collectives import TORCH_COLLECTIVES
from lasp2.distributed.context import check_cu_seqlens
from lasp2.distributed.sequence_split import local_parts
from lasp2.ops import _checks as C
from lasp2.ops import _lasp2h as H
from lasp2.ops._delta_library import _assume_constant_result
from lasp2.ops._eager import eager_call, eager_function
from lasp2.ops._group_consistency import Digest, digest_host, verify_group_consistency
from lasp2.ops._opaque import handle_of, resolve

OP = "lasp2.softmax_attention"
# what the size fields of the cross-rank check are (in the order softmax_attention sends them)
CHECK_NAMES = ("batch size", "local sequence length", "query heads", "key/value heads", "key head dim",
               "value head dim", "dtype", "split", "causal", "number of cu_seqlens entries", "q.requires_grad",
               "k.requires_grad", "v.requires_grad", "grad mode")
# its host values after `scale` (in the op: digested while tracing)
HOST_NAMES = ("`cu_seqlens` contents", "`layout`")


def collectives_handle(owner: str, group, collectives) -> int:
    """The ops' int handle of (group, collectives). Under torch.compile it must be a
    constant of the graph: handle_of inside the trace would register the pair only as
    a side effect applied after the graph ran, so the compiled op would look up a handle
    nobody registered yet. So the group goes in by its name, as _delta_library.group_handle
    does, with torch's collectives (the public ops run a call with an SPContext's own
    `collectives` outside the graph: lasp2/ops/_compiled.py)."""
    if not torch.compiler.is_compiling():
        return handle_of(group, collectives)
    if collectives is not TORCH_COLLECTIVES:
        raise ValueError(f"{owner}: a compiled call takes torch.distributed's collectives only")
    return _named_collectives_handle(group.group_name)


@_assume_constant_result
def _named_collectives_handle(group_name: str) -> int:
    return handle_of(dist.distributed_c10d._resolve_process_group(group_name), TORCH_COLLECTIVES)


@_assume_constant_result
def host_digests(*values) -> tuple:
    """digest_host of each host value (a tuple as the list it stands for), taken while
    tracing: constants of the graph that the check inside the op compares."""
    return tuple(digest_host(list(v) if isinstance(v, tuple) else v) for v in values)


def _check_in_op(q: Tensor, comm: int, scale: float, consistency: List[int]):
    """The cross-rank check of a compiled call over a group, in its real kernel before the
    AllGather: the eager call's row and errors."""
    n = len(CHECK_NAMES)
    verify_group_consistency(OP, resolve(comm)[0], consistency[:n], CHECK_NAMES, q.device,
                             host_values=[("`scale`", float(scale)), *zip(HOST_NAMES, map(Digest, consistency[n:]))],
                             lag=False)


def _config(q: Tensor, scale: float, backend: str, comm: int, rank: int, world: int, parts: int, split: str,
            causal: bool, cu_seqlens: Optional[List[int]], cu_seqlens_tensor: Optional[Tensor]) -> H.Config:
    if cu_seqlens_tensor is not None:  # per-call documents: read here, inside the op
        cu_seqlens = check_cu_seqlens(OP, cu_seqlens_tensor, q.shape[1] * world).tolist()
    blocks = H.plan_blocks(q.shape[1], rank, world, parts, causal, cu_seqlens)
    group, collectives = resolve(comm) if comm else (None, None)
    return H.Config(blocks, scale, backend, group, world, split, H.key_end(blocks), causal, collectives)


def _forward_impl(q, k, v, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens, cu_seqlens_tensor=None,
                  consistency=None):
    if consistency:
        _check_in_op(q, comm, scale, consistency)
    cfg = _config(q, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens, cu_seqlens_tensor)
    return H.lasp2h_forward(q, k, v, cfg)


@torch.library.custom_op("lasp2::softmax_forward", mutates_args=())
def softmax_forward(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str, comm: int, rank: int, world: int,
                    parts: int, split: str, causal: bool, cu_seqlens: Optional[List[int]],
                    cu_seqlens_tensor: Optional[Tensor] = None,
                    consistency: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, v, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens,
                         cu_seqlens_tensor, consistency)


@softmax_forward.register_fake
def _(q, k, v, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens, cu_seqlens_tensor=None,
      consistency=None):
    b, t, h, _ = q.shape
    hkv, d, dv = k.shape[2], k.shape[3], v.shape[3]
    keys = _fake_key_end(t, rank, world, parts, causal, cu_seqlens) if world > 1 else 0
    return (q.new_empty(b, t, h, dv), q.new_empty(b, h, t, dtype=H.K.acc_dtype(q.dtype)),
            q.new_empty(keys, b, hkv, d + dv))


def _fake_key_end(t, rank: int, world: int, parts: int, causal: bool, cu_seqlens: Optional[List[int]]):
    """H.key_end of the plan for a local length t that may be symbolic (torch.compile's
    dynamic shapes: the plan's sets and comparisons would need its value). Without
    documents it has a closed form: causal, every part reads the keys before its global
    start, so the last part (the latest start) reads the most; bidirectional, all keys.
    Documents (a group's always come as python ints) fix the length anyway."""
    if cu_seqlens is not None:
        return H.key_end(H.plan_blocks(int(t), rank, world, parts, causal, cu_seqlens))
    return local_parts(t, rank, world, parts)[-1][2] if causal else world * t


def _backward_impl(do, q, k, v, o, lse, kv_global, scale, backend, comm, rank, world, parts, split, causal,
                   cu_seqlens, need_kv_grads, cu_seqlens_tensor=None):
    cfg = _config(q, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens, cu_seqlens_tensor)
    return H.lasp2h_backward(do, q, k, v, o, lse, kv_global, cfg, need_kv_grads)


@torch.library.custom_op("lasp2::softmax_backward", mutates_args=())
def softmax_backward(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, kv_global: Tensor,
                     scale: float, backend: str, comm: int, rank: int, world: int, parts: int, split: str,
                     causal: bool, cu_seqlens: Optional[List[int]], need_kv_grads: bool,
                     cu_seqlens_tensor: Optional[Tensor] = None) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_impl(do, q, k, v, o, lse, kv_global, scale, backend, comm, rank, world, parts, split, causal,
                          cu_seqlens, need_kv_grads, cu_seqlens_tensor)


@softmax_backward.register_fake
def _(do, q, k, v, o, lse, kv_global, scale, backend, comm, rank, world, parts, split, causal, cu_seqlens,
      need_kv_grads, cu_seqlens_tensor=None):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, *plan = inputs[:12]  # (the check's `consistency` is not needed after the forward)
    cu_seqlens_tensor = inputs[12] if len(inputs) > 12 else None
    o, lse, kv_global = output
    ctx.save_for_backward(q, k, v, o, lse, kv_global, cu_seqlens_tensor)
    ctx.plan = plan


def _backward(ctx, do, _d_lse, _d_kv_global):
    q, k, v, o, lse, kv_global, cu_seqlens_tensor = ctx.saved_tensors
    need_kv = bool(ctx.needs_input_grad[1] or ctx.needs_input_grad[2])
    run = _backward_impl if eager_call(do, q) else softmax_backward
    with torch.no_grad():
        dq, dk, dv = run(do, q, k, v, o, lse, kv_global, *ctx.plan, need_kv, cu_seqlens_tensor)
    grads = (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
             dv if ctx.needs_input_grad[2] else None)
    return (*C.guard_double_backward(OP, grads), *([None] * (len(ctx.plan) + 2)))


torch.library.register_autograd("lasp2::softmax_forward", _backward, setup_context=_setup_context)
_EagerForward = eager_function("SoftmaxForward", _forward_impl, _setup_context, _backward)


def lasp2h_attention(q: Tensor, k: Tensor, v: Tensor, scale: float, backend: str, group, collectives, rank: int,
                     world: int, parts: int, split: str, causal: bool, cu_seqlens: Optional[List[int]],
                     cu_seqlens_tensor: Optional[Tensor] = None, consistency: Optional[List[int]] = None) -> Tensor:
    """One rank's LASP-2H output through the custom op (bthd views in, bthd out).
    Documents: cu_seqlens (python ints) or, on one device, cu_seqlens_tensor (per-call
    global boundaries the op reads). consistency: a compiled call's check fields (the op
    checks the ranks)."""
    comm = collectives_handle(OP, group, collectives) if world > 1 else 0
    args = (q, k, v, float(scale), backend, comm, int(rank), int(world), int(parts), split, bool(causal), cu_seqlens,
            cu_seqlens_tensor)
    if consistency:
        return softmax_forward(*args, [int(x) for x in consistency])[0]
    run = _EagerForward.apply if eager_call(q, k, v, cu_seqlens_tensor) else softmax_forward
    return run(*args)[0]
