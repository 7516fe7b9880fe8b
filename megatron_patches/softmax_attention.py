"""Softmax attention layers ("S") of a lasp2 model in Megatron: LASP-2H over the CP group.

  Lasp2SoftmaxCoreAttention  megatron-core's core-attention slot (where DotProductAttention /
                             TEDotProductAttention sit in a SelfAttention spec):
                             q, k, v [s_local, b, heads/tp, hn] -> lasp2.softmax_attention
                             (layout "tbhd", GQA as is) -> [s_local, b, heads/tp * hn]
  Lasp2SelfAttention         megatron-core's SelfAttention, unchanged but for one check: under
                             CP, RoPE must be sliced for the batch layout lasp2 uses

Parameter names are the stock SelfAttention's (linear_qkv, linear_proj, q/k_layernorm).
"""

from __future__ import annotations

from typing import Optional

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402

import lasp2  # noqa: E402
from megatron_patches.common import Lasp2CoreAttentionBase, check_rope_layout  # noqa: E402
from megatron_patches.options import Lasp2Options, resolve_options  # noqa: E402

__all__ = ["Lasp2SelfAttention", "Lasp2SoftmaxCoreAttention"]


class Lasp2SoftmaxCoreAttention(Lasp2CoreAttentionBase):
    """Causal (or, for AttnMaskType.no_mask, bidirectional) softmax attention with LASP-2H
    (lasp2.softmax_attention) over the CP group. GQA keys / values keep their groups/tp
    heads. No parameters."""

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        causal = self._causal(attention_mask, attn_mask_type)
        q, k, v, cu_seqlens = self._unpack(query, key, value, attention_bias, packed_seq_params)
        s, b, h, _ = q.shape
        o = lasp2.softmax_attention(q, k, v, scale=self._scale(), group=self.sp_group, layout="tbhd",
                                    split=self.options.split, cu_seqlens=cu_seqlens, causal=causal,
                                    backend=self.options.softmax_backend)
        return o.reshape(s, b, h * v.shape[3])


class Lasp2SelfAttention(SelfAttention):
    """SelfAttention of a softmax layer in a lasp2 model.

    The spec chooses the core attention (Lasp2SoftmaxCoreAttention, or Megatron's own with
    provider "none"); this class only adds the check that RoPE under CP is sliced for the
    layout of the batch (the contiguous split and packed batches need
    megatron_patches.rope.use_lasp2_rope). Spec param `lasp2_options` (None: Megatron-LM's
    parsed --sp-* arguments, else the defaults).
    """

    layer_kind = "S"

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type=None, pg_collection=None, lasp2_options: Optional[Lasp2Options] = None,
                 **kwargs):
        # kwargs: what newer megatron-core passes on to SelfAttention (0.19: name=)
        if cp_comm_type is not None:
            kwargs["cp_comm_type"] = cp_comm_type
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, pg_collection=pg_collection, **kwargs)
        self.lasp2_options = resolve_options(lasp2_options)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        if rotary_pos_emb is not None and self.lasp2_options.provider != "none":
            check_rope_layout(self.lasp2_options, self.config, self.pg_collection.cp,
                              kwargs.get("packed_seq_params"))
        return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                               rotary_pos_emb, *args, **kwargs)
