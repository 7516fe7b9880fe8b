"""megatron-core layer / block specs of lasp2 hybrids: one token mixer per layer kind.

megatron-core (tested):

    from megatron_patches import Lasp2Options
    from megatron_patches.specs import get_lasp2_hybrid_block_spec
    opts = Lasp2Options(layer_pattern="LGLS", decay="gate")
    model = GPTModel(config, transformer_layer_spec=get_lasp2_hybrid_block_spec(config, opts), ...)

Megatron-LM (one flag; options from the --sp-* arguments of add_lasp2_args):

    pretrain_gpt.py ... --context-parallel-size 4 --spec megatron_patches.specs lasp2_layer_spec \
        --hybrid-layer-pattern LLLSLLLS --linear-attention-decay gate
    # or: python -m megatron_patches.run pretrain_gpt.py ... (see docs/megatron.md)

Every spec keeps the base spec's layer modules (norms, MLP / MoE) and its attention
builders (linear_qkv, linear_proj, q/k_layernorm) and puts in the self-attention slot:

  "L"  Lasp2LinearMixer            (megatron_patches.linear_mixer; LASP-2)
  "S"  Lasp2SelfAttention with Lasp2SoftmaxCoreAttention (megatron_patches.softmax_attention;
       LASP-2H), or with the base spec's own core attention for provider "none"
  "G"  Lasp2GatedDeltaNetMixer     (megatron_patches.gdn_mixer; gated delta rule under LASP-2)
  "K"  Lasp2KimiDeltaAttentionMixer (megatron_patches.gdn_mixer; the same with KDA's per-key gate)

so state dicts keep Megatron's names. Nothing of Megatron is forked.

megatron-core's own gated DeltaNet models (config.experimental_attention_variant ==
"gated_delta_net", Qwen3-Next style) keep their specs; use_lasp2_core_gdn rewrites one so
its GatedDeltaNet layers are megatron_patches.core_gdn.Lasp2CoreGatedDeltaNet (the same
parameters, run under LASP-2 CP), and get_lasp2_core_gdn_block_spec does that to
megatron-core's get_transformer_block_with_experimental_attention_variant_spec.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import List, Optional

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.models.gpt.gpt_layer_specs import LNImpl, get_gpt_layer_local_spec  # noqa: E402
from megatron.core.transformer.enums import AttnMaskType, LayerType  # noqa: E402
from megatron.core.transformer.identity_op import IdentityOp  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_block import (  # noqa: E402
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset  # noqa: E402

from megatron_patches.common import mark_heterogeneous_layers  # noqa: E402
from megatron_patches.gdn_mixer import (  # noqa: E402
    Lasp2GatedDeltaNetMixer,
    Lasp2GatedDeltaNetSubmodules,
    Lasp2KimiDeltaAttentionMixer,
)
from megatron_patches.linear_mixer import Lasp2LinearMixer, Lasp2LinearMixerSubmodules  # noqa: E402
from megatron_patches.options import (  # noqa: E402
    GATED_DELTANET,
    GDN_PROVIDERS,
    KDA,
    LAYER_LETTERS,
    LINEAR,
    SOFTMAX,
    Lasp2ConfigError,
    Lasp2Options,
    resolve_options,
)
from megatron_patches.softmax_attention import Lasp2SelfAttention, Lasp2SoftmaxCoreAttention  # noqa: E402

try:  # the Transformer Engine spec, where TE is installed
    import transformer_engine  # noqa: F401

    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    HAVE_TE = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_TE = False

__all__ = [
    "HAVE_TE",
    "Lasp2LayerMixer",
    "core_gdn_layer_pattern",
    "get_lasp2_core_gdn_block_spec",
    "get_lasp2_hybrid_block_spec",
    "get_lasp2_layer_spec",
    "get_lasp2_layer_specs",
    "lasp2_layer_spec",
    "mixer_spec",
    "patch_layer_spec",
    "use_lasp2_core_gdn",
]


def mixer_spec(layer_kind: str, attention: ModuleSpec, options: Optional[Lasp2Options] = None) -> ModuleSpec:
    """The self-attention-slot spec of a layer kind, built from a base SelfAttention spec
    (its linear_qkv / linear_proj / q,k_layernorm builders and params are reused)."""
    kind = LAYER_LETTERS.get(layer_kind)
    if kind is None:
        raise Lasp2ConfigError(f"layer_kind must be one of {sorted(LAYER_LETTERS)}, got {layer_kind!r}")
    sub = attention.submodules
    params = {**(attention.params or {}), "lasp2_options": options}
    params.setdefault("attn_mask_type", AttnMaskType.causal)
    if kind == LINEAR:
        return ModuleSpec(module=Lasp2LinearMixer, params=params, submodules=Lasp2LinearMixerSubmodules(
            linear_qkv=sub.linear_qkv, linear_proj=sub.linear_proj,
            q_layernorm=sub.q_layernorm, k_layernorm=sub.k_layernorm))
    if kind in (GATED_DELTANET, KDA):  # one mixer; its subclass sets KDA's per-key gate
        module = Lasp2GatedDeltaNetMixer if kind == GATED_DELTANET else Lasp2KimiDeltaAttentionMixer
        return ModuleSpec(module=module, params=params, submodules=Lasp2GatedDeltaNetSubmodules(
            in_proj=sub.linear_qkv, out_proj=sub.linear_proj))
    if resolve_options(options).provider == "none":
        core = sub.core_attention  # Megatron's own attention and context parallelism
    else:
        core = ModuleSpec(module=Lasp2SoftmaxCoreAttention, params={"options": options})
    return ModuleSpec(module=Lasp2SelfAttention, params=params,
                      submodules=dataclasses.replace(sub, core_attention=core))


class Lasp2LayerMixer:
    """The self-attention slot of a spec that serves every layer (layer_kind None): when a
    layer is built it builds the mixer of the layer's kind in the pattern (by its global
    1-based layer number, so pipeline stages need nothing else). A factory: constructing
    it returns a Lasp2LinearMixer, Lasp2SelfAttention, Lasp2GatedDeltaNetMixer or
    Lasp2KimiDeltaAttentionMixer."""

    def __new__(cls, config, submodules, layer_number: int, lasp2_options: Optional[Lasp2Options] = None,
                **kwargs):
        options = resolve_options(lasp2_options)
        kind = options.layer_kind(layer_number, config.num_layers)
        mark_heterogeneous_layers(config, options)
        base = ModuleSpec(module=cls, submodules=submodules,
                          params={"attn_mask_type": kwargs.pop("attn_mask_type", AttnMaskType.causal)})
        spec = mixer_spec(kind, base, lasp2_options)
        return build_module(spec, config=config, layer_number=layer_number, **kwargs)


def patch_layer_spec(spec: ModuleSpec, options: Optional[Lasp2Options] = None,
                     layer_kind: Optional[str] = None) -> ModuleSpec:
    """A copy of a TransformerLayer spec whose self-attention slot holds lasp2's mixer.

    Works with any spec whose self_attention is a SelfAttention spec (local, TE, MoE
    layer specs). layer_kind "L" / "S" / "G" / "K" fixes the layer's kind; None picks it from
    options.layer_pattern by layer number when the layer is built (Lasp2LayerMixer).
    options None: Megatron-LM's parsed --sp-* arguments at build time, else the defaults.
    """
    if options is not None:
        options.validate()
    spec = copy.deepcopy(spec)
    attn = getattr(getattr(spec, "submodules", None), "self_attention", None)
    if not isinstance(attn, ModuleSpec) or not hasattr(attn.submodules, "linear_qkv"):
        raise Lasp2ConfigError("patch_layer_spec needs a TransformerLayer spec with a SelfAttention "
                               "self_attention (multi-latent attention is not supported)")
    if layer_kind is None:
        params = {**(attn.params or {}), "lasp2_options": options}
        params.setdefault("attn_mask_type", AttnMaskType.causal)
        spec.submodules.self_attention = ModuleSpec(module=Lasp2LayerMixer, params=params,
                                                    submodules=attn.submodules)
    else:
        spec.submodules.self_attention = mixer_spec(layer_kind, attn, options)
    return spec


def _base_layer_spec(backend: str, **base_kwargs) -> ModuleSpec:
    if backend == "local":
        return get_gpt_layer_local_spec(**base_kwargs)
    if backend == "te":
        if not HAVE_TE:
            raise Lasp2ConfigError("backend 'te' needs Transformer Engine, which is not importable here")
        return get_gpt_layer_with_transformer_engine_spec(**base_kwargs)
    raise Lasp2ConfigError(f"backend must be 'local' or 'te', got {backend!r}")


def get_lasp2_layer_spec(options: Optional[Lasp2Options] = None, backend: str = "local",
                         layer_kind: Optional[str] = None, **base_kwargs) -> ModuleSpec:
    """A GPT TransformerLayer spec (get_gpt_layer_local_spec or the TE spec, with
    base_kwargs such as num_experts, qk_layernorm, normalization) with LASP-2 attention.

    layer_kind None makes one spec serve every layer: each layer takes its kind from
    the pattern when built (pass it as GPTModel's transformer_layer_spec).
    """
    return patch_layer_spec(_base_layer_spec(backend, **base_kwargs), options, layer_kind)


def get_lasp2_layer_specs(num_layers: int, options: Optional[Lasp2Options] = None, backend: str = "local",
                          **base_kwargs) -> List[ModuleSpec]:
    """One spec per layer of the whole model, following options.layer_pattern."""
    options = options if options is not None else Lasp2Options()
    pattern = options.validate(num_layers).pattern_for(num_layers)
    specs = {kind: get_lasp2_layer_spec(options, backend, kind, **base_kwargs) for kind in set(pattern)}
    return [specs[kind] for kind in pattern]


def get_lasp2_hybrid_block_spec(config, options: Optional[Lasp2Options] = None, backend: str = "local",
                                vp_stage: Optional[int] = None, pp_rank: Optional[int] = None,
                                **base_kwargs) -> TransformerBlockSubmodules:
    """TransformerBlockSubmodules of this pipeline stage's layers for a hybrid pattern
    (as get_gpt_decoder_block_spec slices its layers; PP and VPP layouts included).

    A pattern mixing layer kinds sets config.hetereogenous_dist_checkpoint (per-layer
    distributed-checkpoint keys; the layers' parameters differ)."""
    layer_specs = get_lasp2_layer_specs(config.num_layers, options, backend, **base_kwargs)
    mark_heterogeneous_layers(config, options if options is not None else Lasp2Options())
    return _stage_block(config, layer_specs, backend, vp_stage, pp_rank)


def _stage_block(config, layer_specs, backend: str, vp_stage, pp_rank) -> TransformerBlockSubmodules:
    """The block of this pipeline stage's layers out of the whole model's layer specs."""
    if config.pipeline_model_parallel_layout is not None:
        layout = config.pipeline_model_parallel_layout
        local = [layer_specs[i] for i in layout.get_layer_id_list(
            layer_type=LayerType.decoder, vp_stage=vp_stage, pp_rank=pp_rank)]
    else:
        offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
        count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
        local = layer_specs[offset:offset + count]
    norm = TENorm if backend == "te" else LNImpl
    return TransformerBlockSubmodules(layer_specs=local, layer_norm=norm)


def use_lasp2_core_gdn(spec, options: Optional[Lasp2Options] = None):
    """A copy of a spec (a ModuleSpec, TransformerBlockSubmodules or list of layer specs) whose
    megatron-core GatedDeltaNet modules are Lasp2CoreGatedDeltaNet with spec param
    `lasp2_options` (None: Megatron-LM's parsed --sp-* arguments at build time, else the
    defaults); the submodules (in_proj, out_norm, out_proj) and other params stay.
    Lasp2ConfigError when options has no gated-delta-rule provider (e.g. 'none': keep
    megatron-core's layer) or the spec has no GatedDeltaNet."""
    if options is not None:
        options.validate()
        if options.provider not in GDN_PROVIDERS:
            raise Lasp2ConfigError(f"use_lasp2_core_gdn: --sp-provider {options.provider!r} has no gated delta "
                                   f"rule; use {' or '.join(GDN_PROVIDERS)} (or keep megatron-core's GatedDeltaNet)")
    # imported here: megatron-core's GatedDeltaNet module is needed by these models only
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet

    spec = copy.deepcopy(spec)
    swapped = _swap_gdn(spec, options, GatedDeltaNet, Lasp2CoreGatedDeltaNet)
    if not swapped:
        raise Lasp2ConfigError("use_lasp2_core_gdn: the spec has no megatron-core GatedDeltaNet (built for "
                               "config.experimental_attention_variant='gated_delta_net' with linear_attention_freq)")
    return spec


def _swap_gdn(node, options, theirs, ours) -> int:
    """Rewrites `theirs` ModuleSpecs to `ours` in place, through submodules and layer lists; their count."""
    if isinstance(node, (list, tuple)):
        return sum(_swap_gdn(item, options, theirs, ours) for item in node)
    if isinstance(node, ModuleSpec):
        count = 0
        if node.module is theirs:
            node.module = ours
            node.params = {**(node.params or {}), "lasp2_options": options}
            count = 1
        return count + _swap_gdn(node.submodules, options, theirs, ours)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return sum(_swap_gdn(getattr(node, f.name), options, theirs, ours) for f in dataclasses.fields(node))
    return 0


def core_gdn_layer_pattern(config) -> str:
    """megatron-core's layer order of a gated DeltaNet hybrid (its get_linear_attention_pattern
    of config.linear_attention_freq and num_layers) in lasp2's letters: "G" where it builds a
    GatedDeltaNet, "S" (softmax attention) elsewhere. Lasp2ConfigError for a frequency it
    cannot use (an int < 1, a list of the wrong length or not of 0 / 1)."""
    from megatron.core.models.gpt.experimental_attention_variant_module_specs import get_linear_attention_pattern

    freq = getattr(config, "linear_attention_freq", None)
    if isinstance(freq, bool) or (isinstance(freq, int) and freq < 1):
        raise Lasp2ConfigError(f"linear_attention_freq (--linear-attention-freq) must be an int >= 1 or a list "
                               f"of 0 / 1 per layer, got {freq!r}")
    try:
        pattern = get_linear_attention_pattern(config)
    except (AssertionError, ValueError) as exc:
        raise Lasp2ConfigError(f"linear_attention_freq (--linear-attention-freq): {exc}") from None
    if any(isinstance(x, bool) or x not in (0, 1) for x in pattern):
        raise Lasp2ConfigError(f"linear_attention_freq (--linear-attention-freq) as a list holds 1 (gated "
                               f"DeltaNet) or 0 (softmax attention) per layer, got {pattern!r}")
    return "".join(GATED_DELTANET if x else SOFTMAX for x in pattern)


def get_lasp2_core_gdn_block_spec(config, options: Optional[Lasp2Options] = None, vp_stage: Optional[int] = None,
                                  pp_rank: Optional[int] = None, backend: Optional[str] = None,
                                  **base_kwargs) -> TransformerBlockSubmodules:
    """megatron-core's block spec of a gated DeltaNet hybrid (linear_attention_freq), its
    GatedDeltaNet layers under LASP-2 (use_lasp2_core_gdn).

    backend None: megatron-core's own builder (Transformer Engine only; its softmax layers are
    its TE attention). "local" or "te": the same layer order (core_gdn_layer_pattern) built
    here, the softmax layers lasp2's LASP-2H "S" layer spec of that backend and the GDN layers
    megatron-core's GatedDeltaNet spec for it. The local backend has no fused norm + linear:
    in_proj is then a column-parallel linear after the layer's own input norm, the layout
    megatron-core gives a spec whose metainfo fuse_input_layernorm is False. base_kwargs (e.g.
    num_experts: an MoE MLP in every layer) go to the local / TE layer spec; megatron-core's
    own builder reads them from config instead."""
    if getattr(config, "experimental_attention_variant", None) != "gated_delta_net":
        raise Lasp2ConfigError("get_lasp2_core_gdn_block_spec needs config.experimental_attention_variant="
                               f"'gated_delta_net', got {getattr(config, 'experimental_attention_variant', None)!r}")
    from megatron.core.models.gpt import experimental_attention_variant_module_specs as variants

    if backend is None:
        spec = variants.get_transformer_block_with_experimental_attention_variant_spec(
            config, vp_stage=vp_stage, pp_rank=pp_rank)
        return use_lasp2_core_gdn(spec, options)
    pattern = core_gdn_layer_pattern(config)
    options = resolve_options(options).replace(layer_pattern=pattern).validate(config.num_layers)
    softmax = get_lasp2_layer_spec(options, backend, SOFTMAX, **base_kwargs)
    if backend == "te":
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider as Provider
    else:
        from megatron.core.models.backends import LocalSpecProvider as Provider
    provider = Provider()
    gdn = variants.get_gated_delta_net_module_spec(config, backend=provider)
    if gdn.submodules.in_proj is None:  # no fused norm + linear in this backend
        gdn.submodules.in_proj = provider.column_parallel_linear()
        gdn.metainfo["fuse_input_layernorm"] = False
    gdn_layer = copy.deepcopy(softmax)
    gdn_layer.submodules.self_attention = gdn
    gdn_layer.submodules.input_layernorm = (
        IdentityOp if gdn.metainfo["fuse_input_layernorm"]
        else provider.layer_norm(rms_norm=config.normalization == "RMSNorm", for_qk=False))
    layer_specs = use_lasp2_core_gdn([gdn_layer if kind == GATED_DELTANET else softmax for kind in pattern], options)
    mark_heterogeneous_layers(config, options)
    return _stage_block(config, layer_specs, backend, vp_stage, pp_rank)


# Module-level specs for Megatron-LM's `--spec megatron_patches.specs <name>` (its GPT
# builder passes the object to GPTModel as transformer_layer_spec). Their options are
# read from the parsed --sp-* arguments when the model is built; each layer takes its
# kind from --hybrid-layer-pattern by its global layer number (Lasp2LayerMixer), so PP works
# unchanged.
# Normalisation (LayerNorm / RMSNorm) follows --normalization at build time in both the
# local (WrappedTorchNorm) and TE (TENorm) specs. The MoE specs use an MoE MLP in every
# layer (the expert count comes from --num-experts; only "MoE or dense" is in the spec).
lasp2_layer_spec = get_lasp2_layer_spec(None, "local")
lasp2_moe_layer_spec = get_lasp2_layer_spec(None, "local", num_experts=1)
__all__ += ["lasp2_moe_layer_spec"]
if HAVE_TE:
    lasp2_te_layer_spec = get_lasp2_layer_spec(None, "te")
    lasp2_te_moe_layer_spec = get_lasp2_layer_spec(None, "te", num_experts=1, moe_grouped_gemm=True)
    __all__ += ["lasp2_te_layer_spec", "lasp2_te_moe_layer_spec"]
