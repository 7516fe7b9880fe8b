"""All-to-all ("Ulysses") sequence parallelism for linear attention.

Each rank holds a contiguous share [B, T/P, H, D] of the sequence. One all-to-all
per tensor re-shards q, k, v (and g) by heads, [B, T, H/P, D]: every rank then holds
the whole sequence for H/P heads and runs single-device causal linear attention; one
more all-to-all brings o back to sequence sharding. Backward runs the adjoint
all-to-alls. Communication is O(T) activations per layer (4 all-to-alls forward, 4
backward with g's), against LASP-2's O(1) states; heads must divide by P.

"NaN at the call" (csrc/core/include/lasp2/call_check.h): the words the call's
cross-rank check armed (its device values, compared DEPTH calls later) take one
all-gather of their own (at most 32 bytes per rank) before the first all-to-all; after
the last one the outputs become NaN on every rank when the ranks' words fail (one
kernel, no host sync). The check arms alike on every rank, so every rank gathers or none.

The whole exchange runs as one torch.library custom op pair, so torch.compile
(fullgraph=True) takes it over a group:
  lasp2::ulysses_forward(q, k, v, g?, decay?, doc_start?, scale, chunk_size, comm, rank, world,
                         check, consistency?)
      -> (o, qh, kh, vh, gh, local_records, prefix_states, maps, head_maps)
  lasp2::ulysses_backward(qh, kh, vh, gh?, decay?, doc_start?, scale, chunk_size, comm, rank, world,
                          do, local_records, prefix_states, maps, head_maps, need)
      -> (dq, dk, dv, dg, d_decay)
qh, kh, vh, gh (empty without g) are the head-sharded inputs and the rest the
single-device op's saved buffers (lasp2/ops/_library.py), what backward needs; doc_start
the global sequence's document starts; comm the handle of (group, collectives)
(lasp2.ops._softmax_library.collectives_handle); check / consistency the cross-rank
check run inside the op (_library.compiled_check; 0 / None: the eager entry point
checked the ranks before the op); need the gradients asked for (dq, dk, dv, dg, d_decay):
only those travel back. Plain eager calls run the same functions through a
torch.autograd.Function (lasp2.ops._eager).
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from lasp2._extension import _C
from lasp2.ops import _checks as C
from lasp2.ops import _library as L
from lasp2.ops._eager import eager_call, eager_function, reject_functorch
from lasp2.ops._opaque import resolve
from lasp2.ops._softmax_library import collectives_handle
from lasp2.ops.providers.base import CPU_CHUNK_SIZE, Provider

OP = "lasp2.linear_attention"


def seq_to_head(x: torch.Tensor, world: int, group, collectives) -> torch.Tensor:
    """[B, T/P, H, D] sequence-sharded -> [B, T, H/P, D] head-sharded."""
    B, Tl, H, D = x.shape
    send = x.reshape(B, Tl, world, H // world, D).permute(2, 0, 1, 3, 4).contiguous()
    recv = torch.empty_like(send)
    collectives.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's tokens
    # contiguous, as the fake kernels lay the ops' outputs out (reshape keeps a view where it can)
    return recv.permute(1, 0, 2, 3, 4).reshape(B, world * Tl, H // world, D).contiguous()


def head_to_seq(y: torch.Tensor, world: int, group, collectives) -> torch.Tensor:
    """[B, T, H/P, D] head-sharded -> [B, T/P, H, D] sequence-sharded."""
    B, T, Hp, D = y.shape
    send = y.reshape(B, world, T // world, Hp, D).permute(1, 0, 2, 3, 4).contiguous()
    recv = torch.empty_like(send)
    collectives.all_to_all_single(recv, send, group=group)  # recv[i]: rank i's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(B, T // world, world * Hp, D).contiguous()


def _heads(decay: Optional[Tensor], rank: int, heads: int) -> Optional[Tensor]:
    return None if decay is None else decay[rank * heads:(rank + 1) * heads]


def _gather_armed_words(like, world: int, group, collectives):
    """The words the call's check armed, gathered from every rank ([world, count] int64),
    and their max mask; None when nothing is armed. Taken before the single-device op
    below, which would take (and drop) them otherwise."""
    armed = _C.take_call_check_words(like)
    if armed is None:
        return None
    words, max_mask = armed
    gathered = words.new_empty(world * words.numel())  # flat: gloo takes no stacked output
    collectives.all_gather_single(gathered, words, group=group)
    return gathered.view(world, -1), max_mask


def _forward_eager(q, k, v, g, decay, doc_start, scale, chunk_size, comm, rank, world, check=0, consistency=None):
    if check:  # compiled: the cross-rank check (and the gates' signs) before the first all-to-all
        L._check_in_op(q, g, decay, scale, check, consistency)
    group, collectives = resolve(comm)
    armed = _gather_armed_words(q, world, group, collectives)
    qh, kh, vh = (seq_to_head(x, world, group, collectives) for x in (q, k, v))
    gh = None if g is None else seq_to_head(g.unsqueeze(-1), world, group, collectives).squeeze(-1)
    o, _, *saved = L._forward_eager(qh, kh, vh, gh, _heads(decay, rank, q.shape[2] // world), doc_start, None,
                                    scale, chunk_size, 0, 1, True, [], 0, False)
    o = head_to_seq(o, world, group, collectives)
    if armed is not None:  # every rank compares the same gathered words: all NaN, or none
        _C.poison_on_failed_words(*armed, [o])
    return (o, qh, kh, vh, q.new_empty(0) if gh is None else gh, *saved)


def _forward_impl(*inputs):
    out = _forward_eager(*inputs)
    for buffer in out[5:9]:  # one device without states: backward reads none of them, a custom
        buffer.zero_()       # op's outputs must be deterministic (as lasp2_forward does); the
    return out               # segment states (out[9]) are written whole by the forward


@torch.library.custom_op("lasp2::ulysses_forward", mutates_args=())
def ulysses_forward(q: Tensor, k: Tensor, v: Tensor, g: Optional[Tensor], decay: Optional[Tensor],
                    doc_start: Optional[Tensor], scale: float, chunk_size: int, comm: int, rank: int, world: int,
                    check: int = 0, consistency: Optional[List[int]] = None
                    ) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _forward_impl(q, k, v, g, decay, doc_start, scale, chunk_size, comm, rank, world, check, consistency)


@ulysses_forward.register_fake
def _(q, k, v, g, decay, doc_start, scale, chunk_size, comm, rank, world, check=0, consistency=None):
    B, Tl, H, dk = q.shape
    T, Hp, dv = Tl * world, H // world, v.shape[3]
    qh, kh, vh = q.new_empty(B, T, Hp, dk), k.new_empty(B, T, Hp, dk), v.new_empty(B, T, Hp, dv)
    gh = None if g is None else g.new_empty(B, T, Hp)
    # the single-device op's saved buffers: its own fake kernel sizes them
    _, _, *saved = L.lasp2_forward(qh, kh, vh, gh, _heads(decay, rank, Hp), doc_start, None, scale, chunk_size, 0,
                                   1, True, [], 0, False)
    return (v.new_empty(B, Tl, H, dv), qh, kh, vh, q.new_empty(0) if gh is None else gh, *saved)


def _backward_eager(qh, kh, vh, gh, decay, doc_start, scale, chunk_size, comm, rank, world, do, records, prefixes,
                    maps, head_maps, seg_states, need):
    """(dq, dk, dv, dg, d_decay) of the inputs, None where not asked for (`need`): the
    adjoint all-to-alls around the single-device backward. Every rank runs the same
    all-to-alls whatever its own `need` (dq, dk, dv always, dg whenever g is given):
    ranks whose inputs differ in requires_grad would otherwise make different
    collectives and hang."""
    group, collectives = resolve(comm)
    heads = qh.shape[2]
    dh = seq_to_head(do, world, group, collectives)
    dq, dk, dv, dg, d_decay, _ = L._backward_eager(
        qh, kh, vh, gh, _heads(decay, rank, heads), doc_start, None, scale, chunk_size, 0, 1, [], 0, dh, None,
        records, prefixes, maps, head_maps, seg_states, bool(gh is not None or need[4]), False)
    grads = [head_to_seq(x, world, group, collectives) for x in (dq, dk, dv)]
    grads = [x if want else None for x, want in zip(grads, need)]
    dg = None if gh is None else head_to_seq(dg.unsqueeze(-1), world, group, collectives).squeeze(-1)
    grads.append(dg if need[3] else None)
    if need[4]:  # the gradient of this rank's slice of decay
        full = decay.new_zeros(decay.shape)
        full[rank * heads:(rank + 1) * heads] = d_decay
        d_decay = full
    grads.append(d_decay if need[4] else None)
    return grads


@torch.library.custom_op("lasp2::ulysses_backward", mutates_args=())
def ulysses_backward(qh: Tensor, kh: Tensor, vh: Tensor, gh: Optional[Tensor], decay: Optional[Tensor],
                     doc_start: Optional[Tensor], scale: float, chunk_size: int, comm: int, rank: int, world: int,
                     do: Tensor, records: Tensor, prefixes: Tensor, maps: Tensor, head_maps: Tensor,
                     seg_states: Tensor, need: List[bool]) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backward_eager(qh, kh, vh, gh, decay, doc_start, scale, chunk_size, comm, rank, world, do, records,
                            prefixes, maps, head_maps, seg_states, need)
    return tuple(L._or_empty(x, do) for x in grads)


@ulysses_backward.register_fake
def _(qh, kh, vh, gh, decay, doc_start, scale, chunk_size, comm, rank, world, do, records, prefixes, maps,
      head_maps, seg_states, need):
    B, T, Hp, dk = qh.shape
    shape = (B, T // world, Hp * world)
    grads = (qh.new_empty(*shape, dk), kh.new_empty(*shape, dk), vh.new_empty(*shape, vh.shape[3]),
             gh.new_empty(shape) if gh is not None else None, torch.empty_like(decay) if decay is not None else None)
    return tuple(L._or_empty(x if want else None, do) for x, want in zip(grads, need))


def _setup_context(ctx, inputs, output):
    q, k, v, g, decay, doc_start, *plan = inputs
    _, qh, kh, vh, gh, *saved = output
    ctx.save_for_backward(qh, kh, vh, gh if g is not None else None, decay, doc_start, *saved)
    ctx.plan = plan[:5]  # scale, chunk_size, comm, rank, world


def _backward(ctx, do, *_d_saved):
    qh, kh, vh, gh, decay, doc_start, *saved = ctx.saved_tensors
    need = [bool(x) for x in ctx.needs_input_grad[:5]]
    if do is None:  # o took no part in the loss
        do = torch.zeros(qh.shape[0], qh.shape[1] // ctx.plan[4], qh.shape[2] * ctx.plan[4], vh.shape[3],
                         dtype=vh.dtype, device=vh.device)
    run = _backward_eager if eager_call(do, qh) else ulysses_backward
    with torch.no_grad():
        grads = run(qh, kh, vh, gh, decay, doc_start, *ctx.plan, do, *saved, need)
    grads = C.guard_double_backward(OP, tuple(x if want else None for x, want in zip(grads, need)))
    return (*grads, *([None] * 8))


torch.library.register_autograd("lasp2::ulysses_forward", _backward, setup_context=_setup_context)
# the head-sharded inputs and the saved buffers (outputs 1..9) only serve the backward
_EagerForward = eager_function("UlyssesForward", _forward_eager, _setup_context, _backward,
                               internal_outputs=tuple(range(1, 10)))


class UlyssesProvider(Provider):
    name = "ulysses"
    splits = ("contiguous",)
    checks_in_op = True

    def check(self, owner: str, *, heads: int, split: str, world_size: int) -> None:
        super().check(owner, heads=heads, split=split, world_size=world_size)
        if world_size > 1 and heads % world_size:
            raise ValueError(f"{owner}: provider \"ulysses\" shards heads over the group: the number of heads "
                             f"({heads}) must be divisible by the group size ({world_size})")

    def apply(self, q, k, v, g, decay, *, scale, sp_context, overlap, check=0, consistency=None):
        """[B, T/P, H, D] views in, o [B, T/P, H, Dv] out: single-device LASP-2 on the whole
        sequence for this rank's H/P heads (document starts of the global sequence).
        check / consistency: _library.compiled_check's (a compiled call: the op checks the ranks)."""
        reject_functorch(OP)
        starts = sp_context.global_doc_start
        doc_start = None if starts is None else starts.to(q.device)
        comm = collectives_handle(OP, sp_context.group, sp_context.collectives)
        args = (q, k, v, g, decay, doc_start, float(scale), CPU_CHUNK_SIZE, comm, int(sp_context.rank),
                int(sp_context.world_size))
        if check:
            return ulysses_forward(*args, int(check), list(consistency))[0]
        run = _EagerForward.apply if eager_call(q, k, v, g, decay, doc_start) else ulysses_forward
        return run(*args)[0]
