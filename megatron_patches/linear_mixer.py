"""Linear-attention layers ("L") of a lasp2 model in Megatron: LASP-2 over the CP group.

  Lasp2LinearMixer          the token mixer of a TransformerLayer's self-attention slot, in the
                            style of megatron-core's GatedDeltaNet: a MegatronModule with its own
                            submodules (Lasp2LinearMixerSubmodules): in-projections (linear_qkv,
                            and linear_gate for decay="gate"), the core op, the out-projection
  Lasp2LinearCoreAttention  the core op: feature map, lasp2.linear_attention over the CP group
                            (layout "tbhd"), per-head output RMSNorm; it follows megatron-core's
                            core-attention protocol, the per-token log gates `g` being one more
                            forward argument

The gates are computed inside the mixer and passed to the core as an argument, so
activation recompute (selective "core_attn" via tensor_parallel.checkpoint, or full
layers) needs nothing special. Parameter names are those of earlier lasp2 versions
(a SelfAttention subclass): linear_qkv, linear_proj, q/k_layernorm, linear_gate,
core_attention.log_decay, core_attention.output_norm_weight, so their checkpoints load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.utils import (  # noqa: E402
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide, get_pg_size  # noqa: E402

import lasp2  # noqa: E402
from lasp2.nn.norms import rms_norm  # noqa: E402
from lasp2.ops.gates import gate_from_logits, lightning_log_decay  # noqa: E402
from lasp2.options import FEATURE_MAPS  # noqa: E402
from megatron_patches.common import (  # noqa: E402
    Lasp2CoreAttentionBase,
    check_rope_layout,
    check_self_attention_call,
    check_ulysses_heads,
    cu_seqlens_of,
    global_head_slice,
    process_groups,
    recomputes_core_attention,
    repeat_kv_heads,
    run_core,
)
from megatron_patches.options import Lasp2ConfigError, Lasp2Options, resolve_options  # noqa: E402

__all__ = ["Lasp2LinearCoreAttention", "Lasp2LinearMixer", "Lasp2LinearMixerSubmodules"]

# gates start near exp(logsigmoid(log 15) / 16): the state keeps ~1 - 1/256 per token
GATE_BIAS_INIT = math.log(15.0)


class Lasp2LinearCoreAttention(Lasp2CoreAttentionBase):
    """Causal linear attention with lasp2.linear_attention over the CP group.

    Per-head state (TP-sharded along dim 0, see sharded_state_dict):
      log_decay          [heads/tp]      decay="fixed": lightning slopes of the GLOBAL heads
                                         this TP rank holds (SP x TP equals one device)
      output_norm_weight [heads/tp, hn]  per-head RMSNorm scale (output_norm=True)
    decay="gate" takes log gates g [s, b, heads/tp] (<= 0) as a forward argument.
    """

    def __init__(self, config, layer_number, attn_mask_type=AttnMaskType.causal, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 options: Optional[Lasp2Options] = None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection, options)
        o = self.options
        check_ulysses_heads(o, self.heads_per_partition, self.cp_group, f"linear layer {layer_number}")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.log_decay = None
        if o.decay == "fixed":
            heads = global_head_slice(self.num_heads, self.tp_group)
            decay = lightning_log_decay(self.num_heads)[heads].to(device=device, dtype=torch.float32)
            self.log_decay = torch.nn.Parameter(decay, requires_grad=o.learnable_decay)
        self.output_norm_weight = None
        if o.output_norm:
            self.output_norm_weight = torch.nn.Parameter(
                torch.ones(self.heads_per_partition, self.head_dim, device=device, dtype=config.params_dtype))
        for param in (self.log_decay, self.output_norm_weight):
            if param is not None:  # sharded by head over TP (grad-norm, optimizer and checkpoint code read this)
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None, g: Optional[torch.Tensor] = None):
        name = type(self).__name__
        if not self._causal(attention_mask, attn_mask_type):
            raise Lasp2ConfigError(f"{name}: linear attention is causal; attn_mask_type=no_mask is not supported")
        q, k, v, cu_seqlens = self._unpack(query, key, value, attention_bias, packed_seq_params)
        s, b, h, _ = q.shape
        k, v = repeat_kv_heads(name, h, k, v)  # GQA: linear attention takes one key per query head
        feature = FEATURE_MAPS[self.options.feature_map]
        q, k = feature(q), feature(k)
        if (g is None) != (self.options.decay != "gate"):
            raise Lasp2ConfigError(f"{name}: decay={self.options.decay!r} "
                                   + ("needs per-token log gates g (Lasp2LinearMixer projects them)"
                                      if g is None else "takes no gates g"))
        if g is not None:
            if g.dim() == 2:  # THD: [t, heads]
                g = g.unsqueeze(1)
            if list(g.shape) != [s, b, h]:
                raise Lasp2ConfigError(f"{name}: gate shape {list(g.shape)} does not match "
                                       f"[s, b, heads/tp] = {[s, b, h]}")
        o = lasp2.linear_attention(q, k, v, g=g, decay=self.log_decay, scale=self._scale(), group=self.sp_group,
                                   layout="tbhd", split=self.options.split, cu_seqlens=cu_seqlens,
                                   provider=self.options.provider)
        if self.output_norm_weight is not None:
            o = rms_norm(o, self.output_norm_weight)
        return o.reshape(s, b, h * v.shape[3])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """log_decay and output_norm_weight are sharded over TP along the head dim."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"log_decay": 0, "output_norm_weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


@dataclass
class Lasp2LinearMixerSubmodules:
    """linear_qkv / linear_gate: column-parallel in-projections (the gate one is built with
    linear_qkv's builder when not given: in the TE spec a TELayerNormColumnParallelLinear,
    whose fused input norm the layer's hidden states need); linear_proj: row-parallel
    out-projection; q/k_layernorm: Megatron's qk_layernorm (IdentityOp without)."""

    linear_qkv: Union[ModuleSpec, type] = None
    linear_proj: Union[ModuleSpec, type] = None
    core_attention: Union[ModuleSpec, type] = Lasp2LinearCoreAttention
    linear_gate: Union[ModuleSpec, type, None] = None
    q_layernorm: Union[ModuleSpec, type] = IdentityOp
    k_layernorm: Union[ModuleSpec, type] = IdentityOp


class Lasp2LinearMixer(MegatronModule):
    """hidden [s_local, b, h] -> (output [s_local, b, h], output bias): the linear-attention
    token mixer of one layer, built and called like megatron-core's SelfAttention.

    q, k, v come from linear_qkv in Megatron's grouped layout (per query group: its
    queries, one key, one value), so linear_qkv weights mean what they mean in a softmax
    layer. decay="gate": g = logsigmoid(linear_gate(x)) / gate_logit_normalizer in fp32
    (linear_gate: hidden -> heads, bias initialised to log 15). RoPE is applied only with
    linear_rope. Spec param `lasp2_options` (None: Megatron-LM's parsed --sp-* arguments,
    else the defaults).
    """

    layer_kind = "L"

    def __init__(self, config, submodules: Lasp2LinearMixerSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type=None, pg_collection=None,
                 lasp2_options: Optional[Lasp2Options] = None, **kwargs):
        # kwargs: what megatron-core's TransformerLayer passes to its self-attention slot and
        # a mixer does not use (0.19: name=)
        super().__init__(config=config)
        options = resolve_options(lasp2_options)
        if options.provider == "none":
            raise Lasp2ConfigError(f"provider 'none' has no linear attention (layer {layer_number} is 'L'); "
                                   "use --sp-provider lasp2|lasp1|ulysses")
        self.lasp2_options, self.layer_number, self.attn_mask_type = options, layer_number, attn_mask_type
        self.pg_collection = process_groups(pg_collection)
        tp = get_pg_size(self.pg_collection.tp)
        groups = config.num_query_groups or config.num_attention_heads
        if groups % tp:
            raise Lasp2ConfigError(
                f"Lasp2LinearMixer: num_query_groups ({groups}) must be divisible by "
                f"--tensor-model-parallel-size {tp} (linear-attention layers split whole query groups)")
        self.head_dim = config.kv_channels
        self.heads_per_partition = divide(config.num_attention_heads, tp)
        self.groups_per_partition = divide(groups, tp)
        q_size, kv_size = config.num_attention_heads * self.head_dim, groups * self.head_dim
        # built in SelfAttention's order (core, out-, in-projections, qk norms, gate) so that a
        # seed gives the weights it gave earlier lasp2 versions
        self.core_attention = build_module(
            submodules.core_attention, config=config, layer_number=layer_number, attn_mask_type=attn_mask_type,
            attention_type="self", cp_comm_type=cp_comm_type, softmax_scale=config.softmax_scale,
            pg_collection=self.pg_collection, options=options)
        self.linear_proj = build_module(
            submodules.linear_proj, q_size, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name="proj", tp_group=self.pg_collection.tp)
        self.linear_qkv = build_module(
            submodules.linear_qkv, config.hidden_size, q_size + 2 * kv_size, config=config,
            init_method=config.init_method, gather_output=False, bias=config.add_bias_linear or config.add_qkv_bias,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv", tp_group=self.pg_collection.tp)
        norm = dict(hidden_size=self.head_dim, config=config, eps=config.layernorm_epsilon)
        self.q_layernorm = build_module(submodules.q_layernorm or IdentityOp, **norm)
        self.k_layernorm = build_module(submodules.k_layernorm or IdentityOp, **norm)
        self.linear_gate = None
        if options.decay == "gate":
            self.linear_gate = build_module(
                submodules.linear_gate or submodules.linear_qkv, config.hidden_size, config.num_attention_heads,
                config=config, init_method=config.init_method, gather_output=False, bias=True,
                skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None, tp_group=self.pg_collection.tp)
            with torch.no_grad():
                self.linear_gate.bias.fill_(GATE_BIAS_INIT)
        self.checkpoint_core_attention = recomputes_core_attention(config)

    def _qkv(self, hidden_states):
        """q [s, b, heads/tp, hn], k and v [s, b, groups/tp, hn] from Megatron's grouped layout."""
        mixed, _ = self.linear_qkv(hidden_states)
        per_group = self.heads_per_partition // self.groups_per_partition
        mixed = mixed.view(*mixed.shape[:2], self.groups_per_partition, (per_group + 2) * self.head_dim)
        q, k, v = torch.split(mixed, [per_group * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(*q.shape[:2], self.heads_per_partition, self.head_dim)
        return self.q_layernorm(q), self.k_layernorm(k), v

    def _rope(self, q, k, rotary_pos_emb, packed_seq_params):
        """Megatron's RoPE on q and k; THD batches are rotated as [t, h, d], as SelfAttention does."""
        cp = self.pg_collection.cp
        check_rope_layout(self.lasp2_options, self.config, cp, packed_seq_params)
        q_emb, k_emb = rotary_pos_emb if isinstance(rotary_pos_emb, tuple) else (rotary_pos_emb,) * 2
        cu = cu_seqlens_of(type(self).__name__, packed_seq_params, self.lasp2_options, cp)
        if cu is not None:
            q, k = q.squeeze(1), k.squeeze(1)
        q = apply_rotary_pos_emb(q, q_emb, config=self.config, cu_seqlens=cu, cp_group=cp)
        k = apply_rotary_pos_emb(k, k_emb, config=self.config, cu_seqlens=cu, cp_group=cp)
        return (q, k) if cu is None else (q.unsqueeze(1), k.unsqueeze(1))

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None, **kwargs):
        check_self_attention_call(type(self).__name__, "linear-attention", inference_context, inference_params,
                                  key_value_states)  # attention_bias goes to the core attention
        q, k, v = self._qkv(hidden_states)
        g = None
        if self.linear_gate is not None:
            logits, _ = self.linear_gate(hidden_states)
            g = gate_from_logits(logits, self.lasp2_options.gate_logit_normalizer)
        if self.lasp2_options.linear_rope and rotary_pos_emb is not None:
            q, k = self._rope(q, k, rotary_pos_emb, packed_seq_params)
        core_args = (q, k, v, attention_mask, attention_bias, g)

        def core(q, k, v, attention_mask, attention_bias, g):
            return self.core_attention(q, k, v, attention_mask, attn_mask_type=self.attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params, g=g)

        out = run_core(self, core, *core_args)
        return self.linear_proj(out)
