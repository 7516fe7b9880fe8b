"""TransformerConfig accepts megatron-core's gated DeltaNet variant under context parallelism
when lasp2 runs its GatedDeltaNet layers (Lasp2CoreGatedDeltaNet).

megatron-core's TransformerConfig.__post_init__ refuses experimental_attention_variant ==
"gated_delta_net" with context_parallel_size > 1 before any layer exists:

  0.16.1  `assert self.context_parallel_size == 1` (its layer has no CP), the last assertion
          of its gated_delta_net block
  0.19    linear_num_key_heads and linear_num_value_heads divisible by TP x CP (its CP moves
          the sequence to head sharding with an all-to-all)

Neither applies to Lasp2CoreGatedDeltaNet: every CP rank keeps its tokens and all of its TP
rank's heads. So Megatron-LM, which builds its config from the arguments, stopped there for
CP > 1 (Megatron-LM issues #3883, #4374).

allow_core_gdn_context_parallel() replaces TransformerConfig.__post_init__ with a wrapper.
Only a config with this variant and CP > 1 is treated differently:

  1. check_core_gdn_config: what megatron-core's gated_delta_net block checks, except CP,
     as Lasp2ConfigError naming the flag (linear_attention_freq set; check_gdn_head_layout,
     which Lasp2CoreGatedDeltaNet runs too: the five linear_* sizes set, value heads a
     multiple of key heads, key heads divisible by TP; value heads divisible by TP follows).
     0.19's selective recompute module "gdn_norm_out" (megatron-core's layer only) is
     refused here too: step 2 would otherwise report it as invalid for the variant.
  2. megatron-core's own __post_init__ with experimental_attention_variant set to None for
     its duration and restored after (also on error): every other check runs unchanged, those
     of context parallelism included. The variant is read in __post_init__ only by the
     gated_delta_net block, the "dsa" branches (not this variant) and, in 0.19, the
     "gdn_norm_out" check of step 1.

At CP 1 the variant runs step 1's flag checks but "gdn_norm_out" (check_gdn_flags: megatron-core's
assertions there name config fields, not the flags a Megatron-LM user sets), then megatron-core's
__post_init__ unchanged. Other variants and configs built before allow_... are megatron-core's alone.

The config check was megatron-core's only guard of its own GatedDeltaNet: 0.16.1's layer has
no context parallelism and at CP > 1 would run each rank's tokens as a whole sequence, without
an error. So while the config accepts CP > 1, megatron-core's GatedDeltaNet.__init__ refuses
such a config (Lasp2ConfigError naming context_parallel_size); Lasp2CoreGatedDeltaNet, which
does not run that __init__, is what lasp2's specs build (use_lasp2_core_gdn, install_core_gdn).

Idempotent; restore_core_gdn_config() puts the originals back (tests).
"""

from __future__ import annotations

from megatron_patches.options import Lasp2ConfigError

__all__ = ["allow_core_gdn_context_parallel", "check_core_gdn_config", "check_gdn_flags", "check_gdn_head_layout",
           "core_gdn_context_parallel_allowed", "restore_core_gdn_config"]

VARIANT = "gated_delta_net"
SIZES = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim", "linear_num_key_heads",
         "linear_num_value_heads")


def _flag(field: str) -> str:
    return f"{field} (--{field.replace('_', '-')})"


def check_gdn_head_layout(config, tp_size: int, where: str = "") -> None:
    """The gated_delta_net sizes and head layout that both the config (at CP > 1) and
    Lasp2CoreGatedDeltaNet (when built) need: the five linear_* sizes ints >= 1, value heads a
    multiple of key heads, key heads divisible by TP (tp_size: the config's, or the layer's TP
    group's). One function, so the two places say the same thing; `where` (the layer) prefixes
    the message."""
    prefix = f"{where}: " if where else ""
    for field in SIZES:
        value = getattr(config, field, None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise Lasp2ConfigError(f"{prefix}{_flag(field)} must be an int >= 1 for {VARIANT}, got {value!r}")
    hk, hv = config.linear_num_key_heads, config.linear_num_value_heads
    if hv % hk:
        raise Lasp2ConfigError(f"{prefix}{_flag('linear_num_value_heads')} = {hv} must be a multiple of "
                               f"{_flag('linear_num_key_heads')} = {hk} (each key head serves whole value heads)")
    if hk % tp_size:
        raise Lasp2ConfigError(f"{prefix}{_flag('linear_num_key_heads')} = {hk} must be divisible by "
                               f"{_flag('tensor_model_parallel_size')} = {tp_size} (TP splits whole heads)")


def check_gdn_flags(config) -> None:
    """What megatron-core's gated_delta_net block asserts of the flags at any CP (the frequency
    set, the head layout), as Lasp2ConfigError naming the flags: its assertions name config
    fields (and linear_num_key_heads = 0 ended in a ZeroDivisionError)."""
    if config.linear_attention_freq is None:
        raise Lasp2ConfigError(f"experimental_attention_variant {VARIANT!r} needs {_flag('linear_attention_freq')}")
    check_gdn_head_layout(config, config.tensor_model_parallel_size)


def check_core_gdn_config(config) -> None:
    """megatron-core's config checks of the gated_delta_net variant but its CP one, for
    Lasp2CoreGatedDeltaNet (whose construction runs check_gdn_head_layout again, with its TP group)."""
    check_gdn_flags(config)
    if config.recompute_granularity == "selective" and "gdn_norm_out" in (config.recompute_modules or ()):
        raise Lasp2ConfigError("recompute_modules 'gdn_norm_out' (--recompute-modules) is megatron-core's "
                               "GatedDeltaNet's; Lasp2CoreGatedDeltaNet recomputes its delta rule with 'core_attn'")


def _lasp2_runs_its_gdn(config) -> bool:
    return config.experimental_attention_variant == VARIANT and config.context_parallel_size > 1


def _transformer_config():
    from megatron.core.transformer.transformer_config import TransformerConfig

    return TransformerConfig


def core_gdn_context_parallel_allowed() -> bool:
    return getattr(_transformer_config().__post_init__, "lasp2_original", None) is not None


def allow_core_gdn_context_parallel() -> None:
    """TransformerConfig(experimental_attention_variant="gated_delta_net", context_parallel_size > 1)
    builds, checked as in the module docstring. Idempotent."""
    config_cls = _transformer_config()
    if core_gdn_context_parallel_allowed():
        return
    original = config_cls.__post_init__

    def __post_init__(self):
        if not _lasp2_runs_its_gdn(self):
            if self.experimental_attention_variant == VARIANT:  # CP 1: megatron-core's checks, the flags
                check_gdn_flags(self)                          # named first (session 23)
            return original(self)
        check_core_gdn_config(self)
        variant, self.experimental_attention_variant = self.experimental_attention_variant, None
        try:
            return original(self)
        finally:
            self.experimental_attention_variant = variant

    __post_init__.lasp2_original = original
    # MLATransformerConfig's __post_init__ calls super().__post_init__(): it gets this one too
    config_cls.__post_init__ = __post_init__
    _refuse_megatron_cores_gdn_at_context_parallel()


def _megatron_cores_gdn():
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    return GatedDeltaNet


def _refuse_megatron_cores_gdn_at_context_parallel() -> None:
    layer_cls = _megatron_cores_gdn()
    original = layer_cls.__init__
    if getattr(original, "lasp2_original", None) is not None:
        return

    def __init__(self, *args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else (args[0] if args else None)
        if config is not None and _lasp2_runs_its_gdn(config):
            raise Lasp2ConfigError(
                f"megatron-core's {type(self).__name__} with context_parallel_size (--context-parallel-size) = "
                f"{config.context_parallel_size}: the config took CP > 1 for {VARIANT} because lasp2 runs these "
                "layers; build them as Lasp2CoreGatedDeltaNet (megatron_patches.specs.use_lasp2_core_gdn, "
                "megatron_patches.run.install_core_gdn)")
        return original(self, *args, **kwargs)

    __init__.lasp2_original = original
    __init__.lasp2_inherited = "__init__" not in vars(layer_cls)  # 0.19: _GDNBase's
    layer_cls.__init__ = __init__


def restore_core_gdn_config() -> None:
    """megatron-core's own __post_init__ and GatedDeltaNet.__init__ again (configs built
    meanwhile keep their values)."""
    for cls, name in ((_transformer_config(), "__post_init__"), (_megatron_cores_gdn(), "__init__")):
        wrapper = getattr(cls, name)
        if getattr(wrapper, "lasp2_original", None) is None:
            continue
        if getattr(wrapper, "lasp2_inherited", False):
            delattr(cls, name)
        else:
            setattr(cls, name, wrapper.lasp2_original)
