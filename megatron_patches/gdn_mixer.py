"""Delta-rule layers of a lasp2 model in Megatron: gated DeltaNet ("G") and Kimi Delta
Attention ("K"), the gated delta rule under LASP-2.

  Lasp2GatedDeltaNetMixer  the token mixer of a TransformerLayer's self-attention slot, in the
                           style of megatron-core's GatedDeltaNet (a MegatronModule with its
                           own submodules): a column-parallel in-projection of q, k, v, the
                           output gate z and the beta / gate logits; a short causal convolution
                           of q, k, v whose halo crosses CP ranks (lasp2.nn.ShortConvolution);
                           lasp2.gated_delta_rule over the CP group (L2-normalised q, k);
                           a gated RMSNorm per head; a row-parallel out-projection
  Lasp2KimiDeltaAttentionMixer  the same layer with Kimi Linear's per-key-dim gate (lasp2.kda):
                           the one difference is the gate's width, Dk logits a head instead of one

The layer math is lasp2.nn.GatedDeltaNet's (fla's gated DeltaNet / KDA): beta = sigmoid(.),
g = -exp(A_log) softplus(. + dt_bias), with one a and dt_bias per head ("G") or per key dim
of each head ("K": g [.., H, Dk], dt_bias [H * Dk]). Heads and head dims are the model's
attention heads and kv_channels (keys and values share them); the convolution width is
config.linear_conv_kernel_dim (Megatron's name, default 4).

Tensor parallelism splits heads: the in-projection's output is laid out head by head
([q_h, k_h, v_h, z_h, beta_h, a_h] for each head h; a_h holds Dk logits for "K"), so its
column-parallel split, the convolution's channels and A_log / dt_bias (TP-sharded along
dim 0, global shapes in distributed checkpoints) hold whole heads of this TP rank; the
output norm's scale is shared by all heads, so its gradient is summed over the TP group.
The same seed gives every TP layout the same (sliced) weights.

The provider is --sp-provider: "lasp2", "lasp1" or "ulysses" (the all-to-all over heads
of lasp2.gated_delta_rule and lasp2.kda; it takes either split, and this TP rank's heads
must divide by the CP size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.utils import (  # noqa: E402
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide, get_pg_size  # noqa: E402

import lasp2  # noqa: E402
from lasp2.nn.gated_deltanet import GatedRMSNorm, beta_from_logits, delta_log_gate, init_gate_parameters  # noqa: E402
from lasp2.nn.delta_checks import check_delta_layer_ranks, op_stand_ins  # noqa: E402
from lasp2.nn.short_conv import ShortConvolution  # noqa: E402
from megatron_patches.common import (  # noqa: E402
    check_self_attention_call,
    check_ulysses_heads,
    cu_seqlens_of,
    global_head_slice,
    process_groups,
    recomputes_core_attention,
    run_core,
    sp_group_of,
    sum_grad_over_tp,
)
from megatron_patches.options import (  # noqa: E402
    GATED_DELTANET,
    GDN_PROVIDERS,
    KDA,
    Lasp2ConfigError,
    Lasp2Options,
    resolve_options,
)

__all__ = ["Lasp2GatedDeltaNetMixer", "Lasp2GatedDeltaNetSubmodules", "Lasp2KimiDeltaAttentionMixer"]


@dataclass
class Lasp2GatedDeltaNetSubmodules:
    """in_proj: column-parallel (the base spec's linear_qkv builder: in the TE spec it fuses
    the layer's input norm); out_proj: row-parallel; out_norm: RMSNorm over the head dim
    times silu(z)."""

    in_proj: Union[ModuleSpec, type] = None
    out_proj: Union[ModuleSpec, type] = None
    out_norm: Union[ModuleSpec, type] = GatedRMSNorm


class Lasp2GatedDeltaNetMixer(MegatronModule):
    """hidden [s_local, b, h] -> (output [s_local, b, h], output bias): one gated DeltaNet
    layer over the CP group, built and called like megatron-core's SelfAttention /
    GatedDeltaNet. Spec param `lasp2_options` (None: Megatron-LM's parsed --sp-*
    arguments, else the defaults). The class attributes say the gate's kind (a subclass
    changes them and nothing else: Lasp2KimiDeltaAttentionMixer)."""

    layer_kind = GATED_DELTANET
    per_key_gate = False  # one log gate a head and token (lasp2.gated_delta_rule)
    kind_name = "gated DeltaNet"

    def __init__(self, config, submodules: Lasp2GatedDeltaNetSubmodules, layer_number: int,
                 attn_mask_type=AttnMaskType.causal, cp_comm_type=None, pg_collection=None,
                 lasp2_options: Optional[Lasp2Options] = None, **kwargs):
        super().__init__(config=config)
        options = resolve_options(lasp2_options)
        self.lasp2_options, self.layer_number = options, layer_number
        self.pg_collection = process_groups(pg_collection)
        if options.provider not in GDN_PROVIDERS:
            raise Lasp2ConfigError(f"{self.kind_name} ({self.layer_kind!r}) layers run under --sp-provider "
                                   f"{' or '.join(GDN_PROVIDERS)}, got {options.provider!r} (layer {layer_number})")
        tp_group = self.pg_collection.tp
        self.head_dim = config.kv_channels
        self.num_heads = divide(config.num_attention_heads, get_pg_size(tp_group))  # this TP rank's
        check_ulysses_heads(options, self.num_heads, self.pg_collection.cp, f"{self.kind_name} layer {layer_number}")
        H, D = self.num_heads, self.head_dim
        self.gate_width = D if self.per_key_gate else 1  # gate logits a head
        heads = global_head_slice(config.num_attention_heads, tp_group)
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": device, "dtype": config.params_dtype}
        self.in_proj = build_module(
            submodules.in_proj, config.hidden_size, config.num_attention_heads * (4 * D + 1 + self.gate_width),
            config=config, init_method=config.init_method, gather_output=False, bias=config.add_bias_linear,
            skip_bias_add=False, is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group)
        # the whole model's convolution and gate parameters are drawn (the same random numbers
        # for every TP layout), this rank keeps its heads
        width = getattr(config, "linear_conv_kernel_dim", None)
        width = 4 if width is None else width  # megatron-core's default; 0 is not a width (it became 4)
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise Lasp2ConfigError(f"{type(self).__name__}: config.linear_conv_kernel_dim (the short convolution's "
                                   f"width) must be an int >= 1, got {width!r} (layer {layer_number})")
        self.conv = ShortConvolution(config.num_attention_heads * 3 * D, width, **factory)
        self.conv.weight = torch.nn.Parameter(self.conv.weight.detach().view(-1, 3 * D, self.conv.kernel_size)[heads]
                                              .reshape(H * 3 * D, self.conv.kernel_size).clone())
        A_log, dt_bias = init_gate_parameters(config.num_attention_heads,
                                              config.num_attention_heads * self.gate_width, **factory)
        dt_bias = dt_bias.view(config.num_attention_heads, self.gate_width)[heads].reshape(-1)  # [H * width]
        self.A_log, self.dt_bias = torch.nn.Parameter(A_log[heads].clone()), torch.nn.Parameter(dt_bias.clone())
        for param in (self.conv.weight, self.A_log, self.dt_bias):
            set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        self.out_norm = build_module(submodules.out_norm, D, eps=config.layernorm_epsilon, **factory)
        for param in self.out_norm.parameters():  # one scale for every head
            sum_grad_over_tp(param, tp_group)
        self.out_proj = build_module(
            submodules.out_proj, config.num_attention_heads * D, config.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=config.add_bias_linear, input_is_parallel=True,
            skip_bias_add=True, is_expert=False, tp_comm_buffer_name=None, tp_group=tp_group)
        self.checkpoint_core_attention = recomputes_core_attention(config)

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """Distributed-checkpoint view: the projections shard themselves; conv.weight, A_log and
        dt_bias are sharded over TP by head (dim 0); out_norm is replicated."""
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        groups = dict(tp_group=self.pg_collection.tp, dp_cp_group=metadata["dp_cp_group"])
        state = {}
        for name in ("in_proj", "out_proj"):
            state.update(getattr(self, name).sharded_state_dict(f"{prefix}{name}.", sharded_offsets, metadata))
        own = {}
        self._save_to_state_dict(own, "", keep_vars=True)
        state.update(make_sharded_tensors_for_checkpoint(own, prefix, {"A_log": 0, "dt_bias": 0},
                                                         sharded_offsets, **groups))
        for name, axis_map in (("conv", {"weight": 0, "bias": 0}), ("out_norm", {})):
            state.update(make_sharded_tensors_for_checkpoint(
                getattr(self, name).state_dict(prefix="", keep_vars=True), f"{prefix}{name}.", axis_map,
                sharded_offsets, **groups))
        return state

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, rotary_pos_cos=None, rotary_pos_sin=None, rotary_pos_cos_sin=None,
                attention_bias=None, packed_seq_params=None, sequence_len_offset=None, *,
                inference_params=None, **kwargs):
        """RoPE and the attention mask are not read (the recurrence is causal and
        position-aware; documents come from packed_seq_params)."""
        name = type(self).__name__
        check_self_attention_call(name, self.kind_name, inference_context, inference_params, key_value_states,
                                  attention_bias)
        o = self.lasp2_options
        cp = self.pg_collection.cp
        cu_seqlens = cu_seqlens_of(name, packed_seq_params, o, cp)
        group = sp_group_of(self.pg_collection)
        H, D, W = self.num_heads, self.head_dim, self.gate_width
        mixed, _ = self.in_proj(hidden_states)                       # [s, b, H * (4D + 1 + W)]
        s, b = mixed.shape[:2]
        mixed = mixed.transpose(0, 1).reshape(b, s, H, 4 * D + 1 + W)  # lasp2's "bthd"
        qkv, z, beta_logit, a = torch.split(mixed, [3 * D, D, 1, W], dim=-1)
        qkv = qkv.reshape(b, s, H * 3 * D)
        beta = beta_from_logits(beta_logit.squeeze(-1))
        # "K": g [b, s, H, Dk], one gate a key dim; "G": g [b, s, H]
        g = delta_log_gate(a if self.per_key_gate else a.squeeze(-1), self.A_log, self.dt_bias, self.per_key_gate)
        # ONE cross-rank check a call, before the halo all-gather: the convolution's and the delta rule's
        checked = check_delta_layer_ranks(
            name, qkv, qkv.shape[-1], self.conv.kernel_size, *op_stand_ins(qkv, H, D, D), g, beta,
            per_key=self.per_key_gate, group=group, split=o.split, cu_seqlens=cu_seqlens, provider=o.provider,
            use_qk_l2norm=True, grad_inputs=[qkv, *self.conv.parameters()])
        qkv = self.conv(qkv, group=group, split=o.split, cu_seqlens=checked.cu_seqlens, ranks_checked=checked)
        q, k, v = torch.split(qkv.view(b, s, H, 3 * D), [D, D, D], dim=-1)
        op = lasp2.kda if self.per_key_gate else lasp2.gated_delta_rule

        def delta_rule(q, k, v, g, beta):
            return op(q, k, v, g, beta, cu_seqlens=cu_seqlens, group=group, split=o.split, provider=o.provider,
                      use_qk_l2norm=True, ranks_checked=checked)[0]

        out = run_core(self, delta_rule, q, k, v, g, beta)
        out = self.out_norm(out, z).reshape(b, s, H * D).transpose(0, 1)
        return self.out_proj(out)


class Lasp2KimiDeltaAttentionMixer(Lasp2GatedDeltaNetMixer):
    """Kimi Delta Attention ("K"): Lasp2GatedDeltaNetMixer with Kimi Linear's per-key-dim
    gate g [.., H, Dk] = -exp(A_log[h]) softplus(a + dt_bias[h * Dk + i]) (lasp2.kda);
    dt_bias has Dk entries a head (global shape [heads * kv_channels])."""

    layer_kind = KDA
    per_key_gate = True
    kind_name = "KDA"
