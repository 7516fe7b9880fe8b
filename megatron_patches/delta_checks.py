"""One cross-rank check a call for megatron_patches' delta-rule layers (Lasp2CoreGatedDeltaNet,
Lasp2GatedDeltaNetMixer, Lasp2KimiDeltaAttentionMixer), as lasp2.nn.GatedDeltaNet makes.

Their short convolution all-gathers its halo before the delta rule runs, so the ranks must be
checked before that: the convolution's check (lasp2.nn.short_conv.check_conv_ranks) takes the
delta rule's own checks of the call about to be made (lasp2.ops.gated_delta_rule.
check_call_early) into its one all-gather, and the layer calls the op with ranks_checked=True
(which then checks neither again). Ranks that disagree on anything either check covered all
raise a ValueError naming it; a rank whose own checks fail still sends its row.
"""

from __future__ import annotations

from lasp2.nn.short_conv import check_conv_ranks
from lasp2.ops.gated_delta_rule import check_call_early

__all__ = ["check_delta_layer_ranks"]


def check_delta_layer_ranks(owner: str, qkv, conv_params, kernel_size: int, g, beta, *, heads: int, key_dim: int,
                            value_dim: int, per_key: bool, group, split: str, cu_seqlens, provider: str,
                            use_qk_l2norm: bool):
    """qkv: the convolution's input [b, s, channels]; g, beta: the op's; heads, key_dim,
    value_dim: the op's q, k, v [b, s, heads, dim] after the convolution (q and k repeated
    to the value heads where there are fewer key heads). Returns the checked cu_seqlens on
    the host, what the convolution reads (with ranks_checked=True)."""
    b, s = qkv.shape[:2]
    like = qkv.new_empty(())  # stand-ins of the op's q, k, v: their shapes, dtype and device, no memory

    def op_checks(cu_values):
        return check_call_early(
            "lasp2.kda" if per_key else "lasp2.gated_delta_rule", like.expand(b, s, heads, key_dim),
            like.expand(b, s, heads, key_dim), like.expand(b, s, heads, value_dim), g, beta, per_key=per_key,
            initial_state=None, output_final_state=False, cu_seqlens=cu_seqlens, group=group, split=split,
            provider=provider, use_qk_l2norm=use_qk_l2norm, grad_inputs=[qkv, *conv_params], cu_values=cu_values)

    return check_conv_ranks(owner, qkv, qkv.shape[-1], kernel_size, group, split, cu_seqlens, more=op_checks)
