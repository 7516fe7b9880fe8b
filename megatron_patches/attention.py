"""megatron-core attention modules backed by lasp2.

Core attentions (megatron-core 0.16.1's CoreAttention protocol, the slot of
DotProductAttention / TEDotProductAttention in a SelfAttention spec):

  Lasp2LinearCoreAttention   q, k, v [s_local, b, heads/tp, hn] -> lasp2.linear_attention
                             (layout "tbhd") over the CP group -> [s_local, b, heads/tp * hn]
  Lasp2SoftmaxCoreAttention  the same through lasp2.softmax_attention (LASP-2H; GQA as is)

and `Lasp2SelfAttention`, a SelfAttention that picks one of them per layer from the
hybrid pattern, projects the per-token gates of decay="gate" (`linear_gate`, a
column-parallel hidden -> heads projection built like linear_qkv) and leaves RoPE
out of linear-attention layers unless linear_rope is set. Parameter names of the
stock SelfAttention (linear_qkv, linear_proj, q/k_layernorm) are unchanged.

The sequence-parallel group is always the CP group Megatron hands the module
(pg_collection.cp, i.e. parallel_state.get_context_parallel_group()).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from typing import Optional

import torch
import torch.nn.functional as F

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.attention import SelfAttention  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.transformer.utils import (  # noqa: E402
    ensure_metadata_has_dp_cp_group,
    make_sharded_tensors_for_checkpoint,
)
from megatron.core.utils import divide, get_pg_rank, get_pg_size  # noqa: E402

import lasp2  # noqa: E402
from lasp2.nn.linear_attention import FEATURE_MAPS, lightning_log_decay  # noqa: E402
from megatron_patches.options import LINEAR, Lasp2ConfigError, Lasp2Options, resolve_options  # noqa: E402

__all__ = [
    "Lasp2LinearCoreAttention",
    "Lasp2SelfAttention",
    "Lasp2SoftmaxCoreAttention",
    "global_head_slice",
    "mark_heterogeneous_layers",
]

_WARNED = set()


def _warn_once(key: str, message: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def global_head_slice(num_heads: int, tp_group) -> slice:
    """The global heads this TP rank holds: [tp_rank * H/tp, (tp_rank + 1) * H/tp)."""
    tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    per = divide(num_heads, tp_size)
    return slice(tp_rank * per, (tp_rank + 1) * per)


def mark_heterogeneous_layers(config, options: Lasp2Options) -> None:
    """A pattern mixing linear and softmax layers gives layers different parameters
    (log_decay, output_norm_weight, linear_gate): Megatron's distributed checkpoint must
    then key each layer separately instead of stacking them along a layer axis, which
    it does when config.hetereogenous_dist_checkpoint (megatron-core's spelling) is set."""
    kinds = set(options.pattern_for(config.num_layers))
    if len(kinds) > 1 and not config.hetereogenous_dist_checkpoint:
        config.hetereogenous_dist_checkpoint = True


class _Lasp2CoreAttention(MegatronModule):
    """What both core attentions share: groups, options, mask and packing rules."""

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType,
                 attention_type: str = "self", attention_dropout: Optional[float] = None,
                 softmax_scale: Optional[float] = None, cp_comm_type: Optional[str] = None,
                 pg_collection: Optional[ProcessGroupCollection] = None,
                 options: Optional[Lasp2Options] = None):
        super().__init__(config=config)
        name = type(self).__name__
        if attention_type != "self":
            raise Lasp2ConfigError(f"{name} supports self attention only, got attention_type={attention_type!r}")
        self.options = resolve_options(options)
        if self.options.provider == "none":
            raise Lasp2ConfigError(f"{name} was built with provider 'none'; use Megatron's own core attention")
        if pg_collection is None:
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads
        self.heads_per_partition = divide(config.num_attention_heads, get_pg_size(self.tp_group))
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            _warn_once("dropout", f"{name}: lasp2 attention has no attention dropout; "
                                  f"attention_dropout={dropout} is not applied (set it to 0 to silence this)")

    # -- helpers ---------------------------------------------------------------------------------
    @property
    def sp_group(self):
        return self.cp_group if get_pg_size(self.cp_group) > 1 else None

    def _causal(self, attention_mask, attn_mask_type) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        if mask_type == AttnMaskType.causal:
            # As TEDotProductAttention does for a causal mask type, a passed mask is not read.
            if attention_mask is not None:
                _warn_once("mask", f"{type(self).__name__}: attention_mask is not read (causal attention); "
                                   "document masking (e.g. Megatron-LM's --reset-attention-mask) needs packed "
                                   "sequences with cu_seqlens (megatron_patches.batch)")
            return True
        if mask_type == AttnMaskType.no_mask and attention_mask is None:
            return False
        raise Lasp2ConfigError(
            f"{type(self).__name__}: attn_mask_type {mask_type} with attention_mask "
            f"{'given' if attention_mask is not None else 'None'} is not supported; lasp2 attention is causal "
            "(no_mask is allowed for softmax layers); mask documents with packed sequences (cu_seqlens)")

    def _unpack(self, query, key, value, packed_seq_params):
        """[s, b, h, d] views and the global cu_seqlens (None unless packed THD)."""
        if packed_seq_params is None:
            if query.dim() != 4:
                raise ValueError(f"{type(self).__name__}: query must be [s, b, heads, head_dim], "
                                 f"got {list(query.shape)}")
            return query, key, value, None
        fmt = getattr(packed_seq_params, "qkv_format", None)
        if fmt != "thd":
            raise Lasp2ConfigError(f"{type(self).__name__}: packed_seq_params.qkv_format={fmt!r} is not "
                                   "supported; lasp2 takes packed sequences in THD format (batch 1)")
        cu_q = packed_seq_params.cu_seqlens_q_padded
        if cu_q is None:
            cu_q = packed_seq_params.cu_seqlens_q
        cu_kv = packed_seq_params.cu_seqlens_kv_padded
        if cu_kv is None:
            cu_kv = packed_seq_params.cu_seqlens_kv
        if cu_q is None:
            raise Lasp2ConfigError(f"{type(self).__name__}: packed_seq_params has no cu_seqlens_q")
        if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv.cpu(), cu_q.cpu()):
            raise Lasp2ConfigError(f"{type(self).__name__}: self attention needs cu_seqlens_q == cu_seqlens_kv")
        if get_pg_size(self.cp_group) > 1:
            split = getattr(packed_seq_params, "lasp2_split", None)
            if split != self.options.split:
                raise Lasp2ConfigError(
                    f"{type(self).__name__}: packed sequences with context parallelism must be split the "
                    "lasp2 way (global cu_seqlens, the whole packed sequence cut by the "
                    f"{self.options.split!r} split): build the batch with "
                    "megatron_patches.batch.get_packed_batch_on_this_sp_rank(..., split="
                    f"{self.options.split!r}); Megatron's THD split (TE's thd_get_partitioned_indices, "
                    f"each document cut separately) is not lasp2's layout (got lasp2_split={split!r})")
        if query.dim() == 3:  # Attention squeezed the batch dim of THD tensors: [t, h, d]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        if query.shape[1] != 1:
            raise Lasp2ConfigError(f"{type(self).__name__}: packed sequences need batch size 1, "
                                   f"got {query.shape[1]}")
        return query, key, value, cu_q

    def _check_shapes(self, query, key):
        if key.shape[0] != query.shape[0]:
            raise Lasp2ConfigError(
                f"{type(self).__name__}: keys and queries differ in length ({key.shape[0]} vs {query.shape[0]}); "
                "Megatron's inference KV cache is not supported by lasp2 attention")

    def _scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    def extra_repr(self) -> str:
        o = self.options
        return (f"layer={self.layer_number}, heads_per_partition={self.heads_per_partition}, "
                f"provider={o.provider}, split={o.split}")


class Lasp2LinearCoreAttention(_Lasp2CoreAttention):
    """Causal linear attention with lasp2.linear_attention over the CP group.

    Per-head state (TP-sharded along dim 0, see sharded_state_dict):
      log_decay          [heads/tp]      decay="fixed": lightning slopes of the GLOBAL heads
                                         this TP rank holds (SP x TP equals one device)
      output_norm_weight [heads/tp, hn]  per-head RMSNorm scale (output_norm=True)
    decay="gate" reads the gates Lasp2SelfAttention projected for this forward
    (`set_gate`); used without it, the module raises.
    """

    def __init__(self, config, layer_number, attn_mask_type, attention_type="self",
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None,
                 options: Optional[Lasp2Options] = None):
        super().__init__(config, layer_number, attn_mask_type, attention_type, attention_dropout,
                         softmax_scale, cp_comm_type, pg_collection, options)
        o = self.options
        heads = global_head_slice(self.num_heads, self.tp_group)
        if o.provider == "ulysses":
            cp = get_pg_size(self.cp_group)
            if self.heads_per_partition % cp:
                raise Lasp2ConfigError(
                    f"provider 'ulysses' shards heads over the CP group: heads per TP rank "
                    f"({self.heads_per_partition}) must be divisible by --context-parallel-size {cp}")
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        if o.decay == "fixed":
            decay = lightning_log_decay(self.num_heads)[heads].to(device=device, dtype=torch.float32)
            self.log_decay = torch.nn.Parameter(decay, requires_grad=o.learnable_decay)
        else:
            self.log_decay = None
        if o.output_norm:
            self.output_norm_weight = torch.nn.Parameter(
                torch.ones(self.heads_per_partition, self.head_dim, device=device, dtype=config.params_dtype))
        else:
            self.output_norm_weight = None
        for param in (self.log_decay, self.output_norm_weight):
            if param is not None:  # sharded by head over TP (grad-norm, optimizer and checkpoint code read this)
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        self._gate = None

    def set_gate(self, gate: torch.Tensor):
        """Log gates [s, b, heads/tp] (<= 0) for the next forward (decay="gate")."""
        self._gate = gate

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise Lasp2ConfigError("Lasp2LinearCoreAttention: attention_bias is not supported")
        if not self._causal(attention_mask, attn_mask_type):
            raise Lasp2ConfigError("Lasp2LinearCoreAttention: linear attention is causal; "
                                   "attn_mask_type=no_mask is not supported")
        q, k, v, cu_seqlens = self._unpack(query, key, value, packed_seq_params)
        self._check_shapes(q, k)
        s, b, h, d = q.shape
        if k.shape[2] != h:  # GQA: linear attention takes one key per query head
            rep = h // k.shape[2]
            k, v = k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)
        feature = FEATURE_MAPS[self.options.feature_map]
        q, k = feature(q), feature(k)
        g = None
        if self.options.decay == "gate":
            g = self._gate
            if g is None:
                raise Lasp2ConfigError(
                    "Lasp2LinearCoreAttention: decay='gate' needs per-token gates; build the layer with "
                    "megatron_patches.specs (Lasp2SelfAttention projects them) or call set_gate()")
            if g.dim() == 2:  # THD: [t, heads]
                g = g.unsqueeze(1)
            if list(g.shape) != [s, b, h]:
                raise Lasp2ConfigError(f"Lasp2LinearCoreAttention: gate shape {list(g.shape)} does not match "
                                       f"[s, b, heads/tp] = {[s, b, h]}")
        o = lasp2.linear_attention(
            q, k, v, g=g, decay=self.log_decay, scale=self._scale(), group=self.sp_group, layout="tbhd",
            split=self.options.split, cu_seqlens=cu_seqlens,
            provider=self.options.provider)
        if self.output_norm_weight is not None:
            o32 = o.float()
            o32 = o32 * torch.rsqrt(o32.pow(2).mean(-1, keepdim=True) + 1e-6)
            o = (o32 * self.output_norm_weight.float()).to(o.dtype)
        return o.reshape(s, b, h * v.shape[3])

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        """log_decay and output_norm_weight are sharded over TP along the head dim."""
        state = {}
        self._save_to_state_dict(state, "", keep_vars=True)
        metadata = ensure_metadata_has_dp_cp_group(metadata)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"log_decay": 0, "output_norm_weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"])


class Lasp2SoftmaxCoreAttention(_Lasp2CoreAttention):
    """Causal softmax attention with LASP-2H (lasp2.softmax_attention) over the CP group.

    GQA is passed through (keys/values keep their groups/tp heads). No parameters.
    """

    def forward(self, query, key, value, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if attention_bias is not None:
            raise Lasp2ConfigError("Lasp2SoftmaxCoreAttention: attention_bias is not supported")
        causal = self._causal(attention_mask, attn_mask_type)
        q, k, v, cu_seqlens = self._unpack(query, key, value, packed_seq_params)
        self._check_shapes(q, k)
        s, b, h, _ = q.shape
        attend = getattr(lasp2, "softmax_attention", None)
        if attend is None:
            raise ImportError("Lasp2SoftmaxCoreAttention needs lasp2.softmax_attention (LASP-2H), "
                              "which this lasp2 build does not have")
        o = attend(q, k, v, scale=self._scale(), group=self.sp_group, layout="tbhd",
                   split=self.options.split, cu_seqlens=cu_seqlens, causal=causal,
                   backend=self.options.softmax_backend)
        return o.reshape(s, b, h * v.shape[3])


class Lasp2SelfAttention(SelfAttention):
    """SelfAttention whose core attention is LASP-2 or LASP-2H, picked per layer.

    Built by megatron-core's TransformerLayer like the stock SelfAttention, with two
    extra spec params: `lasp2_options` (None: Megatron-LM's parsed --sp-* arguments,
    else the defaults) and `layer_kind` ("L", "N" or None: the layer's character in
    the options' layer_pattern, by global 1-based layer number).

    Linear layers (kind "L"): core attention Lasp2LinearCoreAttention; with
    decay="gate" a `linear_gate` (built like linear_qkv: a column-parallel linear,
    hidden -> num_heads, TP-sharded by head; bias initialised to log(15), i.e.
    gates near 1 - 1/16) computes
    g = logsigmoid(x W + b) / gate_logit_normalizer; rotary embeddings are skipped
    unless linear_rope. Softmax layers (kind "N"): Lasp2SoftmaxCoreAttention, or the
    spec's own core attention when provider is "none".
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type=None, pg_collection=None, lasp2_options: Optional[Lasp2Options] = None,
                 layer_kind: Optional[str] = None):
        options = resolve_options(lasp2_options)
        options.validate(config.num_layers)
        kind = layer_kind if layer_kind is not None else options.layer_kind(layer_number, config.num_layers)
        if kind not in ("L", "N"):
            raise Lasp2ConfigError(f"layer_kind must be 'L' or 'N', got {kind!r}")
        if kind == LINEAR:
            if options.provider == "none":
                raise Lasp2ConfigError("provider 'none' has no linear attention (layer "
                                       f"{layer_number} is 'L'); use --sp-provider lasp2|lasp1|ulysses")
            core = functools.partial(Lasp2LinearCoreAttention, options=options)
        elif options.provider == "none":
            core = submodules.core_attention
        else:
            core = functools.partial(Lasp2SoftmaxCoreAttention, options=options)
        submodules = dataclasses.replace(submodules, core_attention=core)
        mark_heterogeneous_layers(config, options)
        kwargs = {} if cp_comm_type is None else {"cp_comm_type": cp_comm_type}
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, pg_collection=pg_collection, **kwargs)
        self.lasp2_options, self.layer_kind = options, kind
        self.linear_gate = None
        if kind == LINEAR and options.decay == "gate":
            # Same builder as linear_qkv: ColumnParallelLinear in the local spec; in the TE spec
            # TELayerNormColumnParallelLinear, whose fused input norm the layer's hidden states
            # need there (the TE layer spec has no separate input_layernorm).
            self.linear_gate = build_module(
                submodules.linear_qkv, config.hidden_size, config.num_attention_heads, config=config,
                init_method=config.init_method, gather_output=False, bias=True, skip_bias_add=False,
                is_expert=False, tp_comm_buffer_name=None, tp_group=self.pg_collection.tp)
            with torch.no_grad():
                self.linear_gate.bias.fill_(math.log(15.0))

    def _check_rope_layout(self, packed_seq_params):
        """Megatron slices RoPE for its zig-zag (= balanced) layout of unpacked batches; any other
        layout under CP silently rotates tokens by wrong positions unless use_lasp2_rope is on."""
        if get_pg_size(self.pg_collection.cp) == 1:
            return
        from megatron_patches.rope import active_rope_split

        packed = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", None) == "thd"
        split = self.lasp2_options.split
        needed = split if packed else ("contiguous" if split == "contiguous" else None)
        if needed is not None and active_rope_split() != needed:
            what = "packed (THD) batches" if packed else "the contiguous split"
            raise Lasp2ConfigError(
                f"RoPE under context parallelism with {what} needs megatron_patches.rope.use_lasp2_rope("
                f"{needed!r}) (Megatron's RoPE slicing assumes its own zig-zag layout of unpacked batches)")
        if packed and self.config.apply_rope_fusion:
            raise Lasp2ConfigError("packed batches under context parallelism need apply_rope_fusion=False: "
                                   "TE's fused THD RoPE slices each document its own way")

    def _checkpointed_attention_forward(self, query, key, value, attention_mask, rotary_pos_emb=None,
                                        attn_mask_type=None, attention_bias=None, packed_seq_params=None):
        """Selective recompute of the core attention ("core_attn"): the gates are an input of the
        checkpointed region like q, k and v, so their gradient comes out of its recompute."""
        gate = self.core_attention._gate if self.linear_gate is not None else None
        if gate is None:
            return super()._checkpointed_attention_forward(
                query, key, value, attention_mask, rotary_pos_emb=rotary_pos_emb, attn_mask_type=attn_mask_type,
                attention_bias=attention_bias, packed_seq_params=packed_seq_params)

        def custom_forward(query, key, value, gate, attention_mask, mask_type):
            self.core_attention.set_gate(gate)
            return self.core_attention(query, key, value, attention_mask,
                                       attn_mask_type=AttnMaskType(int(mask_type.item())),
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)

        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        mask_type = torch.tensor([mask_type.value], dtype=torch.int)
        return tensor_parallel.checkpoint(custom_forward, False, query, key, value, gate, attention_mask, mask_type)

    def forward(self, hidden_states, attention_mask=None, key_value_states=None, inference_context=None,
                rotary_pos_emb=None, *args, **kwargs):
        if self.layer_kind == LINEAR:
            if inference_context is not None:
                raise Lasp2ConfigError("Lasp2SelfAttention: linear-attention layers do not support "
                                       "Megatron's inference context (KV cache)")
            if not self.lasp2_options.linear_rope:
                rotary_pos_emb = None
            if self.linear_gate is not None:
                logits, _ = self.linear_gate(hidden_states)
                if logits.dtype in (torch.float16, torch.bfloat16):
                    logits = logits.float()  # gates accumulate over the sequence: fp32
                self.core_attention.set_gate(F.logsigmoid(logits) / self.lasp2_options.gate_logit_normalizer)
        if rotary_pos_emb is not None and self.lasp2_options.provider != "none":
            self._check_rope_layout(kwargs.get("packed_seq_params"))
        return super().forward(hidden_states, attention_mask, key_value_states, inference_context,
                               rotary_pos_emb, *args, **kwargs)
