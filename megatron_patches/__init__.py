"""lasp2 in Megatron: token mixers per layer kind, layer specs, arguments, batch / RoPE helpers.

Written against megatron-core 0.16.1 and 0.19.x (another version warns at import of the modules
that use it). See docs/megatron.md.

  megatron_patches.arguments         add_lasp2_args (Megatron-LM extra_args_provider)
  megatron_patches.options           Lasp2Options (the settings, validated)
  megatron_patches.linear_mixer      Lasp2LinearMixer, Lasp2LinearCoreAttention ("L", LASP-2)
  megatron_patches.softmax_attention Lasp2SoftmaxCoreAttention, Lasp2SelfAttention ("S", LASP-2H)
  megatron_patches.gdn_mixer         Lasp2GatedDeltaNetMixer ("G", gated delta rule),
                                     Lasp2KimiDeltaAttentionMixer ("K", KDA's per-key gate)
  megatron_patches.core_gdn          Lasp2CoreGatedDeltaNet (megatron-core's own GatedDeltaNet under LASP-2)
  megatron_patches.specs             layer / hybrid block specs; lasp2_layer_spec for --spec
  megatron_patches.batch             get_batch_on_this_sp_rank, get_packed_batch_on_this_sp_rank
  megatron_patches.rope              use_lasp2_rope (contiguous split, packed sequences under CP)
  megatron_patches.linear_moe        Lasp2LinearAttention (Linear-MoE's core-linear-attention slot)
  megatron_patches.cpu               enable_cpu_execution (CPU-only test runs)

Importing this package does not import megatron; the submodules that need it do.
"""

from megatron_patches._compat import PINNED_MEGATRON_CORE
from megatron_patches.arguments import add_lasp2_args
from megatron_patches.options import Lasp2ConfigError, Lasp2Options, options_from_args, resolve_options

_LAZY = {
    "Lasp2LinearMixer": "megatron_patches.linear_mixer",
    "Lasp2LinearCoreAttention": "megatron_patches.linear_mixer",
    "Lasp2SoftmaxCoreAttention": "megatron_patches.softmax_attention",
    "Lasp2SelfAttention": "megatron_patches.softmax_attention",
    "Lasp2GatedDeltaNetMixer": "megatron_patches.gdn_mixer",
    "Lasp2KimiDeltaAttentionMixer": "megatron_patches.gdn_mixer",
    "Lasp2CoreGatedDeltaNet": "megatron_patches.core_gdn",
    "use_lasp2_core_gdn": "megatron_patches.specs",
    "get_lasp2_layer_spec": "megatron_patches.specs",
    "get_lasp2_layer_specs": "megatron_patches.specs",
    "get_lasp2_hybrid_block_spec": "megatron_patches.specs",
    "patch_layer_spec": "megatron_patches.specs",
    "get_batch_on_this_sp_rank": "megatron_patches.batch",
    "get_packed_batch_on_this_sp_rank": "megatron_patches.batch",
    "use_lasp2_rope": "megatron_patches.rope",
    "Lasp2LinearAttention": "megatron_patches.linear_moe",
    "enable_cpu_execution": "megatron_patches.cpu",
}

__all__ = ["PINNED_MEGATRON_CORE", "Lasp2ConfigError", "Lasp2Options", "add_lasp2_args", "options_from_args",
           "resolve_options", *_LAZY]


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'megatron_patches' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)
