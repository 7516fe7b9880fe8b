"""One cross-rank check a call for a delta-rule layer whose short convolution all-gathers
its halo before the delta rule runs: lasp2.nn.GatedDeltaNet and megatron_patches' layers
(Lasp2CoreGatedDeltaNet, the "G" / "K" mixers).

The ranks must be checked before that all-gather, so the convolution's check
(short_conv.check_conv_ranks) takes the delta rule's own checks of the call about to be
made (gated_delta_rule.check_call_early) into its one all-gather, and the layer calls the
convolutions and the op with the RanksChecked it returns (which then check neither again;
a bare True is no proof and checks, lasp2/ops/_ranks_checked.py). Ranks
that disagree on anything either check covers all raise a ValueError naming it; a rank
whose own checks fail still sends its row, so its peers raise too.
"""

from __future__ import annotations

from lasp2.nn.short_conv import check_conv_ranks
from lasp2.ops._checks import builds_backward
from lasp2.ops._ranks_checked import RanksChecked
from lasp2.ops.gated_delta_rule import check_call_early

__all__ = ["RanksChecked", "check_delta_layer_ranks", "op_stand_ins"]


def op_stand_ins(like, heads: int, key_dim: int, value_dim: int):
    """Tensors with the shapes of the op's q, k, v [b, s, heads, dim] (b, s: like's first two
    dims) and like's dtype and device, holding no memory: for a layer whose q, k, v exist only
    after its convolution (check_call_early reads their shapes, never their values)."""
    b, s = like.shape[:2]
    one = like.new_empty(())
    return one.expand(b, s, heads, key_dim), one.expand(b, s, heads, key_dim), one.expand(b, s, heads, value_dim)


def check_delta_layer_ranks(owner: str, conv_input, channels: int, kernel_size: int, q, k, v, g, beta, *,
                            per_key: bool, group, split: str, cu_seqlens, provider: str, use_qk_l2norm: bool,
                            grad_inputs=(), initial_state=None, output_final_state: bool = False,
                            fields=(), names=()):
    """conv_input [b, s, channels]: what the convolution check reads (a module's hidden input,
    a Megatron layer's qkv); fields / names: the caller's own entries of the check (a
    module's layout). q, k, v, g, beta, initial_state, output_final_state: the op's call
    ("bthd"; q, k, v may be op_stand_ins); grad_inputs: the tensors the op's q, k, v will
    require grad through (the convolution weights, and qkv where q, k, v are stand-ins).
    Returns a RanksChecked (its cu_seqlens: the checked documents on the host, what the
    convolutions read): pass it as `ranks_checked` to the convolutions and the op."""
    op = "lasp2.kda" if per_key else "lasp2.gated_delta_rule"

    def op_checks(cu_values):
        return check_call_early(op, q, k, v, g, beta, per_key=per_key, initial_state=initial_state,
                                output_final_state=output_final_state, cu_seqlens=cu_seqlens, group=group,
                                split=split, provider=provider, use_qk_l2norm=use_qk_l2norm,
                                grad_inputs=list(grad_inputs), cu_values=cu_values)

    cu_host = check_conv_ranks(owner, conv_input, channels, kernel_size, group, split, cu_seqlens, fields, names,
                               more=op_checks)
    # the check's "building a backward" field (check_call_early's), the same on every rank
    backward = bool(builds_backward(q, k, v, g, beta, initial_state, *grad_inputs))
    return RanksChecked(group, cu_host, op, backward)
