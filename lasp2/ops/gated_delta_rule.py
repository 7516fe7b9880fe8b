"""lasp2.gated_delta_rule and lasp2.kda: the gated delta rule (gated DeltaNet) and
Kimi Delta Attention, sequence-parallel with LASP-2.

Per batch row and head (S is Dk x Dv, fp32):
    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
with D_t = exp(g_t) (GDN: g [B, T, H]) or diag(exp(g_t)) (KDA: g [B, T, H, Dk]), the
recurrence of fla's naive kernels. Each rank's part of the sequence is an affine map
of the state entering it, S_out = A S_in + M; LASP-2 gathers the (A, M) of every part
once in forward and one state gradient per part in backward (csrc/core/delta_rule/,
docs/delta_rule.md).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist

from lasp2.distributed.communicator import check_group, group_rank_and_size
from lasp2.distributed.context import SPContext, check_cu_seqlens_form, resolve_sp_context
from lasp2.ops import _checks as C
from lasp2._extension import _C
from lasp2.ops._delta_library import CONSISTENCY_FIELDS, _raise_value_error, delta_rule, group_handle
from lasp2.ops._documents import global_documents
from lasp2.ops._group_consistency import report_local_failure, tensor_bits_digest
from lasp2.ops._l2norm_library import L2NORM_EPS, qk_l2norm
from lasp2.ops._ranks_checked import check_ranks_checked, covers
from lasp2.ops.providers.base import CPU_CHUNK_SIZE, Provider, get_provider, provider_names, register
from lasp2.ops.providers.ulysses_delta import DeltaUlyssesProvider
from lasp2.options import SPLITS, check_choice

FAMILY = "gated_delta_rule"  # the provider family of gated_delta_rule and kda


class DeltaLasp2Provider(Provider):
    """LASP-2 for the delta-rule family: one AllGather of (A, M) part summaries
    forward, one of entering-state gradients backward (csrc/core/delta_rule/)."""

    name = "lasp2"
    splits = SPLITS
    takes_states = True
    ring = False  # the C++ schedule: LASP-2 (csrc/core/sp/lasp2.cpp)

    def apply(self, q, k, v, g, beta, initial_state, *, cu_seqlens, num_seqs, scale, comm, parts_per_rank,
              output_final_state, consistency, collectives=None):
        """q, k, v [B, T_local, H, D] ("bthd" views), g, beta likewise; returns (o, final or None)
        through the custom op of lasp2/ops/_delta_library.py (comm: its group handle;
        collectives: an SPContext's, used by "ulysses" only)."""
        return delta_rule(q, k, v, g, beta, initial_state, cu_seqlens, num_seqs, scale, CPU_CHUNK_SIZE, comm,
                          parts_per_rank, self.ring, output_final_state, consistency)


class DeltaLasp1Provider(DeltaLasp2Provider):
    """LASP-1 for the delta-rule family: the state entering each part travels a ring of
    P2P sends in global part order (csrc/core/sp/lasp1.cpp over the same DeltaFamily);
    final states take one more AllGather (they arise on different ranks)."""

    name = "lasp1"
    ring = True


register(FAMILY, DeltaLasp2Provider())
register(FAMILY, DeltaLasp1Provider())
register(FAMILY, DeltaUlyssesProvider())  # all-to-all over heads (providers/ulysses_delta.py)


def _validate(op, q, k, v, g, beta, per_key, initial_state, layout, split, provider, group):
    get_provider(op, FAMILY, provider)  # ValueError naming `provider` if this family lacks it
    C.check_layout(op, layout)
    for name, x in (("q", q), ("k", k), ("v", v)):
        C.check_tensor(op, name, x, 4)
    C.check_same_device_dtype(op, "q", q, k=k, v=v)
    if q.device.type not in ("cpu", "cuda"):
        C.fail(op, f"`q` is on {q.device}; the delta-rule family runs on CPU or CUDA tensors")
    C.check_linear_qkv_shapes(op, q, k, v, layout)
    bth = list(q.shape[:3])
    g_shape = bth + [q.shape[3]] if per_key else bth
    C.check_tensor(op, "g", g, len(g_shape))
    if list(g.shape) != g_shape:
        what = "[B, T, H, Dk] (per-key log gates)" if per_key else "[B, T, H] (one log gate per token and head)"
        C.fail(op, f"`g` must have shape {g_shape} {what}, got {list(g.shape)}")
    C.check_tensor(op, "beta", beta, 3)
    if list(beta.shape) != bth:
        C.fail(op, f"`beta` must have shape {bth} (the first three dims of `q`, {layout}), got {list(beta.shape)}")
    for name, x in (("g", g), ("beta", beta)):
        if x.device != q.device:
            C.fail(op, f"`{name}` is on {x.device} but `q` is on {q.device}")
    # the values of g and beta (g <= 0, beta in [0, 1], no NaN) are checked inside the
    # custom op (lasp2/ops/_delta_library.py), so compiled graphs keep the check
    check_choice(op, "split", split, SPLITS)
    check_group(op, group)
    if initial_state is not None:
        if not isinstance(initial_state, torch.Tensor):
            C.fail(op, f"`initial_state` must be a torch.Tensor or None, got {type(initial_state).__name__}")
        if initial_state.dtype not in (torch.float32, torch.float64, q.dtype) or not initial_state.is_floating_point():
            C.fail(op, f"`initial_state` must be float32, float64 or the dtype of `q` ({q.dtype}), "
                       f"got {initial_state.dtype}")
        if initial_state.device != q.device:
            C.fail(op, f"`initial_state` is on {initial_state.device} but `q` is on {q.device}")


def _delta_rule(op, q, k, v, g, beta, per_key, scale, initial_state, output_final_state, cu_seqlens,
                group, layout, split, provider, use_qk_l2norm, sp_context, use_qk_l2norm_in_kernel=None,
                ranks_checked=False):
    collectives = None
    split_arg = split  # the caller's, checked against the context's below
    if sp_context is not None:  # an SPContext carries the group, split and documents of the batch
        if not isinstance(sp_context, SPContext):
            report_local_failure(op, group, q)
            C.fail(op, f"`sp_context` must be an SPContext from lasp2.build_sp_context, "
                       f"got {type(sp_context).__name__}")
        if group is not None or cu_seqlens is not None:
            report_local_failure(op, group if group is not None else sp_context.group, q)  # its peers raise too
            C.fail(op, "pass either `sp_context` or `group` / `cu_seqlens`, not both")
        group = sp_context.group
        split = sp_context.split
        collectives = getattr(sp_context, "collectives", None)
        cu_seqlens = getattr(sp_context, "cu_seqlens", None)
    try:
        use_qk_l2norm = _fla_l2norm_spelling(op, use_qk_l2norm, use_qk_l2norm_in_kernel)
        call = _plan(op, q, k, v, g, beta, per_key, scale, initial_state, output_final_state, cu_seqlens,
                     group, layout, split, provider, use_qk_l2norm)
        if sp_context is not None:
            # linear_attention's and softmax_attention's checks of a context against the call: an
            # explicit split other than the context's was silently replaced by it (inputs split
            # "balanced" ran as "contiguous"), and a context of another length went unnoticed
            seq_dim = 1 if layout == "bthd" else 0
            resolve_sp_context(op, sp_context, None, split_arg, None, q.shape[seq_dim], q.shape[1 - seq_dim],
                               q.device)
        check_ranks_checked(op, ranks_checked)
    except (ValueError, TypeError):
        report_local_failure(op, group, q)  # the other ranks raise too, never wait for this one
        raise
    impl, scale, cu_seqlens, num_seqs, parts, consistency = call
    if cu_seqlens is not None and sp_context is None:
        # a private copy (a context holds one already): the backward plans the documents from
        # it again, and a caller's buffer edited in place between forward and backward (numpy
        # views bump no version counter) gave a gradient of other documents than the output's
        cu_seqlens = cu_seqlens.clone()
    comm = group_handle(group, q.device) if consistency else 0  # the communicator and group, as an int
    if covers(ranks_checked, group, op):  # the caller's one check covered this call (check_call_early)
        consistency = []  # none in the op (a bare True is no proof: a rank passing it alone would skip
        # the all-gather its peers run)

    if layout == "tbhd":
        q, k, v, g, beta = (x.transpose(0, 1) for x in (q, k, v, g, beta))
    if use_qk_l2norm:  # one fused op, one kernel launch for both each way (lasp2/ops/_l2norm_library.py)
        q, k = qk_l2norm(q, k, L2NORM_EPS)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    o, final = impl.apply(
        q, k, v, g, beta, initial_state, cu_seqlens=cu_seqlens, num_seqs=num_seqs, scale=float(scale), comm=comm,
        parts_per_rank=parts, output_final_state=output_final_state, consistency=consistency,
        collectives=collectives)
    if layout == "tbhd":
        o = o.transpose(0, 1)
    if not output_final_state:
        return o, None
    return o, final.to(initial_state.dtype) if initial_state is not None else final


def _plan(op, q, k, v, g, beta, per_key, scale, initial_state, output_final_state, cu_seqlens, group, layout,
          split, provider, use_qk_l2norm):
    """Checks what needs no tensor values; returns (provider, scale, cu_seqlens, N, parts
    per rank, the cross-rank check's fields (empty on one device)). The values of g, beta
    and cu_seqlens are checked inside the op (lasp2/ops/_delta_library.py)."""
    _validate(op, q, k, v, g, beta, per_key, initial_state, layout, split, provider, group)
    scale = C.check_scale(op, scale)
    if scale is None:
        scale = q.shape[3] ** -0.5
    C.check_bool(op, "output_final_state", output_final_state)
    C.check_bool(op, "use_qk_l2norm", use_qk_l2norm)  # a truthy 'no' must not normalise
    rank, world = group_rank_and_size(group)
    parts = 2 if split == "balanced" and world > 1 else 1
    seq_dim = 1 if layout == "bthd" else 0
    local_len, batch = q.shape[seq_dim], q.shape[1 - seq_dim]
    C.check_nonempty(op, q, seq_dim)
    if local_len % parts:
        C.fail(op, f"the balanced split needs an even local sequence length, got {local_len}")
    H, Dk, Dv = q.shape[2], q.shape[3], v.shape[3]

    num_seqs = batch
    if cu_seqlens is not None:
        if isinstance(cu_seqlens, bool):  # fla's 9th positional argument is use_qk_l2norm_in_kernel
            C.fail(op, f"`cu_seqlens` must be a torch.Tensor, got bool {cu_seqlens}: the 9th positional argument "
                       "is lasp2's `cu_seqlens`, fla's `use_qk_l2norm_in_kernel`; pass the flag by keyword")
        num_seqs = check_cu_seqlens_form(op, cu_seqlens)
        if batch != 1:
            C.fail(op, f"`cu_seqlens` needs packed input with batch size 1, got batch {batch}")
    if initial_state is not None and list(initial_state.shape) != [num_seqs, H, Dk, Dv]:
        what = "documents in `cu_seqlens`" if cu_seqlens is not None else "batch rows"
        C.fail(op, f"`initial_state` must have shape {[num_seqs, H, Dk, Dv]} "
                   f"([N, H, Dk, Dv], N = number of {what}), got {list(initial_state.shape)}")

    impl = get_provider(op, FAMILY, provider)
    impl.check(op, heads=H, split=split, world_size=world)
    if world == 1:
        return get_provider(op, FAMILY, "lasp2"), scale, cu_seqlens, num_seqs, parts, []  # one device: the plain op
    # the integer fields of the per-call cross-rank check (names: _delta_library.CONSISTENCY_FIELDS);
    # it runs inside the custom op, after the value checks of g and beta
    consistency = [batch, local_len, H, Dk, Dv, C.DTYPE_CODES[q.dtype], int(per_key), parts, num_seqs,
                   int(cu_seqlens is not None), int(initial_state is not None), int(output_final_state),
                   int(bool(use_qk_l2norm)), provider_names(FAMILY).index(provider),
                   # g's and beta's dtypes set the size of provider "ulysses"' all-to-all of them
                   # (a rank passing float32 gates beside float64 ones aborted the process in
                   # gloo); a layout differing per rank with B == T_local would read other
                   # tokens silently
                   C.DTYPE_CODES[g.dtype], C.DTYPE_CODES[beta.dtype], C.LAYOUTS.index(layout),
                   C.builds_backward(q, k, v, g, beta, initial_state)]
    return impl, scale, cu_seqlens, num_seqs, parts, consistency


# fields of the op's cross-rank check that a short convolution's check (lasp2.nn.short_conv.
# check_conv_ranks) holds already, with the same value, when check_call_early's are folded into it
SAME_IN_CONV_CHECK = ("batch size", "local sequence length", "split", "use of cu_seqlens")


def check_call_early(op, q, k, v, g, beta, *, per_key, initial_state, output_final_state, cu_seqlens, group,
                     split, provider, use_qk_l2norm, grad_inputs=(), cu_values=None):
    """For a module whose own collectives (the short convolutions' halos) come before the op:
    this rank's checks of the op's call (its arguments, the values of g and beta, the
    documents), raising the op's ValueError, and the fields of the op's cross-rank check
    but those in SAME_IN_CONV_CHECK, as (fields, names, host values). The module folds them
    into its ONE cross-rank check before its first collective (check_conv_ranks' `more`)
    and calls the op with the RanksChecked proof it gets, which checks neither again: one collective
    of checks per call, and a rank that fails here still takes part in it.

    q, k, v: the op's inputs or tensors of their shapes, dtype and device (values unread:
    stand-ins are fine); grad_inputs: the tensors the op's q, k, v will require grad
    through (their projections, the convolution weights); cu_values: cu_seqlens already read
    to the host (check_conv_ranks' result), read instead of it. Layout "bthd"."""
    call = _plan(op, q, k, v, g, beta, per_key, None, initial_state, output_final_state, cu_seqlens, group,
                 "bthd", split, provider, use_qk_l2norm)
    _, scale, cu_seqlens, num_seqs, parts, consistency = call
    if not consistency:  # one device: no cross-rank check, and the op checks the values itself
        return (), (), ()
    _raise_value_error(g, _C.delta_value_stats(g, beta).wait())
    if cu_seqlens is not None:  # strictly increasing (the convolutions' check allows empty documents)
        world = group_rank_and_size(group)[1]
        global_documents(op, cu_seqlens if cu_values is None else cu_values, q.shape[1] * world,
                         "")  # the check of local_documents, which the op runs after the collective
    consistency[-1] = C.builds_backward(q, k, v, g, beta, initial_state, *grad_inputs)
    # the layout is "bthd" in every module's call (left out: the row has no slot to spare)
    # left out too: "use of initial_state", which the digest of its values below covers (a
    # None digest differs from any tensor's; the module's row has no slot to spare)
    kept = [(value, name) for value, name in zip(consistency, CONSISTENCY_FIELDS)
            if name not in SAME_IN_CONV_CHECK and name not in ("layout (bthd/tbhd)", "use of initial_state")]
    return ([value for value, _ in kept], [name for _, name in kept],
            [("`scale`", float(scale)), ("`initial_state` values", tensor_bits_digest(initial_state))])


def _fla_l2norm_spelling(op: str, use_qk_l2norm, use_qk_l2norm_in_kernel) -> bool:
    """The one L2-norm flag from lasp2's spelling and fla's (`use_qk_l2norm_in_kernel`,
    None when not given): both are checked as bools, and two that disagree are an error
    rather than a silent pick (a default False of the other spelling is not a choice)."""
    if use_qk_l2norm_in_kernel is None:
        return use_qk_l2norm
    C.check_bool(op, "use_qk_l2norm_in_kernel", use_qk_l2norm_in_kernel)
    C.check_bool(op, "use_qk_l2norm", use_qk_l2norm)
    if use_qk_l2norm and not use_qk_l2norm_in_kernel:
        C.fail(op, "`use_qk_l2norm=True` and `use_qk_l2norm_in_kernel=False` disagree; pass one of them "
                   "(`use_qk_l2norm_in_kernel` is fla's name for the same flag)")
    return use_qk_l2norm_in_kernel


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "bthd",
    split: str = "contiguous",
    provider: str = "lasp2",
    use_qk_l2norm: bool = False,
    sp_context=None,
    use_qk_l2norm_in_kernel: Optional[bool] = None,
    ranks_checked=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Gated delta rule (gated DeltaNet) over a sequence that may be split across `group`.

    ``S_t = exp(g_t) (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T``,
    ``o_t = scale * S_t^T q_t``, as fla's ``chunk_gated_delta_rule`` (a call with the
    arguments both take runs unchanged; the differences: docs/fla.md). With a process
    group each rank passes its share of the sequence (``lasp2.split_sequence``) and
    gets the output rows one device would compute.

    Args:
        q, k: ``[B, T, H, Dk]`` (``layout="bthd"``) or ``[T, B, H, Dk]`` ("tbhd").
        v: the same with ``Dv``.
        g: log gates ``[B, T, H]`` (``[T, B, H]`` for "tbhd"), <= 0.
        beta: ``[B, T, H]`` in [0, 1] (e.g. ``sigmoid``).
        scale: multiplies q; default ``Dk ** -0.5``.
        initial_state: optional ``[N, H, Dk, Dv]``, N = B, or the number of documents
            with ``cu_seqlens``; sequence n starts from ``initial_state[n]`` wherever
            its first token lives. Every rank of a group passes the same values (as
            the final states it usually comes from are): ranks whose copies differ all
            raise ValueError naming `initial_state` (a CUDA state's values are read on
            the host). Its gradient on a rank is that rank's share (summed over the
            group, as the data/context-parallel gradient reduction does, it equals one
            process's; which rank holds which part differs per provider: LASP-2 / LASP-1
            give a sequence's whole gradient to the rank holding its first token,
            "ulysses" each rank its heads').
        output_final_state: also return the ``[N, H, Dk, Dv]`` end state of every
            sequence, on every rank (float32, or the dtype of ``initial_state``).
            Gradients arriving at the ranks' copies are summed (the loss is the sum of
            the ranks' losses).
        cu_seqlens: cumulative lengths of the *global* packed sequence (B = 1),
            strictly increasing from 0 to the global length.
        group, layout, split: as ``lasp2.linear_attention``; ``sp_context`` (an
            ``SPContext``) supplies group, split and cu_seqlens instead.
        provider: "lasp2" (one AllGather of part summaries per direction), "lasp1"
            (a ring of P2P state passes in global part order, plus one AllGather per
            direction for the final states when they are asked for) or "ulysses"
            (all-to-all to head sharding and back; heads divisible by the group size):
            the providers registered for this family ("gated_delta_rule" in
            lasp2.ops.providers).
        use_qk_l2norm: L2-normalise q and k over the head dim first.
        use_qk_l2norm_in_kernel: fla's name for ``use_qk_l2norm``, accepted so a call
            written for fla's ``chunk_gated_delta_rule`` / ``chunk_kda`` runs unchanged
            (pass it by keyword: fla's 9th positional argument is lasp2's ``cu_seqlens``).
            Giving both with different values is a ValueError.
        ranks_checked: internal. The ``RanksChecked`` that
            ``lasp2.nn.delta_checks.check_delta_layer_ranks`` returned for this call (it
            ran ``check_call_early`` and folded its fields into the layer's one cross-rank
            check, as lasp2.nn.GatedDeltaNet does before its convolutions' halo exchange):
            the op then runs neither the cross-rank check nor the value checks of g and
            beta again. Anything else, ``True`` included, runs them (a rank that skipped
            the check's all-gather alone would meet its peers' check with the schedule's
            collectives).

    Returns:
        ``(o, final_state)``: o with the shape of v; final_state None unless
        ``output_final_state``.
    """
    return _delta_rule("lasp2.gated_delta_rule", q, k, v, g, beta, False, scale, initial_state,
                       output_final_state, cu_seqlens, group, layout, split, provider, use_qk_l2norm,
                       sp_context, use_qk_l2norm_in_kernel, ranks_checked)


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    group: Optional[dist.ProcessGroup] = None,
    layout: str = "bthd",
    split: str = "contiguous",
    provider: str = "lasp2",
    use_qk_l2norm: bool = False,
    sp_context=None,
    use_qk_l2norm_in_kernel: Optional[bool] = None,
    ranks_checked=False,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    r"""Kimi Delta Attention: the gated delta rule with one log gate per key dim,
    ``S_t = (I - beta_t k_t k_t^T) diag(exp(g_t)) S_{t-1} + beta_t k_t v_t^T`` (the
    order of fla's KDA kernels and of Kimi Linear). ``g`` is ``[B, T, H, Dk]``
    (``[T, B, H, Dk]`` for "tbhd"); every other argument is as
    :func:`gated_delta_rule`."""
    return _delta_rule("lasp2.kda", q, k, v, g, beta, True, scale, initial_state, output_final_state,
                       cu_seqlens, group, layout, split, provider, use_qk_l2norm, sp_context,
                       use_qk_l2norm_in_kernel, ranks_checked)
