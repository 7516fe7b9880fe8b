"""All-to-all ("Ulysses") sequence parallelism for the delta-rule family
(lasp2.gated_delta_rule, lasp2.kda; family "gated_delta_rule").

Each rank holds its share [B, T/P, H, *] of the sequence (either split). One
all-to-all re-shards q, k, v by heads, [B, T, H/P, *], and one more does g and beta
(packed along the last dim: two collectives instead of five); the balanced split's
tokens are put back in global order after the exchange. Every rank then runs the
single-device op on the whole sequence for its H/P heads (packed documents: the
global cu_seqlens, as the caller passes them), and one all-to-all brings o back.
Sequence states: initial_state [N, H, Dk, Dv] is sliced to the rank's heads; the
final states of those heads are all-gathered, so every rank returns all of them, as
under the other providers. Backward mirrors it: dO in by all-to-all, the final-state
gradients reduce-scattered (the loss is the sum of the ranks' losses), the
single-device backward, dq/dk/dv and dg/dbeta out by two all-to-alls; each rank's
initial-state gradient is nonzero on its own heads only (a share: summed over the
group it equals one process's). Communication is O(T) activations per layer against
LASP-2's O(1) states; heads must divide by P.

One autograd node holds every collective of a call, forward and backward, so the
ranks make the same collectives whichever outputs their losses use (as the custom
op of the other providers does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lasp2.distributed.collectives import TORCH_COLLECTIVES, Collectives
from lasp2.distributed.communicator import group_rank_and_size
from lasp2.ops import _checks as C
from lasp2.ops._delta_library import _backward_impl, _check_call, _comm_and_group, _forward_impl, op_name
from lasp2.ops.providers.base import CPU_CHUNK_SIZE, Provider
from lasp2.ops.providers.ulysses import head_to_seq, seq_to_head
from lasp2.options import SPLITS


@dataclass(frozen=True)
class Exchange:
    """What the all-to-alls need (what ulysses.seq_to_head / head_to_seq take,
    plus the rank and the split)."""

    group: Any
    rank: int
    world_size: int
    parts: int  # 2: the balanced split (rank r holds global parts r and 2P-1-r)
    collectives: Collectives


def to_heads(x: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """[B, T/P, H, D] sequence-sharded -> [B, T, H/P, D] head-sharded, tokens in global order."""
    y = seq_to_head(x, ex.world_size, ex.group, ex.collectives)  # rank-major: rank i's local tokens at [i*T/P, (i+1)*T/P)
    if ex.parts == 1:
        return y
    B, T, Hp, D = y.shape
    P = ex.world_size
    y = y.reshape(B, P, 2, T // (2 * P), Hp, D)
    # rank i's first half is global part i, its second half part 2P-1-i
    return torch.cat((y[:, :, 0], y[:, :, 1].flip(1)), dim=1).reshape(B, T, Hp, D)


def to_sequence(y: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """The inverse of to_heads: [B, T, H/P, D] in global order -> [B, T/P, H, D]."""
    if ex.parts == 2:
        B, T, Hp, D = y.shape
        P = ex.world_size
        y = y.reshape(B, 2 * P, T // (2 * P), Hp, D)
        y = torch.stack((y[:, :P], y[:, P:].flip(1)), dim=2).reshape(B, T, Hp, D)
    return head_to_seq(y.contiguous(), ex.world_size, ex.group, ex.collectives)


def gather_heads(final: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """[N, H/P, Dk, Dv] of this rank's heads -> [N, H, Dk, Dv] on every rank (AllGather)."""
    P = ex.world_size
    out = final.new_empty((P,) + tuple(final.shape))
    ex.collectives.all_gather_single(out.view(-1), final.contiguous().view(-1), group=ex.group)
    N, Hp, Dk, Dv = final.shape
    return out.permute(1, 0, 2, 3, 4).reshape(N, P * Hp, Dk, Dv)


def scatter_heads(d_final: torch.Tensor, ex: Exchange) -> torch.Tensor:
    """The adjoint of gather_heads: the ranks' [N, H, Dk, Dv] gradients summed, this rank's
    heads kept (ReduceScatter)."""
    P = ex.world_size
    N, H, Dk, Dv = d_final.shape
    send = d_final.reshape(N, P, H // P, Dk, Dv).permute(1, 0, 2, 3, 4).contiguous()
    out = send.new_empty(send.shape[1:])
    ex.collectives.reduce_scatter_single(out.view(-1), send.view(-1), op=dist.ReduceOp.SUM, group=ex.group)
    return out


def _gate_dtype(g: torch.Tensor, beta: torch.Tensor) -> torch.dtype:
    # g and beta travel together; at least float32 (what the kernels take them in), so
    # 16-bit gates lose nothing and float64 ones keep their precision
    return torch.promote_types(torch.promote_types(g.dtype, beta.dtype), torch.float32)


@dataclass(frozen=True)
class _Plan:
    ex: Exchange
    scale: float
    num_seqs: int
    output_final_state: bool
    # a backward can follow (grad mode on and an input needs a gradient): the forward then
    # keeps its chunked outputs (ctx.needs_input_grad inside forward ignores grad mode)
    keep: bool = True


class UlyssesDeltaRule(torch.autograd.Function):
    """Inputs are this rank's [B, T/P, H, *] views ("bthd"), initial_state [N, H, Dk, Dv]
    (or None); returns (o [B, T/P, H, Dv], final [N, H, Dk, Dv] float32 or an empty tensor)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, plan: _Plan):
        ex = plan.ex
        B, Tl, H, Dk = q.shape
        Dv = v.shape[3]
        Hp = H // ex.world_size
        heads = slice(ex.rank * Hp, (ex.rank + 1) * Hp)
        qh, kh, vh = to_heads(torch.cat((q, k, v), dim=-1), ex).split((Dk, Dk, Dv), dim=-1)
        gd = _gate_dtype(g, beta)
        gates = to_heads(torch.cat((g.reshape(B, Tl, H, -1).to(gd), beta.unsqueeze(-1).to(gd)), dim=-1), ex)
        gh = gates[..., :-1].contiguous()
        gh = gh if g.dim() == 4 else gh.squeeze(-1)
        betah = gates[..., -1].contiguous()
        h0 = initial_state[:, heads].contiguous() if initial_state is not None else None
        o, final, *saved = _forward_impl(qh, kh, vh, gh, betah, cu_seqlens, h0, plan.scale, CPU_CHUNK_SIZE, 0, 1,
                                         False, plan.num_seqs, plan.output_final_state, [],
                                         keep=plan.keep)
        ctx.save_for_backward(qh, kh, vh, gh, betah, cu_seqlens, h0, *saved)
        ctx.plan, ctx.heads = plan, heads
        ctx.dtypes = (g.dtype, beta.dtype, None if initial_state is None else initial_state.dtype)
        ctx.shapes = (tuple(g.shape), tuple(initial_state.shape) if initial_state is not None else None)
        if plan.output_final_state:
            final = gather_heads(final, ex)
        else:
            final = q.new_empty(0, dtype=torch.float32)
            ctx.mark_non_differentiable(final)
        return to_sequence(o, ex), final

    @staticmethod
    def backward(ctx, do, d_final):
        # grads are materialised (zeros where an output took no part in the loss): every
        # rank makes the same collectives
        plan = ctx.plan
        ex = plan.ex
        qh, kh, vh, gh, betah, cu_seqlens, h0, *saved = ctx.saved_tensors
        need = ctx.needs_input_grad
        need_dinitial = h0 is not None and bool(need[5])
        doh = to_heads(do.contiguous(), ex)
        d_final_h = scatter_heads(d_final.to(torch.float32), ex) if plan.output_final_state else None
        with torch.no_grad():
            dq, dk, dv, dg, dbeta, d_h0 = _backward_impl(
                qh, kh, vh, gh, betah, cu_seqlens, h0, plan.scale, CPU_CHUNK_SIZE, 0, 1, False, plan.num_seqs, doh,
                d_final_h, *saved, bool(need[3]), bool(need[4]), need_dinitial)
        B, T, Hp, Dk = qh.shape
        Dv = vh.shape[3]
        dq, dk, dv = to_sequence(torch.cat((dq, dk, dv), dim=-1), ex).split((Dk, Dk, Dv), dim=-1)
        # the gate gradients travel whether or not asked for (zeros), so the collectives'
        # sizes never depend on a rank's requires_grad flags
        gw = gh.shape[3] if gh.dim() == 4 else 1
        dg = dg.reshape(B, T, Hp, gw) if need[3] else gh.new_zeros(B, T, Hp, gw)
        dbeta = dbeta.reshape(B, T, Hp, 1) if need[4] else betah.new_zeros(B, T, Hp, 1)
        dgates = to_sequence(torch.cat((dg.to(gh.dtype), dbeta.to(gh.dtype)), dim=-1), ex)
        g_dtype, beta_dtype, h0_dtype = ctx.dtypes
        g_shape, h0_shape = ctx.shapes
        d_initial = None
        if need_dinitial:  # this rank's share: its heads' gradient, zeros elsewhere
            d_initial = d_h0.new_zeros(h0_shape, dtype=h0_dtype)
            d_initial[:, ctx.heads] = d_h0.to(h0_dtype)
        grads = (dq, dk, dv, dgates[..., :-1].reshape(g_shape).to(g_dtype) if need[3] else None,
                 dgates[..., -1].to(beta_dtype) if need[4] else None, d_initial)
        grads = C.guard_double_backward(op_name(gh), grads)
        return (*grads, None, None)


class DeltaUlyssesProvider(Provider):
    """Ulysses for the delta-rule family: all-to-all to head sharding, the single-device
    op on the whole sequence for H/P heads, all-to-all back (module doc)."""

    name = "ulysses"
    splits = SPLITS
    takes_states = True

    def check(self, owner: str, *, heads: int, split: str, world_size: int) -> None:
        super().check(owner, heads=heads, split=split, world_size=world_size)
        if world_size > 1 and heads % world_size:
            raise ValueError(f"{owner}: provider=\"ulysses\" shards heads over the group: the number of heads "
                             f"({heads}) must be divisible by the group size ({world_size}); use "
                             "provider=\"lasp2\" otherwise")

    def apply(self, q, k, v, g, beta, initial_state, *, cu_seqlens, num_seqs, scale, comm, parts_per_rank,
              output_final_state, consistency, collectives=None):
        """q, k, v [B, T_local, H, D] ("bthd" views), g, beta likewise, comm the group's
        handle (lasp2/ops/_delta_library.py: group_handle); returns (o, final or None)."""
        _, group = _comm_and_group(comm)
        if torch.compiler.is_compiling():  # the checks below read tensor values on the host
            torch._dynamo.graph_break(
                f"{op_name(g)}: over a group, fullgraph torch.compile supports providers \"lasp2\" and \"lasp1\" "
                "(their custom op runs the cross-rank check); provider=\"ulysses\" checks the ranks in Python")
        # g/beta/cu_seqlens values and the cross-rank check, before any collective: a rank
        # with bad values makes every rank raise instead of leaving them in an all-to-all
        _check_call(q, g, beta, group, scale, consistency, cu_seqlens, parts_per_rank, initial_state)
        rank, world = group_rank_and_size(group)
        ex = Exchange(group, rank, world, parts_per_rank, collectives or TORCH_COLLECTIVES)
        keep = torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                               for x in (q, k, v, g, beta, initial_state))
        o, final = UlyssesDeltaRule.apply(q, k, v, g, beta, initial_state, cu_seqlens,
                                          _Plan(ex, float(scale), int(num_seqs), bool(output_final_state), keep))
        return o, (final if output_final_state else None)
