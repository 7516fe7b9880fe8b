"""What every lasp2 layer in Megatron shares: process groups, mask and packing rules,
per-head TP slices, and the checks that keep RoPE and checkpoints right under CP.

The layers themselves live by job: megatron_patches.softmax_attention (LASP-2H core
attention), megatron_patches.linear_mixer (linear attention, "L"),
megatron_patches.gdn_mixer (gated DeltaNet "G", KDA "K").
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.process_groups_config import ProcessGroupCollection  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.utils import divide, get_pg_rank, get_pg_size  # noqa: E402

from megatron_patches.options import Lasp2ConfigError, Lasp2Options, resolve_options  # noqa: E402

__all__ = ["GRAD_SUMMED_OVER_TP", "Lasp2CoreAttentionBase", "causal_from_mask", "check_rope_layout",
           "check_self_attention_call", "cu_seqlens_of", "global_head_slice", "mark_heterogeneous_layers",
           "process_groups", "recomputes_core_attention", "repeat_kv_heads", "run_core", "sp_group_of",
           "sum_grad_over_tp", "warn_once"]

_WARNED = set()


def warn_once(key: str, message: str):
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def process_groups(pg_collection: Optional[ProcessGroupCollection]) -> ProcessGroupCollection:
    """The collection Megatron handed the module, else Megatron's global TP / CP groups."""
    if pg_collection is None:
        pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp", "cp"])
    return pg_collection


def sp_group_of(pg_collection: ProcessGroupCollection):
    """lasp2's SP group: Megatron's CP group, None when CP = 1 (one device, no collectives)."""
    return pg_collection.cp if get_pg_size(pg_collection.cp) > 1 else None


def check_ulysses_heads(options: Lasp2Options, heads_per_tp_rank: int, cp_group, layer: str) -> None:
    """provider 'ulysses' shards a layer's heads (those of this TP rank) over the CP group:
    Lasp2ConfigError naming --context-parallel-size at build time unless they divide."""
    cp = get_pg_size(cp_group)
    if options.provider == "ulysses" and heads_per_tp_rank % cp:
        raise Lasp2ConfigError(
            f"provider 'ulysses' shards heads over the CP group: heads per TP rank ({heads_per_tp_rank}) of "
            f"{layer} must be divisible by --context-parallel-size {cp}")


def repeat_kv_heads(owner: str, heads: int, k: torch.Tensor, v: torch.Tensor):
    """Grouped keys / values [s, b, groups, d] repeated to one per query head (linear attention
    takes one key per query head). Lasp2ConfigError unless the groups divide the query heads (a
    floor division repeated 3 groups to 3 of 4 heads, or 4 groups to 0 of 2)."""
    if k.dim() != 4 or v.dim() != 4 or k.shape[2] != v.shape[2]:
        raise Lasp2ConfigError(f"{owner}: k and v must be [s, b, groups, head_dim] with the same groups, got "
                               f"{list(k.shape)} and {list(v.shape)}")
    groups = k.shape[2]
    if groups == heads:
        return k, v
    if groups == 0 or heads % groups:
        raise Lasp2ConfigError(f"{owner}: q has {heads} heads but k and v have {groups}; grouped keys / values "
                               "must divide the query heads")
    rep = heads // groups
    return k.repeat_interleave(rep, dim=2), v.repeat_interleave(rep, dim=2)


def global_head_slice(num_heads: int, tp_group) -> slice:
    """The global heads this TP rank holds: [tp_rank * H/tp, (tp_rank + 1) * H/tp)."""
    tp_size, tp_rank = get_pg_size(tp_group), get_pg_rank(tp_group)
    per = divide(num_heads, tp_size)
    return slice(tp_rank * per, (tp_rank + 1) * per)


def mark_heterogeneous_layers(config, options: Lasp2Options) -> None:
    """A pattern mixing layer kinds gives layers different parameters: Megatron's distributed
    checkpoint must then key each layer separately instead of stacking them along a layer
    axis, which it does when config.hetereogenous_dist_checkpoint (megatron-core's spelling)
    is set."""
    kinds = set(options.pattern_for(config.num_layers))
    if len(kinds) > 1 and not config.hetereogenous_dist_checkpoint:
        config.hetereogenous_dist_checkpoint = True


def recomputes_core_attention(config) -> bool:
    """Megatron's selective recompute of the attention core (recompute_granularity="selective"
    with "core_attn" in recompute_modules): the mixers then checkpoint their core op."""
    return config.recompute_granularity == "selective" and "core_attn" in (config.recompute_modules or ())


def run_core(module: MegatronModule, core, *args):
    """core(*args), checkpointed (recomputed in backward) while `module` trains under
    selective recompute of the attention core (module.checkpoint_core_attention, from
    recomputes_core_attention)."""
    if module.checkpoint_core_attention and module.training:
        return tensor_parallel.checkpoint(core, False, *args)
    return core(*args)


def check_self_attention_call(owner: str, kind: str, inference_context=None, inference_params=None,
                              key_value_states=None, attention_bias=None) -> None:
    """The arguments of Megatron's self-attention call that lasp2's token mixers do not take:
    an inference context (KV cache), cross attention, an additive attention bias."""
    if inference_context is not None or inference_params is not None:
        raise Lasp2ConfigError(f"{owner}: {kind} layers do not support Megatron's inference context (KV cache)")
    if key_value_states is not None:
        raise Lasp2ConfigError(f"{owner}: self attention only (key_value_states was given)")
    if attention_bias is not None:
        raise Lasp2ConfigError(f"{owner}: {kind} layers take no attention_bias")


GRAD_SUMMED_OVER_TP = "lasp2_grad_summed_over_tp"


def sum_grad_over_tp(param: torch.Tensor, tp_group) -> None:
    """A parameter shared by heads split over TP ranks (e.g. one norm scale for every head):
    each rank's gradient covers its heads only, the true one is the sum over the TP group
    (Megatron reduces only sequence-parallel norm gradients over TP). A hook on the parameter
    sums each backward's gradient. --use-torch-fsdp2 replaces the parameter by a sharded one
    (the hooked tensor is in no graph any more), so the group is also recorded on it
    (GRAD_SUMMED_OVER_TP): megatron_patches.torch_fsdp sums those gradient shards once a step."""
    if get_pg_size(tp_group) > 1:
        param.register_hook(lambda grad: _all_reduce_sum(grad, tp_group))
        setattr(param, GRAD_SUMMED_OVER_TP, tp_group)


def _all_reduce_sum(grad: torch.Tensor, group) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad, group=group)
    return grad


def causal_from_mask(owner: str, attention_mask, mask_type: AttnMaskType) -> bool:
    """True for causal attention (a passed mask is not read, as TEDotProductAttention does
    for a causal mask type), False for no_mask without a mask; anything else raises."""
    if mask_type == AttnMaskType.causal:
        if attention_mask is not None:
            warn_once("mask", f"{owner}: attention_mask is not read (causal attention); document masking "
                              "(e.g. Megatron-LM's --reset-attention-mask) needs packed sequences with "
                              "cu_seqlens (megatron_patches.batch)")
        return True
    if mask_type == AttnMaskType.no_mask and attention_mask is None:
        return False
    raise Lasp2ConfigError(
        f"{owner}: attn_mask_type {mask_type} with attention_mask "
        f"{'given' if attention_mask is not None else 'None'} is not supported; lasp2 attention is causal "
        "(no_mask is allowed for softmax layers); mask documents with packed sequences (cu_seqlens)")


def cu_seqlens_of(owner: str, packed_seq_params, options: Lasp2Options, cp_group) -> Optional[torch.Tensor]:
    """The global cu_seqlens of a packed (THD) batch, None for unpacked batches. Under CP the
    batch must have been split the lasp2 way (megatron_patches.batch marks it)."""
    if packed_seq_params is None:
        return None
    fmt = getattr(packed_seq_params, "qkv_format", None)
    if fmt != "thd":
        raise Lasp2ConfigError(f"{owner}: packed_seq_params.qkv_format={fmt!r} is not supported; lasp2 "
                               "takes packed sequences in THD format (batch 1)")
    cu_q = packed_seq_params.cu_seqlens_q_padded
    if cu_q is None:
        cu_q = packed_seq_params.cu_seqlens_q
    cu_kv = packed_seq_params.cu_seqlens_kv_padded
    if cu_kv is None:
        cu_kv = packed_seq_params.cu_seqlens_kv
    if cu_q is None:
        raise Lasp2ConfigError(f"{owner}: packed_seq_params has no cu_seqlens_q")
    if cu_kv is not None and cu_kv is not cu_q and not torch.equal(cu_kv.cpu(), cu_q.cpu()):
        raise Lasp2ConfigError(f"{owner}: self attention needs cu_seqlens_q == cu_seqlens_kv")
    if get_pg_size(cp_group) > 1:
        split = getattr(packed_seq_params, "lasp2_split", None)
        if split != options.split:
            raise Lasp2ConfigError(
                f"{owner}: packed sequences with context parallelism must be split the lasp2 way (global "
                f"cu_seqlens, the whole packed sequence cut by the {options.split!r} split): build the batch "
                f"with megatron_patches.batch.get_packed_batch_on_this_sp_rank(..., split={options.split!r}); "
                "Megatron's THD split (TE's thd_get_partitioned_indices, each document cut separately) is "
                f"not lasp2's layout (got lasp2_split={split!r})")
    return cu_q


def check_rope_layout(options: Lasp2Options, config, cp_group, packed_seq_params) -> None:
    """Megatron slices RoPE for its zig-zag (= balanced) layout of unpacked batches; any other
    layout under CP silently rotates tokens by wrong positions unless use_lasp2_rope is on."""
    if get_pg_size(cp_group) == 1:
        return
    from megatron_patches.rope import active_rope_split

    packed = packed_seq_params is not None and getattr(packed_seq_params, "qkv_format", None) == "thd"
    needed = options.split if packed else ("contiguous" if options.split == "contiguous" else None)
    if needed is not None and active_rope_split() != needed:
        what = "packed (THD) batches" if packed else "the contiguous split"
        raise Lasp2ConfigError(
            f"RoPE under context parallelism with {what} needs megatron_patches.rope.use_lasp2_rope("
            f"{needed!r}) (Megatron's RoPE slicing assumes its own zig-zag layout of unpacked batches)")
    if packed and config.apply_rope_fusion:
        raise Lasp2ConfigError("packed batches under context parallelism need apply_rope_fusion=False: "
                               "TE's fused THD RoPE slices each document its own way")


class Lasp2CoreAttentionBase(MegatronModule):
    """megatron-core's core-attention protocol, shared by the LASP-2 and LASP-2H cores.

    Built as ``core(config=, layer_number=, attn_mask_type=, attention_type="self",
    cp_comm_type=, softmax_scale=, pg_collection=)`` (the slot of DotProductAttention in a
    SelfAttention spec) plus ``options``; called with q, k, v ``[s_local, b, heads/tp, hn]``
    (or ``[t, heads/tp, hn]`` for packed THD batches).
    """

    def __init__(self, config, layer_number: int, attn_mask_type: AttnMaskType = AttnMaskType.causal,
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
        pg_collection = process_groups(pg_collection)
        self.tp_group, self.cp_group = pg_collection.tp, pg_collection.cp
        self.layer_number = layer_number
        self.attn_mask_type = attn_mask_type
        self.softmax_scale = softmax_scale
        self.head_dim = config.kv_channels
        self.num_heads = config.num_attention_heads
        self.heads_per_partition = divide(config.num_attention_heads, get_pg_size(self.tp_group))
        dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        if dropout:
            warn_once("dropout", f"{name}: lasp2 attention has no attention dropout; attention_dropout="
                                 f"{dropout} is not applied (set it to 0 to silence this)")

    @property
    def sp_group(self):
        return self.cp_group if get_pg_size(self.cp_group) > 1 else None

    def _causal(self, attention_mask, attn_mask_type) -> bool:
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        return causal_from_mask(type(self).__name__, attention_mask, mask_type)

    def _unpack(self, query, key, value, attention_bias, packed_seq_params):
        """[s, b, h, d] views and the global cu_seqlens (None unless packed THD)."""
        name = type(self).__name__
        if attention_bias is not None:
            raise Lasp2ConfigError(f"{name}: attention_bias is not supported")
        cu_seqlens = cu_seqlens_of(name, packed_seq_params, self.options, self.cp_group)
        if cu_seqlens is None and query.dim() != 4:
            raise ValueError(f"{name}: query must be [s, b, heads, head_dim], got {list(query.shape)}")
        if query.dim() == 3:  # Attention squeezed the batch dim of THD tensors: [t, h, d]
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
        if cu_seqlens is not None and query.shape[1] != 1:
            raise Lasp2ConfigError(f"{name}: packed sequences need batch size 1, got {query.shape[1]}")
        if key.shape[0] != query.shape[0]:
            raise Lasp2ConfigError(
                f"{name}: keys and queries differ in length ({key.shape[0]} vs {query.shape[0]}); "
                "Megatron's inference KV cache is not supported by lasp2 attention")
        return query, key, value, cu_seqlens

    def _scale(self) -> float:
        return self.softmax_scale if self.softmax_scale is not None else self.head_dim ** -0.5

    def extra_repr(self) -> str:
        o = self.options
        return (f"layer={self.layer_number}, heads_per_partition={self.heads_per_partition}, "
                f"provider={o.provider}, split={o.split}")
