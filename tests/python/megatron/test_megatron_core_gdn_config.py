"""megatron_patches.core_gdn_config: megatron-core's TransformerConfig takes the gated_delta_net
variant with context_parallel_size > 1 once lasp2 runs its GDN layers, every other check kept.

The reference for "every other check kept" is megatron-core's own __post_init__: the same config
at CP 1 (which megatron-core accepts) gives the same field values, and its unrelated errors
(CP's cp_comm_type, TP's attention heads) still come from it.
"""

import dataclasses

import pytest

pytest.importorskip("megatron.core")

from megatron_patches import Lasp2ConfigError  # noqa: E402


@pytest.fixture
def config_cls(monkeypatch):
    """TransformerConfig, its original __post_init__ (and GatedDeltaNet's __init__) put back after the test."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet
    from megatron.core.transformer.transformer_config import TransformerConfig

    monkeypatch.setattr(TransformerConfig, "__post_init__", TransformerConfig.__post_init__)
    monkeypatch.setattr(GatedDeltaNet, "__init__", GatedDeltaNet.__init__)
    return TransformerConfig


def _gdn(config_cls, **overrides):
    kwargs = dict(num_layers=4, hidden_size=32, num_attention_heads=4, experimental_attention_variant="gated_delta_net",
                  linear_attention_freq=4, linear_conv_kernel_dim=4, linear_key_head_dim=8, linear_value_head_dim=8,
                  linear_num_key_heads=2, linear_num_value_heads=4, context_parallel_size=4)
    kwargs.update(overrides)
    return config_cls(**kwargs)


def _values(config):
    """Field values, callables (init methods: new objects per config) by type."""
    return {f.name: (type(v) if callable(v) else v)
            for f in dataclasses.fields(config) for v in [getattr(config, f.name)]}


def test_without_install_megatron_cores_assertion_stands(config_cls):
    from megatron_patches.core_gdn_config import core_gdn_context_parallel_allowed

    assert not core_gdn_context_parallel_allowed()
    # 0.16.1: "Gated delta net does not support context parallel ... context_parallel_size=4";
    # 0.19: "linear_num_key_heads=2 must be a multiple of (... * self.context_parallel_size=4)"
    with pytest.raises(AssertionError, match="context_parallel_size"):
        _gdn(config_cls)


@pytest.mark.parametrize("tp, cp, hk, hv", [(1, 2, 2, 4), (1, 3, 2, 4), (2, 2, 2, 6), (1, 4, 1, 1)])
def test_after_install_cp_builds_as_cp1_does(config_cls, tp, cp, hk, hv):
    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    cp1 = _values(_gdn(config_cls, tensor_model_parallel_size=tp, context_parallel_size=1,
                       linear_num_key_heads=hk, linear_num_value_heads=hv))
    allow_core_gdn_context_parallel()
    # CP 3 with 2 key heads: megatron-core 0.19 asserts heads divisible by TP x CP; lasp2 splits tokens
    config = _gdn(config_cls, tensor_model_parallel_size=tp, context_parallel_size=cp,
                  linear_num_key_heads=hk, linear_num_value_heads=hv)
    assert config.experimental_attention_variant == "gated_delta_net" and config.context_parallel_size == cp
    assert _values(config) == {**cp1, "context_parallel_size": cp}


@pytest.mark.parametrize("overrides, match", [
    (dict(linear_num_key_heads=3), r"linear_num_value_heads \(--linear-num-value-heads\) = 4 must be a multiple of "
                                   r"linear_num_key_heads \(--linear-num-key-heads\) = 3"),
    (dict(tensor_model_parallel_size=4, linear_num_key_heads=2, linear_num_value_heads=8),
     r"linear_num_key_heads \(--linear-num-key-heads\) = 2 must be divisible by "
     r"tensor_model_parallel_size \(--tensor-model-parallel-size\) = 4"),
    (dict(linear_attention_freq=None), r"needs linear_attention_freq \(--linear-attention-freq\)"),
    (dict(linear_conv_kernel_dim=None), r"linear_conv_kernel_dim \(--linear-conv-kernel-dim\) must be an int"),
    (dict(linear_value_head_dim=0), r"linear_value_head_dim \(--linear-value-head-dim\) must be an int"),
    (dict(recompute_granularity="selective", recompute_modules=["gdn_norm_out"]), "'gdn_norm_out'"),
])
def test_after_install_a_bad_gdn_config_names_the_flag(config_cls, overrides, match):
    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    allow_core_gdn_context_parallel()
    with pytest.raises(Lasp2ConfigError, match=match):
        _gdn(config_cls, **overrides)


@pytest.mark.parametrize("overrides, match", [
    (dict(linear_num_key_heads=3), r"linear_num_value_heads \(--linear-num-value-heads\) = 4 must be a multiple of"),
    (dict(tensor_model_parallel_size=4, linear_num_key_heads=2, linear_num_value_heads=8),
     r"tensor_model_parallel_size \(--tensor-model-parallel-size\) = 4"),
    (dict(linear_attention_freq=None), r"needs linear_attention_freq \(--linear-attention-freq\)"),
    (dict(linear_key_head_dim=None), r"linear_key_head_dim \(--linear-key-head-dim\) must be an int"),
    (dict(linear_num_key_heads=0), r"linear_num_key_heads \(--linear-num-key-heads\) must be an int"),
])
def test_after_install_a_bad_gdn_config_at_cp1_names_the_flag(config_cls, overrides, match):
    """Session 23: at CP 1 megatron-core's own assertions ran alone, naming config fields
    ("linear_num_key_heads must be a multiple of tensor_model_parallel_size"; 0 key heads a
    ZeroDivisionError); lasp2's flag checks now run first there too."""
    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    allow_core_gdn_context_parallel()
    with pytest.raises(Lasp2ConfigError, match=match):
        _gdn(config_cls, context_parallel_size=1, **overrides)


@pytest.mark.parametrize("overrides", [dict(linear_num_key_heads=3), dict(linear_value_head_dim=0)])
def test_the_layer_and_the_config_report_a_bad_head_layout_alike(config_cls, overrides):
    """One check (check_gdn_head_layout) serves the config and Lasp2CoreGatedDeltaNet's
    construction: the layer's message is the config's, prefixed with the layer."""
    from megatron.core.models.gpt.gpt_layer_specs import LNImpl
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.ssm.gated_delta_net import GatedDeltaNetSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_patches import Lasp2Options
    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet
    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    allow_core_gdn_context_parallel()
    with pytest.raises(Lasp2ConfigError) as from_config:
        _gdn(config_cls, **overrides)
    # CP 1: megatron-core's own config check runs; the bad values go in after it
    config = _gdn(config_cls, context_parallel_size=1, use_cpu_initialization=True)
    for field, value in overrides.items():
        setattr(config, field, value)
    submodules = GatedDeltaNetSubmodules(in_proj=ColumnParallelLinear, out_norm=LNImpl, out_proj=RowParallelLinear)
    with pytest.raises(Lasp2ConfigError) as from_layer:
        Lasp2CoreGatedDeltaNet(config, submodules, layer_number=2, pg_collection=ProcessGroupCollection(tp=None, cp=None),
                               lasp2_options=Lasp2Options())
    assert str(from_layer.value) == f"Lasp2CoreGatedDeltaNet (layer 2): {from_config.value}"


def test_after_install_other_checks_are_megatron_cores(config_cls):
    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    allow_core_gdn_context_parallel()
    with pytest.raises(AssertionError, match="cp_comm_type"):  # a CP check outside the GDN block
        _gdn(config_cls, cp_comm_type=["p2p"])
    with pytest.raises(ValueError, match="num_attention_heads"):
        _gdn(config_cls, num_attention_heads=3, tensor_model_parallel_size=2)
    # (CP 1's GDN flags: lasp2's checks first since session 23, test_..._at_cp1_names_the_flag)
    # megatron-core's check failing with the variant hidden leaves the variant in place
    config = _gdn(config_cls)
    config.cp_comm_type = ["p2p"]
    with pytest.raises(AssertionError, match="cp_comm_type"):
        config.__post_init__()
    assert config.experimental_attention_variant == "gated_delta_net"


def test_after_install_megatron_cores_own_gdn_refuses_cp(config_cls):
    """The config check was the only guard of megatron-core's GatedDeltaNet (0.16.1: no CP;
    with fla it built at CP 4 and ran each rank's tokens alone). Lasp2CoreGatedDeltaNet builds."""
    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

    allow_core_gdn_context_parallel()
    config = _gdn(config_cls)
    with pytest.raises(Lasp2ConfigError, match=r"megatron-core's GatedDeltaNet with context_parallel_size "
                                               r"\(--context-parallel-size\) = 4"):
        GatedDeltaNet(config=config, submodules=None, layer_number=1, pg_collection=None)
    with pytest.raises(Lasp2ConfigError, match="context_parallel_size"):
        GatedDeltaNet(config, None)


def test_install_is_idempotent_and_reversible(config_cls):
    from megatron_patches.core_gdn_config import (allow_core_gdn_context_parallel,
                                                  core_gdn_context_parallel_allowed, restore_core_gdn_config)

    from megatron.core.ssm.gated_delta_net import GatedDeltaNet

    original, layer_init = config_cls.__post_init__, GatedDeltaNet.__init__
    allow_core_gdn_context_parallel()
    wrapper, layer_wrapper = config_cls.__post_init__, GatedDeltaNet.__init__
    allow_core_gdn_context_parallel()
    assert config_cls.__post_init__ is wrapper and wrapper.lasp2_original is original
    assert GatedDeltaNet.__init__ is layer_wrapper and layer_wrapper.lasp2_original is layer_init
    assert core_gdn_context_parallel_allowed()
    restore_core_gdn_config()
    restore_core_gdn_config()
    assert config_cls.__post_init__ is original and not core_gdn_context_parallel_allowed()
    assert GatedDeltaNet.__init__ is layer_init
    with pytest.raises(AssertionError, match="context_parallel_size"):
        _gdn(config_cls)
