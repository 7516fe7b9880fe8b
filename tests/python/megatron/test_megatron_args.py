"""add_lasp2_args, Lasp2Options validation, spec building, the batch and RoPE helpers
(one process, no process group)."""

import argparse
import re
import sys
import types

import pytest
import torch

pytest.importorskip("megatron.core")

import lasp2  # noqa: E402
from megatron_patches import Lasp2ConfigError, Lasp2Options, add_lasp2_args, options_from_args  # noqa: E402
from megatron_patches.options import resolve_options  # noqa: E402


def parse(*argv, parser=None):
    return add_lasp2_args(parser or argparse.ArgumentParser()).parse_args(list(argv))


# -- arguments ---------------------------------------------------------------------------------


def test_defaults_are_the_options_defaults():
    assert options_from_args(parse()) == Lasp2Options()
    assert Lasp2Options().split == "balanced"  # Megatron's own batch / RoPE layout


def test_every_flag_parses():
    args = parse("--sp-provider", "lasp1", "--sp-split", "contiguous", "--hybrid-layer-pattern", "LLLN",
                 "--linear-attention-decay", "fixed", "--linear-attention-feature-map", "elu",
                 "--linear-attention-output-norm", "false", "--linear-attention-gate-normalizer", "8",
                 "--linear-attention-learnable-decay", "--linear-attention-rope", "true",
                 "--sp-softmax-backend", "plain")
    assert options_from_args(args) == Lasp2Options(
        provider="lasp1", split="contiguous", layer_pattern="LLLN", decay="fixed", feature_map="elu",
        output_norm=False, gate_logit_normalizer=8.0, learnable_decay=True, linear_rope=True,
        softmax_backend="plain")


def test_chunk_size_flag_is_gone():
    """chunk_size is a detail of lasp2's CPU kernels, not a knob (it did nothing on GPUs)."""
    with pytest.raises(SystemExit):
        parse("--sp-chunk-size", "32")
    with pytest.raises(TypeError):
        Lasp2Options(chunk_size=32)


def test_extra_args_provider_protocol_returns_the_parser():
    parser = argparse.ArgumentParser()
    assert add_lasp2_args(parser) is parser
    assert any(g.title == "lasp2" for g in parser._action_groups)


def test_one_pattern_flag_when_megatron_defines_hybrid_layer_pattern():
    """Megatron-LM 0.17+ has its own --hybrid-layer-pattern: lasp2 adds no second flag and reads
    Megatron's, whose attention symbol "*" is lasp2's softmax letter "S"."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hybrid-layer-pattern", dest="hybrid_layer_pattern", default=None)
    args = parse("--hybrid-layer-pattern", "L*LN", parser=parser)
    assert sum(a.dest == "hybrid_layer_pattern" for a in parser._actions) == 1
    assert options_from_args(args).layer_pattern == "LSLS"
    with pytest.raises(SystemExit):  # no lasp2 spelling of its own
        parser.parse_args(["--lasp2-layer-pattern", "LL"])


@pytest.mark.parametrize("argv", [["--sp-provider", "ring"], ["--sp-split", "zigzag"],
                                  ["--linear-attention-decay", "alibi"], ["--linear-attention-output-norm", "maybe"]])
def test_bad_flag_values_are_rejected_by_argparse(argv, capsys):
    with pytest.raises(SystemExit):
        parse(*argv)


# -- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(provider="ring"), "provider"),
    (dict(split="zigzag"), "split"),
    (dict(decay="alibi"), "decay"),
    (dict(feature_map="hedgehog"), "feature_map"),
    (dict(layer_pattern="LLXN"), "layer letters.*got 'LLXS' \\(from 'LLXN'"),
    (dict(layer_pattern=""), "non-empty"),
    (dict(provider="ulysses"), "supports split='contiguous' only"),  # balanced is the default
    (dict(provider="none", layer_pattern="LN"), "no linear attention"),
    (dict(layer_pattern="LMLS"), "got 'LMLS'"),  # Megatron's Mamba letter: no lasp2 layer
    (dict(provider="none", layer_pattern="GS"), "no linear attention, gated DeltaNet or KDA"),
    # KDA layers under a provider lasp2.kda lacks: the pattern check names the letter
    (dict(provider="none", layer_pattern="KS"), "no linear attention, gated DeltaNet or KDA"),
    (dict(layer_pattern="LQS"), r"layer letters \(.*'K' Kimi Delta Attention \(KDA, per-key gate\)\)"),
    # ulysses of linear attention takes the contiguous split only; the G layers' would take both
    (dict(provider="ulysses", layer_pattern="GLS"),
     r"split \(--sp-split\) 'balanced': provider 'ulysses' supports split='contiguous' only for linear "
     r"attention \(LASP-2\) \('L'\) layers"),
    (dict(provider="ulysses", layer_pattern="KLS"), r"only for linear attention \(LASP-2\) \('L'\) layers"),
    (dict(gate_logit_normalizer=0.0), "gate_logit_normalizer"),
    # session 18: an infinite normaliser (every gate 1) and a string were taken (the string
    # raised TypeError from a comparison); strings for the switches are truthy, so
    # output_norm="false" turned the norm on
    (dict(gate_logit_normalizer=float("inf")), "gate_logit_normalizer .* finite number > 0, got inf"),
    (dict(gate_logit_normalizer="16"), "gate_logit_normalizer .* finite number > 0, got '16'"),
    (dict(output_norm="false"), r"output_norm \(--linear-attention-output-norm\) must be True or False"),
    (dict(linear_rope="no"), r"linear_rope \(--linear-attention-rope\) must be True or False"),
    (dict(learnable_decay=1), r"learnable_decay \(--linear-attention-learnable-decay\) must be True or False"),
    # session 22: Megatron's own context parallelism (TE's attention) takes its zig-zag layout
    # only; contiguous chunks under it mask the wrong tokens without an error (CP > 1)
    (dict(provider="none", split="contiguous"),
     r"split \(--sp-split\) 'contiguous': provider 'none' .*--sp-split balanced"),
    # session 22: a learnable decay under decay gate / none was dropped without a word
    (dict(learnable_decay=True, decay="gate"),
     r"learnable_decay \(--linear-attention-learnable-decay\) trains the fixed decays: .*--linear-attention-decay"
     r"\) fixed, got 'gate'"),
    (dict(learnable_decay=True, decay="none"), r"--linear-attention-decay\) fixed, got 'none'"),
    # session 22: switches of the linear (L) layers in a pattern without one were dropped
    (dict(layer_pattern="GGKS", learnable_decay=True),
     r"learnable_decay \(--linear-attention-learnable-decay\) acts on linear attention \('L'\) layers only; "
     r"the pattern 'GGKS' has none"),
    (dict(layer_pattern="GS", linear_rope=True), r"linear_rope \(--linear-attention-rope\) acts on .*'GS' has none"),
    # session 22: provider none runs Megatron's own attention, which never reads the backend
    (dict(provider="none", softmax_backend="plain"),
     r"softmax_backend \(--sp-softmax-backend\) 'plain' chooses LASP-2H's kernels: provider 'none'"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(Lasp2ConfigError, match=match):
        Lasp2Options(**kwargs)


def test_gated_deltanet_layers_take_every_provider_of_lasp2_gated_delta_rule():
    from lasp2.ops.gated_delta_rule import FAMILY
    from lasp2.ops.providers import provider_names
    from megatron_patches.options import GDN_PROVIDERS

    assert GDN_PROVIDERS == provider_names(FAMILY) == ("lasp2", "lasp1", "ulysses")
    # without linear layers ulysses takes Megatron's balanced split (lasp2.gated_delta_rule's does)
    assert Lasp2Options(provider="ulysses", layer_pattern="GSG").split == "balanced"
    assert Lasp2Options(provider="ulysses", split="contiguous", layer_pattern="LGSG").validate(4)
    args = parse("--sp-provider", "ulysses", "--hybrid-layer-pattern", "G*G")
    assert options_from_args(args) == Lasp2Options(provider="ulysses", layer_pattern="GSG")
    # KDA layers are the same family (lasp2.kda): every provider, ulysses with either split
    for provider in GDN_PROVIDERS:
        assert Lasp2Options(provider=provider, layer_pattern="KKKS").validate(4)
    args = parse("--sp-provider", "lasp1", "--hybrid-layer-pattern", "KKK*")
    assert options_from_args(args) == Lasp2Options(provider="lasp1", layer_pattern="KKKS")


def test_lasp1_takes_the_balanced_split():
    assert Lasp2Options(provider="lasp1").split == "balanced"  # the ring follows the global part order


def test_pattern_length_must_match_the_model():
    opts = Lasp2Options(layer_pattern="LLLN")
    assert opts.validate(4) is opts
    with pytest.raises(Lasp2ConfigError, match="has 4 characters but the model has num_layers=8"):
        opts.validate(8)
    assert [opts.layer_kind(i, 4) for i in range(1, 5)] == ["L", "L", "L", "S"]
    assert Lasp2Options().pattern_for(3) == "LLL"
    assert Lasp2Options(provider="none").pattern_for(2) == "SS"
    assert Lasp2Options(layer_pattern="L*G|N").layer_pattern == "LSGS"  # Megatron's spellings, "|" dropped


def test_options_come_from_megatron_lm_args(monkeypatch):
    """Megatron-LM path: no explicit options -> the parsed --sp-* arguments."""
    assert resolve_options() == Lasp2Options()  # no megatron.training here
    training = types.ModuleType("megatron.training")
    global_vars = types.ModuleType("megatron.training.global_vars")
    global_vars._GLOBAL_ARGS = parse("--hybrid-layer-pattern", "LN", "--linear-attention-decay", "none")
    training.global_vars = global_vars
    monkeypatch.setitem(sys.modules, "megatron.training", training)
    monkeypatch.setitem(sys.modules, "megatron.training.global_vars", global_vars)
    assert resolve_options() == Lasp2Options(layer_pattern="LN", decay="none")
    explicit = Lasp2Options(decay="gate")
    assert resolve_options(explicit) is explicit


# -- specs -------------------------------------------------------------------------------------


def test_layer_specs_follow_the_pattern():
    from megatron.core.transformer.attention import SelfAttention

    from megatron_patches.gdn_mixer import Lasp2GatedDeltaNetMixer, Lasp2KimiDeltaAttentionMixer
    from megatron_patches.linear_mixer import Lasp2LinearMixer
    from megatron_patches.softmax_attention import Lasp2SelfAttention, Lasp2SoftmaxCoreAttention
    from megatron_patches.specs import get_lasp2_layer_specs

    opts = Lasp2Options(layer_pattern="LLNGK")
    specs = get_lasp2_layer_specs(5, opts)
    attn = [s.submodules.self_attention for s in specs]
    assert [a.module.layer_kind for a in attn] == list("LLSGK")  # "N" is read as lasp2's "S"
    assert [a.module for a in attn] == [Lasp2LinearMixer, Lasp2LinearMixer, Lasp2SelfAttention,
                                        Lasp2GatedDeltaNetMixer, Lasp2KimiDeltaAttentionMixer]
    assert [a.module.per_key_gate for a in attn[3:]] == [False, True]
    assert issubclass(Lasp2SelfAttention, SelfAttention)
    assert attn[2].submodules.core_attention.module is Lasp2SoftmaxCoreAttention
    assert all(a.params["lasp2_options"] is opts for a in attn)
    with pytest.raises(Lasp2ConfigError, match="num_layers=4"):
        get_lasp2_layer_specs(4, opts)


def test_patch_layer_spec_keeps_the_base_modules():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from megatron_patches.specs import patch_layer_spec

    base = get_gpt_layer_local_spec(num_experts=4)
    patched = patch_layer_spec(base, Lasp2Options(), layer_kind="L")
    assert patched.submodules.mlp.module is base.submodules.mlp.module  # MoE kept
    old, new = base.submodules.self_attention, patched.submodules.self_attention
    assert new.submodules.linear_qkv is old.submodules.linear_qkv
    assert new.submodules.linear_proj is old.submodules.linear_proj
    assert old.module.__name__ == "SelfAttention"  # the base spec is not modified
    with pytest.raises(Lasp2ConfigError, match="multi-latent"):
        patch_layer_spec(get_gpt_layer_local_spec(multi_latent_attention=True))


def test_hybrid_block_spec_slices_pipeline_stages():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_hybrid_block_spec

    config = TransformerConfig(num_layers=4, hidden_size=64, num_attention_heads=4, pipeline_model_parallel_size=2,
                               pipeline_dtype=torch.float32, use_cpu_initialization=True)
    opts = Lasp2Options(layer_pattern="LNNL")
    for pp_rank, kinds in ((0, "LS"), (1, "SL")):
        block = get_lasp2_hybrid_block_spec(config, opts, pp_rank=pp_rank)
        assert "".join(s.submodules.self_attention.module.layer_kind for s in block.layer_specs) == kinds
    assert config.hetereogenous_dist_checkpoint  # mixed layers are keyed per layer in checkpoints


def test_module_level_spec_for_megatron_lm():
    """`--spec megatron_patches.specs lasp2_layer_spec` is resolved with Megatron's import_module."""
    from megatron.core.transformer.spec_utils import ModuleSpec, import_module

    spec = import_module(("megatron_patches.specs", "lasp2_layer_spec"))
    assert isinstance(spec, ModuleSpec)
    from megatron_patches.specs import Lasp2LayerMixer

    attn = spec.submodules.self_attention
    assert attn.module is Lasp2LayerMixer  # builds each layer's mixer by its number in the pattern
    assert attn.params["lasp2_options"] is None  # read from Megatron-LM's parsed arguments at build time


# -- batch and RoPE helpers --------------------------------------------------------------------


class _Group:
    """Stands in for a process group where only rank() / size() are read."""

    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


@pytest.mark.parametrize("split", ["balanced", "contiguous"])
def test_batch_split(split):
    from megatron_patches.batch import get_batch_on_this_sp_rank

    tokens = torch.arange(16)[None].repeat(2, 1)
    batch = {"tokens": tokens, "labels": tokens + 100, "loss_mask": None, "attention_mask": torch.rand(2, 1, 16, 16)}
    pieces = [get_batch_on_this_sp_rank(batch, split, cp_group=_Group(r, 2)) for r in range(2)]
    for r, piece in enumerate(pieces):
        index = lasp2.global_token_index(8, r, 2, split)
        assert torch.equal(piece["tokens"], tokens[:, index])
        assert torch.equal(piece["labels"], tokens[:, index] + 100)
        assert piece["loss_mask"] is None
        assert torch.equal(piece["attention_mask"], batch["attention_mask"][:, :, index])
    if split == "balanced":  # Megatron's zig-zag: rank 0 holds chunks 0 and 3 of 4
        assert pieces[0]["tokens"][0].tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    with pytest.raises(Lasp2ConfigError, match="divisible"):
        get_batch_on_this_sp_rank({"tokens": torch.zeros(1, 6)}, "balanced", cp_group=_Group(0, 2))


def test_packed_batch_split():
    from megatron_patches.batch import get_packed_batch_on_this_sp_rank

    tokens = torch.arange(16)[None]
    cu = torch.tensor([0, 5, 16])
    local, params = get_packed_batch_on_this_sp_rank({"tokens": tokens}, cu, "contiguous", cp_group=_Group(1, 2))
    assert local["tokens"].tolist() == [list(range(8, 16))]
    assert params.qkv_format == "thd" and params.lasp2_split == "contiguous" and params.max_seqlen_q == 11
    assert params.cu_seqlens_q.tolist() == [0, 5, 16]  # global boundaries
    with pytest.raises(Lasp2ConfigError, match="batch size 1"):
        get_packed_batch_on_this_sp_rank({"tokens": torch.zeros(2, 16)}, cu, cp_group=_Group(0, 2))


def test_rope_positions_and_patch():
    from megatron.core.models.common.embeddings import rope_utils

    from megatron_patches import rope

    # packed, CP = 2, balanced: global positions 0..3 and 12..15 of docs [0, 5) and [5, 16)
    cu = torch.tensor([0, 5, 16])
    assert rope.lasp2_rope_positions(8, 0, 2, "balanced", cu).tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    original_thd = rope_utils._apply_rotary_pos_emb_thd
    freqs = torch.randn(16, 1, 1, 8)
    t = torch.randn(16, 2, 8)
    try:
        rope.use_lasp2_rope("contiguous")
        assert rope.active_rope_split() == "contiguous"
        # CP = 1: exactly Megatron's THD RoPE
        ours = rope_utils._apply_rotary_pos_emb_thd(t, cu, freqs, cp_group=_Group(0, 1))
        theirs = original_thd(t, cu, freqs, cp_group=_Group(0, 1))
        assert torch.equal(ours, theirs)
        # unpacked CP slicing: rank 1 of 2 holds positions 8..15
        emb = torch.arange(16.0).view(16, 1, 1, 1)
        sliced = rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, _Group(1, 2))
        assert sliced.flatten().tolist() == list(range(8, 16))
        rope.use_lasp2_rope("balanced")  # = Megatron's zig-zag, device-agnostic
        sliced = rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, _Group(1, 2))
        assert sliced.flatten().tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    finally:
        rope.restore_megatron_rope()
    assert rope_utils._apply_rotary_pos_emb_thd is original_thd and rope.active_rope_split() is None


def test_run_wrapper_selects_the_spec_from_sp_provider_alone():
    """python -m megatron_patches.run pretrain_gpt.py ...: --sp-provider alone adds the lasp2 spec."""
    from megatron_patches.run import spec_args
    from megatron_patches.specs import HAVE_TE

    local = ["--sp-provider", "lasp2", "--transformer-impl", "local"]
    assert spec_args(local) == local + ["--spec", "megatron_patches.specs", "lasp2_layer_spec"]
    assert spec_args(local + ["--num-experts", "8"])[-1] == "lasp2_moe_layer_spec"
    te = spec_args(["--sp-provider=lasp1"])[-1]
    assert te == ("lasp2_te_layer_spec" if HAVE_TE else "lasp2_layer_spec")
    for unchanged in (["--sp-provider", "none"], ["--num-layers", "4"],
                      ["--sp-provider", "lasp2", "--spec", "my.specs", "s"]):
        assert spec_args(unchanged) == unchanged
    # a flag given twice: argparse keeps the last value, so does the spec choice (the first,
    # 'none', used to drop the lasp2 spec while Megatron-LM parsed --sp-provider lasp2)
    twice = local[2:] + ["--sp-provider", "none", "--lasp2-sp-provider=lasp2"]
    assert spec_args(twice) == twice + ["--spec", "megatron_patches.specs", "lasp2_layer_spec"]
    assert spec_args(local + ["--sp-provider", "none"]) == local + ["--sp-provider", "none"]


def test_run_wrapper_makes_megatron_batches_contiguous(monkeypatch):
    """Session 22: `python -m megatron_patches.run pretrain_gpt.py --sp-split contiguous` left
    Megatron-LM's get_batch_on_this_cp_rank (the zig-zag layout) in the script, while lasp2's
    layers and RoPE read contiguous tokens: wrong numbers at CP > 1, no error. The wrapper now
    installs the contiguous slicing where the script imports it from."""
    import megatron.core.utils as core_utils

    from megatron_patches import rope, run
    from megatron_patches.batch import restore_megatron_batches

    original = core_utils.get_batch_on_this_cp_rank
    batch = {"tokens": torch.arange(16).view(2, 8), "labels": torch.arange(16).view(2, 8) + 100}
    seen = {}

    def script(path, run_name):  # what `from megatron.core.utils import get_batch_on_this_cp_rank` gets
        from megatron.core.utils import get_batch_on_this_cp_rank

        seen["rank1"] = get_batch_on_this_cp_rank(dict(batch), cp_group=_Group(1, 2))

    monkeypatch.setattr(run, "install", lambda: None)  # Megatron-LM's parser: not in the core wheel
    monkeypatch.setattr(run.runpy, "run_path", script)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    try:
        run.main(["pretrain_gpt.py", "--sp-provider", "lasp2", "--sp-split", "contiguous"])
    finally:
        restore_megatron_batches()
        rope.restore_megatron_rope()
    assert seen["rank1"]["tokens"].tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]]  # zig-zag: 2, 3, 4, 5
    assert seen["rank1"]["labels"].tolist() == [[104, 105, 106, 107], [112, 113, 114, 115]]
    assert core_utils.get_batch_on_this_cp_rank is original


@pytest.mark.parametrize("flag", ["--sp-split=contiguous", "--linear-attention-decay", "--lasp2-softmax-backend"])
def test_run_wrapper_refuses_lasp2_flags_without_sp_provider(flag):
    """Session 22: lasp2's flags without --sp-provider (and without --spec) left Megatron-LM's
    own spec in place, which never reads them: the run trained stock attention silently."""
    from megatron_patches.run import spec_args

    argv = ["--num-layers", "4", flag] + ([] if "=" in flag else ["gate"])
    with pytest.raises(SystemExit, match=f"{flag.split('=')[0]} .*without --sp-provider"):
        spec_args(argv)
    # Megatron's own --linear-attention-freq (gated DeltaNet hybrid) is not lasp2's; with --spec the
    # user's spec module decides what it reads
    with pytest.raises(SystemExit, match=f"{flag.split('=')[0]} .*with --sp-provider none"):
        spec_args(argv + ["--sp-provider", "none"])
    assert spec_args(["--linear-attention-freq", "4"]) == ["--linear-attention-freq", "4"]
    assert spec_args(argv + ["--spec", "my.specs", "s"]) == argv + ["--spec", "my.specs", "s"]


def test_gated_deltanet_convolution_width_zero_is_refused():
    """Session 18: config.linear_conv_kernel_dim = 0 built a width-4 convolution (`or 4`)
    without a word; it now raises naming the field (megatron-core's default 4 still builds)."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_layer_spec

    spec = get_lasp2_layer_spec(Lasp2Options(layer_pattern="G"), layer_kind="G").submodules.self_attention
    no_groups = ProcessGroupCollection(tp=None, cp=None)  # one process: TP = CP = 1, construction only

    def build(**fields):
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                                   **fields)
        return build_module(spec, config=config, layer_number=1, pg_collection=no_groups)

    assert build().conv.kernel_size == 4
    assert build(linear_conv_kernel_dim=2).conv.kernel_size == 2
    with pytest.raises(Lasp2ConfigError, match=r"linear_conv_kernel_dim .* must be an int >= 1, got 0 \(layer 1\)"):
        build(linear_conv_kernel_dim=0)


@pytest.mark.parametrize("split, seq, cp, ok", [
    ("balanced", 12, 2, True), ("balanced", 10, 2, False), ("contiguous", 10, 2, True),
    ("contiguous", 10, 4, False), ("balanced", 7, 1, True)])
def test_launcher_checks_the_sequence_length_before_any_collective(split, seq, cp, ok):
    """Session 18: a --seq-length the split cannot cut was found at the first batch, by the
    ranks that read it; under PP x CP (4 gloo ranks) the second stage's ranks, waiting in
    their first receive, died of 'Connection closed by peer' instead. The launcher's options
    step (every rank, before the model and the first step) now raises naming --seq-length."""
    from megatron_patches import pretrain_gpt

    args = pretrain_gpt.parse_args(["--device", "cpu", "--seq-length", str(seq), "--context-parallel-size", str(cp),
                                    "--sp-split", split])
    if ok:
        assert pretrain_gpt.lasp2_options(args).split == split
    else:
        with pytest.raises(Lasp2ConfigError, match=f"--seq-length {seq} must be divisible by .*--context-parallel"):
            pretrain_gpt.lasp2_options(args)


def test_kda_layer_shapes_and_provider():
    """A "K" layer's in-projection gives each head [q, k, v, z, beta, a] with Dk gate logits
    (a "G" layer: one), dt_bias one entry a key dim of each head; built directly from its
    spec under provider "none" (which lasp2.kda lacks) it raises naming the kind."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    no_groups = ProcessGroupCollection(tp=None, cp=None)  # one process: TP = CP = 1, construction only
    D = 32 // 4

    def build(kind, options):
        spec = get_lasp2_layer_spec(options, layer_kind=kind).submodules.self_attention
        return build_module(spec, config=config, layer_number=1, pg_collection=no_groups)

    for kind, width in (("G", 1), ("K", D)):
        layer = build(kind, Lasp2Options(layer_pattern=kind))
        assert layer.layer_kind == kind and layer.in_proj.weight.shape == (4 * (4 * D + 1 + width), 32)
        assert layer.A_log.shape == (4,) and layer.dt_bias.shape == (4 * width,)
    with pytest.raises(Lasp2ConfigError, match=r"KDA \('K'\) layers run under --sp-provider lasp2 or lasp1 or "
                                               r"ulysses, got 'none' \(layer 1\)"):
        build("K", Lasp2Options(provider="none"))
    # the one spec for every layer (Megatron-LM's --spec path) builds a "K" layer by its number
    config2 = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    one_spec = get_lasp2_layer_spec(Lasp2Options(layer_pattern="GK")).submodules.self_attention
    kinds = [build_module(one_spec, config=config2, layer_number=n, pg_collection=no_groups).layer_kind
             for n in (1, 2)]
    assert kinds == ["G", "K"]


@pytest.mark.parametrize("extra, refusal", [
    # megatron-core's DistributedOptimizer iterates DDP's gradient buffers (model_chunk.buffers):
    # let through, it failed with "TypeError: 'method' object is not iterable" (nn.Module.buffers)
    (["--use-distributed-optimizer"], "--use-torch-fsdp2 and --use-distributed-optimizer exclude each other: "
                                      "megatron-core's distributed optimizer shards DDP's gradient buffers")])
def test_launcher_refuses_torch_fsdp2_with_what_it_cannot_or_was_not_run_with(extra, refusal):
    """--use-torch-fsdp2 is tested with TP, PP (and VPP), CP, EP, the per-token loss,
    checkpoints and --bf16 (test_megatron_fsdp2_tp_pp.py, test_megatron_pretrain.py,
    test_megatron_fsdp2_checkpoint.py, test_megatron_moe_fsdp_ep.py, test_megatron_fsdp2_bf16.py);
    the distributed optimizer stops at parse time."""
    from megatron_patches import pretrain_gpt

    # --calculate-per-token-loss was refused until FSDP2 summed over dp-cp and divided by the tokens,
    # --save / --load until megatron_patches.fsdp2_checkpoint placed the shards, TP > 1 and PP > 1
    # until test_megatron_fsdp2_tp_pp.py, --bf16 (on CUDA; the CPU refuses it for every run) until
    # megatron_patches.torch_fsdp gave FSDP2 DDP's mixed precision (test_megatron_fsdp2_bf16.py)
    for accepted in ([], ["--calculate-per-token-loss"], ["--save", "ckpt", "--load", "ckpt"],
                     ["--tensor-model-parallel-size", "2", "--sequence-parallel"],
                     ["--pipeline-model-parallel-size", "2"], ["--bf16", "--device", "cuda"]):
        assert pretrain_gpt.parse_args(["--device", "cpu", "--use-torch-fsdp2", *accepted]).use_torch_fsdp2
    with pytest.raises(SystemExit, match=re.escape(refusal)):
        pretrain_gpt.parse_args(["--device", "cpu", "--use-torch-fsdp2", *extra])


@pytest.mark.parametrize("kind", ["L", "G", "K"])
def test_mixers_refuse_what_self_attention_calls_they_do_not_take(kind):
    """Megatron's self-attention call may carry an inference context (KV cache), cross-attention
    states or an attention bias; the lasp2 mixers refuse each by name before any work."""
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True)
    spec = get_lasp2_layer_spec(Lasp2Options(layer_pattern=kind), layer_kind=kind).submodules.self_attention
    layer = build_module(spec, config=config, layer_number=1, pg_collection=ProcessGroupCollection(tp=None, cp=None))
    x = torch.randn(8, 1, 32)
    with pytest.raises(Lasp2ConfigError, match="do not support Megatron's inference context"):
        layer(x, None, inference_context=object())
    with pytest.raises(Lasp2ConfigError, match=r"self attention only \(key_value_states was given\)"):
        layer(x, None, key_value_states=x)
    if kind != "L":  # a linear layer hands attention_bias to its core attention, which decides
        with pytest.raises(Lasp2ConfigError, match="take no attention_bias"):
            layer(x, None, attention_bias=torch.zeros(1))


LAUNCHER_SIZE_FLAGS = ["--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads",
                       "--num-query-groups", "--seq-length", "--max-position-embeddings", "--vocab-size",
                       "--tensor-model-parallel-size", "--pipeline-model-parallel-size",
                       "--num-layers-per-virtual-pipeline-stage", "--context-parallel-size", "--micro-batch-size",
                       "--global-batch-size"]


@pytest.mark.parametrize("flag", LAUNCHER_SIZE_FLAGS)
@pytest.mark.parametrize("value", ["0", "-2"])
def test_launcher_sizes_must_be_positive(flag, value, capsys):
    """Session 22: sizes of 0 or below were taken at parse time and failed later with
    ZeroDivisionError / 'math domain error' inside the set-up (--context-parallel-size 0,
    --micro-batch-size 0, --num-layers 0), or not at all (--seq-length -4 at CP 2 passed the
    split check). argparse now names the flag on every rank."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(["--device", "cpu", flag, value])
    assert f"argument {flag}: expected an int >= 1, got '{value}'" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--group-query-attention", "--num-query-groups", "3"],
     "--num-attention-heads 4 must be divisible by --num-query-groups 3"),
    (["--group-query-attention"], "--group-query-attention needs --num-query-groups"),
])
def test_launcher_refuses_query_groups_the_heads_cannot_take(argv, message):
    """Session 22: 4 heads in 3 query groups built and failed at the first forward, in
    megatron-core's QKV split (a shape error, on the first pipeline stage only: later stages
    wait in their first receive); --group-query-attention alone trained multi-head attention
    (Megatron-LM's --num-query-groups defaults to 1 there). Both are refused at parse time."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit, match=message):
        pretrain_gpt.parse_args(["--device", "cpu", *argv])
    assert pretrain_gpt.parse_args(["--device", "cpu", "--group-query-attention", "--num-query-groups", "2"]
                                   ).num_query_groups == 2


@pytest.mark.parametrize("argv, message", [
    (["--hidden-size", "70", "--num-attention-heads", "4"], "--hidden-size 70 must be divisible by --num-attention-heads 4"),
    (["--num-layers", "3", "--pipeline-model-parallel-size", "2"],
     "--num-layers 3 must be divisible by --pipeline-model-parallel-size 2"),
])
def test_launcher_refuses_sizes_megatron_lm_refuses(argv, message):
    """Session 22: a hidden size the heads do not divide built a narrower attention (megatron-core
    floors the head dim; Megatron-LM's parser refuses it), and layers the pipeline stages do not
    divide failed in megatron-core's assertion naming its config fields, not the flags."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit, match=message):
        pretrain_gpt.parse_args(["--device", "cpu", *argv])
    assert pretrain_gpt.parse_args(["--device", "cpu", "--hidden-size", "72", "--num-attention-heads", "4",
                                    "--num-layers", "4", "--pipeline-model-parallel-size", "2"]).hidden_size == 72


@pytest.mark.parametrize("position", ["learned_absolute", "none"])
def test_launcher_refuses_linear_rope_without_rope(position):
    """Session 22: --linear-attention-rope true under --position-embedding-type learned_absolute or
    none trained without rotary embeddings in the linear layers (they get none to apply)."""
    from megatron_patches import pretrain_gpt

    args = pretrain_gpt.parse_args(["--device", "cpu", "--linear-attention-rope", "true",
                                    "--position-embedding-type", position])
    with pytest.raises(Lasp2ConfigError, match=f"--linear-attention-rope needs --position-embedding-type rope, "
                                               f"got {position!r}"):
        pretrain_gpt.lasp2_options(args)
    assert pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(["--device", "cpu", "--linear-attention-rope", "true"])
                                      ).linear_rope


def test_launcher_refuses_learned_positions_shorter_than_the_sequence():
    """Session 22: --position-embedding-type learned_absolute with --max-position-embeddings below
    --seq-length built a table too short for the positions and failed at the first forward
    (an index error, on the first pipeline stage only)."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit, match="--max-position-embeddings 16 is below --seq-length 64"):
        pretrain_gpt.parse_args(["--device", "cpu", "--position-embedding-type", "learned_absolute",
                                 "--max-position-embeddings", "16", "--seq-length", "64"])
    # rotary embeddings are computed for the sequence at hand: the table size does not bound them
    assert pretrain_gpt.parse_args(["--device", "cpu", "--max-position-embeddings", "16", "--seq-length", "64"]
                                   ).max_position_embeddings == 16


@pytest.mark.parametrize("argv, message", [
    (["--ckpt-step", "2"], "--ckpt-step is for --load"),
    (["--save-interval", "2"], "--save-interval is for --save"),
    (["--mock-data", "--data-path", "corpus_text_document"], "--mock-data and --data-path"),
])
def test_launcher_refuses_flags_it_would_ignore(argv, message):
    """Session 22: --ckpt-step without --load trained from scratch, --save-interval without
    --save wrote nothing, and --data-path won over --mock-data; each without a word."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit, match=message):
        pretrain_gpt.parse_args(["--device", "cpu", *argv])
