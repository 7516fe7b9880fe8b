"""A tiny hybrid megatron-core GPT with LASP-2 / LASP-2H attention: context parallelism
(CP = 2, gloo) against one device (CP = 1), checkpoints across CP sizes, Megatron's DDP.

One set of 2 processes runs everything (the imports dominate the run time); each
test below checks one part of what it recorded. CP = 1 references run in the same
processes after re-initialising Megatron's parallel state (TP = 1, CP = 1, DP = 2),
so every rank computes the whole reference itself.
"""

import os

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from megatron_patches import Lasp2Options  # noqa: E402
from megatron_testing import (  # noqa: E402
    ddp_train,
    FP32_TOL,
    HEADS,
    HIDDEN,
    SEQ,
    Case,
    build_gpt,
    compare,
    format_failures,
    full_state,
    global_batch,
    init_parallel,
    local_batch,
    loss_and_grads,
    matches,
    max_state_diff,
    worker_setup,
)

O = Lasp2Options
CASES = [
    # split balanced = Megatron's own batch / RoPE layout: no patch at all
    Case("balanced fixed-decay rope gqa", O(layer_pattern="LNLN", decay="fixed")),
    Case("balanced gate elu linear-rope", O(layer_pattern="LLNL", decay="gate", feature_map="elu", linear_rope=True)),
    Case("balanced no-decay learned-pos mha", O(layer_pattern="NLLN", decay="none", output_norm=False),
         groups=HEADS, pos_emb="learned_absolute"),
    # contiguous: lasp2's batch helper and the RoPE patch
    Case("contiguous learnable-decay rope", O(layer_pattern="LNLN", split="contiguous", decay="fixed",
                                              learnable_decay=True), rope_split="contiguous"),
    Case("contiguous lasp1 gate rope", O(provider="lasp1", split="contiguous", decay="gate", layer_pattern="LLNN"),
         rope_split="contiguous"),
    Case("contiguous ulysses all-linear", O(provider="ulysses", split="contiguous", decay="fixed"),
         num_layers=2, rope_split="contiguous"),
    # activation recompute: selective (core attention, the gates an input of the region) and full
    Case("balanced gate selective-recompute", O(layer_pattern="LGNL", decay="gate"),
         config={"recompute_granularity": "selective"}),
    Case("balanced fixed full-recompute", O(layer_pattern="LLNN"),
         config={"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}),
    # packed documents (THD, batch 1, global cu_seqlens) crossing CP ranks
    Case("packed balanced gate rope", O(layer_pattern="LNLN", decay="gate"), packed=True, rope_split="balanced"),
    Case("packed contiguous fixed learned-pos", O(layer_pattern="LNNL", split="contiguous"), packed=True,
         pos_emb="learned_absolute"),
    # gated DeltaNet layers: short-convolution halo across ranks, the gated delta rule under LASP-2
    Case("balanced gdn hybrid gate rope", O(layer_pattern="LGSG", decay="gate")),
    Case("packed contiguous gdn learned-pos", O(layer_pattern="GSGL", split="contiguous"), packed=True,
         pos_emb="learned_absolute"),
    Case("balanced lasp1 gdn hybrid gate", O(provider="lasp1", layer_pattern="GLSG", decay="gate")),
    # gated DeltaNet layers under Ulysses (lasp2.gated_delta_rule's all-to-all over heads): with
    # linear layers (whose Ulysses needs the contiguous split), and alone under Megatron's balanced
    # split, packed documents included
    Case("contiguous ulysses gdn hybrid gate", O(provider="ulysses", split="contiguous", layer_pattern="LGSG",
                                                 decay="gate"), rope_split="contiguous"),
    Case("balanced ulysses gdn", O(provider="ulysses", layer_pattern="GSGS")),
    Case("packed balanced ulysses gdn", O(provider="ulysses", layer_pattern="SGGS"), packed=True,
         rope_split="balanced"),
    # KDA layers (Kimi Linear's per-key gate, lasp2.kda): a 3 : 1 hybrid under selective recompute
    # (the 4-D gate an input of the region), and packed documents under lasp1 and Ulysses
    Case("balanced kda hybrid selective-recompute", O(layer_pattern="KKKS", decay="gate"),
         config={"recompute_granularity": "selective"}),
    Case("packed contiguous lasp1 kda", O(provider="lasp1", split="contiguous", layer_pattern="KSKL"), packed=True,
         pos_emb="learned_absolute"),
    Case("packed balanced ulysses kda", O(provider="ulysses", layer_pattern="SKGK"), packed=True,
         rope_split="balanced"),
]
CKPT_CASE = Case("ckpt", O(layer_pattern="LGNL", decay="fixed", learnable_decay=True))
DDP_CASE = Case("ddp", O(layer_pattern="LNLN", decay="gate"))
DDP_STEPS = 3  # ddp_train's default


def _packed_documents_are_separate():
    """CP = 1: per-token losses of a packed batch equal those of each document run alone
    (positions restart at every document, nothing attends across a boundary)."""
    from megatron_testing import PACKED_CU

    case = Case("packed docs", O(layer_pattern="LNLN", decay="gate"), packed=True, rope_split="balanced")
    model = build_gpt(case)
    batch, cu = global_batch(case)
    local, packed = local_batch(case, batch, cu)
    with torch.no_grad():
        whole = model(local["tokens"], local["position_ids"], None, labels=local["labels"], packed_seq_params=packed)
        worst = 0.0
        for lo, hi in zip(PACKED_CU[:-1], PACKED_CU[1:]):
            alone = model(batch["tokens"][:, lo:hi], torch.arange(hi - lo)[None], None,
                          labels=batch["labels"][:, lo:hi])
            worst = max(worst, (alone - whole[:, lo:hi]).abs().max().item())
    return worst


def _equality(rank):
    refs = {}
    init_parallel(tp=1, cp=1)
    for case in CASES:
        batch, cu = global_batch(case)
        refs[case.name] = loss_and_grads(build_gpt(case), case, batch, cu)
    packed_docs = _packed_documents_are_separate()
    init_parallel(tp=1, cp=2)
    out = {}
    for case in CASES:
        batch, cu = global_batch(case)
        out[case.name] = compare(refs[case.name], loss_and_grads(build_gpt(case), case, batch, cu))
    return out, packed_docs


def _checkpoints(rank, tmpdir):
    from megatron.core import dist_checkpointing

    case = CKPT_CASE
    batch, cu = global_batch(case)
    out, states, losses, plain = {}, {}, {}, {}
    for cp in (1, 2):
        init_parallel(tp=1, cp=cp)
        model = build_gpt(case, seed=1)
        states[cp], plain[cp] = full_state(model), model.state_dict()
        losses[cp] = loss_and_grads(model, case, batch, cu)[0]
        path = os.path.join(tmpdir, f"cp{cp}")
        os.makedirs(path, exist_ok=True)
        dist_checkpointing.save(model.sharded_state_dict(), path)
    out["same_seed_state_diff"] = max_state_diff(states[1], states[2])
    for cp, other in ((1, 2), (2, 1)):
        init_parallel(tp=1, cp=cp)
        model = build_gpt(case, seed=99)  # different weights before loading
        out[f"before_load_diff_cp{other}->cp{cp}"] = max_state_diff(full_state(model), states[other])
        model.load_state_dict(plain[other])
        out[f"state_dict_cp{other}->cp{cp}"] = max_state_diff(full_state(model), states[other])
        out[f"state_dict_loss_cp{other}->cp{cp}"] = abs(loss_and_grads(model, case, batch, cu)[0] - losses[other])
        model = build_gpt(case, seed=99)
        loaded = dist_checkpointing.load(model.sharded_state_dict(), os.path.join(tmpdir, f"cp{other}"))
        model.load_state_dict(loaded)
        out[f"dist_ckpt_cp{other}->cp{cp}"] = max_state_diff(full_state(model), states[other])
        out[f"dist_ckpt_loss_cp{other}->cp{cp}"] = abs(loss_and_grads(model, case, batch, cu)[0] - losses[other])
    return out


def _ddp(rank):
    curves, states = {}, {}
    for tp, cp in ((1, 1), (1, 2)):  # (1, 1): DP = 2, the plain data-parallel reference
        curves[(tp, cp)], states[(tp, cp)] = ddp_train(DDP_CASE, tp, cp)
    ref = curves[(1, 1)]
    return {"curves": curves,
            "loss_rel": max(abs(a - b) / abs(b) for a, b in zip(curves[(1, 2)], ref)),
            "state_diff": max_state_diff(states[(1, 2)], states[(1, 1)])}


def _linear_moe(rank):
    """Lasp2LinearAttention (Linear-MoE's core slot) at CP = 2 against lasp2.nn.LinearAttention on
    the whole sequence, sharing its projections and norm."""
    import lasp2
    from megatron.core import parallel_state as ps

    from megatron_patches.linear_moe import Lasp2LinearAttention
    from megatron_testing import linear_moe_config, swap_forward

    init_parallel(tp=1, cp=2)
    group = ps.get_context_parallel_group()
    out = {}
    for decay in ("none", "fixed", "gate"):
        for split in ("balanced", "contiguous"):
            torch.manual_seed(0)
            layer = lasp2.nn.LinearAttention(HIDDEN, HEADS, decay=decay, feature_map="relu", layout="tbhd")
            x = torch.randn(SEQ, 2, HIDDEN)
            ref = layer(x)
            ref_grads = torch.autograd.grad(ref.square().sum(), list(layer.parameters()))
            core = Lasp2LinearAttention(linear_moe_config(decay, split))
            core.la_output_norm.weight = layer.norm.weight  # shared: its gradient is compared too
            x_local = lasp2.split_sequence(x, group, split=split, dim=0)
            y = swap_forward(layer, core, x_local)
            grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
            grads = [g.clone() for g in grads]
            for g in grads:
                dist.all_reduce(g, group=group)
            y_ref = lasp2.split_sequence(ref.detach(), group, split=split, dim=0)
            out_err = ((y.detach() - y_ref).abs().max() / y_ref.abs().max()).reshape(1)
            dist.all_reduce(out_err, op=dist.ReduceOp.MAX, group=group)  # every rank's slice
            scale = max(g.abs().max().item() for g in ref_grads)
            out[f"{decay}/{split}"] = {
                "out_rel": out_err.item(),
                "grad_rel": max((a - b).abs().max().item() for a, b in zip(grads, ref_grads)) / scale}
    return out


def _misc(rank):
    """Megatron's own pieces against ours, and the errors that need a CP group of size > 1."""
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    from megatron.core.utils import get_batch_on_this_cp_rank

    from megatron_patches.batch import get_batch_on_this_sp_rank
    from megatron_patches.options import Lasp2ConfigError
    from megatron_patches.specs import get_lasp2_layer_spec

    out = {}
    # provider "none" keeps Megatron's DotProductAttention; LASP-2H softmax layers compute the same
    init_parallel(tp=1, cp=1)
    losses = {}
    for provider in ("none", "lasp2"):
        case = Case(provider, O(provider=provider, layer_pattern="NN"), num_layers=2)
        model = build_gpt(case)
        out[f"core_attention_{provider}"] = type(model.decoder.layers[0].self_attention.core_attention).__name__
        losses[provider] = loss_and_grads(model, case, *global_batch(case))
    out["stock_vs_lasp2h"] = compare(losses["none"], losses["lasp2"])
    out["dot_product_attention"] = DotProductAttention.__name__

    init_parallel(tp=1, cp=2)
    # split="balanced" is Megatron's get_batch_on_this_cp_rank, key by key
    batch, _ = global_batch(CASES[0])
    batch["attention_mask"] = torch.rand(2, 1, SEQ, SEQ) > 0.5
    ours = get_batch_on_this_sp_rank(batch, split="balanced")
    theirs = get_batch_on_this_cp_rank(dict(batch), cp_group=ps.get_context_parallel_group())
    out["batch_matches_megatron"] = all(torch.equal(ours[k], theirs[k]) for k in batch)

    def error_of(fn):
        try:
            fn()
        except Lasp2ConfigError as exc:
            return str(exc)
        return "no error"

    case = Case("packed-unmarked", O(layer_pattern="LN"), num_layers=2, packed=True)
    model = build_gpt(case)
    batch, cu = global_batch(case)
    local, packed = local_batch(case, batch, cu)
    del packed.lasp2_split  # as if built by Megatron's own THD split
    out["packed_unmarked"] = error_of(lambda: model(local["tokens"], local["position_ids"], None,
                                                    labels=local["labels"], packed_seq_params=packed))
    out["ulysses_heads"] = error_of(lambda: build_gpt(
        Case("u", O(provider="ulysses", split="contiguous"), num_layers=1, groups=1), num_attention_heads=1))
    out["ulysses_heads_gdn"] = error_of(lambda: build_gpt(
        Case("ug", O(provider="ulysses", layer_pattern="G"), num_layers=1, groups=1), num_attention_heads=1))
    out["ulysses_heads_kda"] = error_of(lambda: build_gpt(
        Case("uk", O(provider="ulysses", layer_pattern="K"), num_layers=1, groups=1), num_attention_heads=1))

    def pattern_mismatch():  # the Megatron-LM path: one spec for every layer, pattern checked at build
        from megatron.core.models.gpt import GPTModel
        from megatron_testing import VOCAB, transformer_config

        GPTModel(config=transformer_config(Case("p", num_layers=4)),
                 transformer_layer_spec=get_lasp2_layer_spec(O(layer_pattern="LNL")),
                 vocab_size=VOCAB, max_sequence_length=SEQ)

    out["pattern_mismatch"] = error_of(pattern_mismatch)

    def rope_without_patch(case):
        from megatron_patches import rope

        rope.restore_megatron_rope()
        model = build_gpt(case)
        batch, cu = global_batch(case)
        local, packed = local_batch(case, batch, cu)
        model(local["tokens"], local["position_ids"], None, labels=local["labels"], packed_seq_params=packed)

    out["rope_contiguous_unpatched"] = error_of(lambda: rope_without_patch(
        Case("c", O(layer_pattern="NL", split="contiguous"), num_layers=2)))
    out["rope_packed_unpatched"] = error_of(lambda: rope_without_patch(
        Case("p", O(layer_pattern="NL"), num_layers=2, packed=True)))
    out["megatron_lm_spec"] = _megatron_lm_spec_path()
    out["delta_mixer_checks"] = _delta_mixer_checks()
    init_parallel(tp=1, cp=1)
    out["pre_mixer_checkpoints"] = _pre_mixer_checkpoints_load()
    out["mixers_vs_lasp2_nn"] = _mixers_equal_lasp2_nn_modules()
    return out


def _mixers_equal_lasp2_nn_modules():
    """CP = 1: each Megatron mixer computes its lasp2.nn module's function (lasp2.nn.LinearAttention,
    lasp2.nn.GatedDeltaNet, tested against float64 references in tests/python/nn) with the same
    weights, mapped from Megatron's layouts: linear_qkv grouped per query group, the gated DeltaNet
    in-projection head by head ([q, k, v, z, beta, a] of each head; for KDA "K", a holds one gate
    logit a key dim and dt_bias one entry a key dim of each head: a KDA layer whose gate were
    per head would not match lasp2.nn.GatedDeltaNet(per_key_gate=True))."""
    import lasp2
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_layer_spec

    D = HIDDEN // HEADS
    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=HIDDEN,
                               use_cpu_initialization=True, params_dtype=torch.float32, add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(SEQ, 2, HIDDEN, generator=gen, requires_grad=True)
    out = {}

    def mixer(kind, options):
        spec = get_lasp2_layer_spec(options, layer_kind=kind).submodules.self_attention
        module = spec.module(config=config, submodules=spec.submodules, layer_number=1, **spec.params)
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
        return module

    def against(module, ref):
        """Relative differences of the outputs and of the input gradients (loss: sum of squares)."""
        y, y_ref = module(x)[0], ref(x)
        (dx,), (dx_ref,) = torch.autograd.grad(y.square().sum(), [x]), torch.autograd.grad(y_ref.square().sum(), [x])
        return {name: ((a - b).abs().max() / b.abs().max()).item()
                for name, a, b in (("out_rel", y, y_ref), ("grad_rel", dx, dx_ref))}

    linear = mixer("L", O(decay="gate", feature_map="silu"))
    ref = lasp2.nn.LinearAttention(HIDDEN, HEADS, decay="gate", feature_map="silu", layout="tbhd")
    with torch.no_grad():
        w = linear.linear_qkv.weight.view(HEADS, 3, D, HIDDEN)  # one query per group (MHA): [q, k, v] per head
        for i, proj in enumerate((ref.q_proj, ref.k_proj, ref.v_proj)):
            proj.weight.copy_(w[:, i].reshape(HEADS * D, HIDDEN))
        linear.core_attention.output_norm_weight.copy_(linear.core_attention.output_norm_weight[:1].expand(HEADS, D))
        ref.norm.weight.copy_(linear.core_attention.output_norm_weight[0])
        ref.g_proj.weight.copy_(linear.linear_gate.weight)
        ref.g_proj.bias.copy_(linear.linear_gate.bias)
        ref.o_proj.weight.copy_(linear.linear_proj.weight)
    out["L"] = against(linear, ref)

    for kind, width in (("G", 1), ("K", D)):  # gate logits a head
        gdn = mixer(kind, O(layer_pattern=kind))
        ref = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, layout="tbhd", norm_eps=config.layernorm_epsilon,
                                     per_key_gate=kind == "K")
        with torch.no_grad():
            w = gdn.in_proj.weight.view(HEADS, 4 * D + 1 + width, HIDDEN)
            rows = {"q": (0, D), "k": (D, 2 * D), "v": (2 * D, 3 * D), "z": (3 * D, 4 * D), "b": (4 * D, 4 * D + 1),
                    "a": (4 * D + 1, 4 * D + 1 + width)}
            for name, proj in (("q", ref.q_proj), ("k", ref.k_proj), ("v", ref.v_proj), ("z", ref.g_proj),
                               ("b", ref.b_proj), ("a", ref.a_proj)):
                lo, hi = rows[name]
                proj.weight.copy_(w[:, lo:hi].reshape(-1, HIDDEN))
            conv = gdn.conv.weight.view(HEADS, 3, D, -1)
            for i, c in enumerate((ref.q_conv, ref.k_conv, ref.v_conv)):
                c.weight.copy_(conv[:, i].reshape(HEADS * D, -1))
            ref.A_log.copy_(gdn.A_log)
            ref.dt_bias.copy_(gdn.dt_bias)
            ref.o_norm.weight.copy_(gdn.out_norm.weight)
            ref.o_proj.weight.copy_(gdn.out_proj.weight)
        out[kind] = against(gdn, ref)
    return out


def _delta_mixer_checks():
    """Cross-rank checks (exchanges counted by lasp2.ops._group_consistency.STATS) of one
    forward and backward of each delta-rule mixer over the CP group."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    from lasp2.ops import _group_consistency as GC
    from megatron_patches.specs import get_lasp2_layer_spec

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=HIDDEN,
                               use_cpu_initialization=True, params_dtype=torch.float32, add_bias_linear=False,
                               hidden_dropout=0.0, attention_dropout=0.0)
    x = torch.randn(SEQ // 2, 2, HIDDEN, generator=torch.Generator().manual_seed(2), requires_grad=True)
    counts = {}
    for kind in ("G", "K"):
        spec = get_lasp2_layer_spec(O(layer_pattern=kind), layer_kind=kind).submodules.self_attention
        module = spec.module(config=config, submodules=spec.submodules, layer_number=1, **spec.params)
        before = GC.STATS["sync"]
        module(x)[0].sum().backward()
        counts[kind] = GC.STATS["sync"] - before
    return counts


def _pre_mixer_checkpoints_load():
    """State dicts with the keys of the modules before the mixer split (a SelfAttention
    subclass with core_attention.log_decay / output_norm_weight and linear_gate; the key list
    is stored in data/) load into today's modules with strict=True, and their values land."""
    import json

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_hybrid_block_spec

    with open(os.path.join(os.path.dirname(__file__), "data", "pre_mixer_state_dict.json")) as f:
        cases = json.load(f)["cases"]
    out = {}
    for name, case in cases.items():
        config = TransformerConfig(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                                   use_cpu_initialization=True, params_dtype=torch.float32, **case["config"])
        spec = get_lasp2_hybrid_block_spec(config, O(**case["options"]), **case["base_kwargs"])
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=64, max_sequence_length=16)
        state = model.state_dict()
        ours = {k: list(v.shape) for k, v in state.items() if ".self_attention." in k and v is not None}
        gen = torch.Generator().manual_seed(0)
        old = {k: torch.randn(shape, generator=gen) for k, shape in case["state_dict"].items()}
        state.update(old)
        model.load_state_dict(state, strict=True)
        loaded = model.state_dict()
        out[name] = {"same_keys": ours == case["state_dict"],
                     "max_diff": max((loaded[k] - v).abs().max().item() for k, v in old.items())}
    return out


def _megatron_lm_spec_path():
    """`--spec megatron_patches.specs lasp2_layer_spec` with add_lasp2_args' arguments: one spec
    object for every layer, options read from megatron.training's parsed args at build time.
    megatron.training is not in the megatron-core wheel: a stand-in holds the parsed args."""
    import argparse
    import sys
    import types

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.spec_utils import import_module

    from megatron_patches import add_lasp2_args, options_from_args
    from megatron_testing import VOCAB, transformer_config

    argv = ["--hybrid-layer-pattern", "LNLL", "--linear-attention-decay", "gate", "--sp-split", "balanced"]
    args = add_lasp2_args(argparse.ArgumentParser()).parse_args(argv)
    training = types.ModuleType("megatron.training")
    training.global_vars = types.SimpleNamespace(_GLOBAL_ARGS=args)
    saved = {k: sys.modules.get(k) for k in ("megatron.training", "megatron.training.global_vars")}
    sys.modules["megatron.training"], sys.modules["megatron.training.global_vars"] = training, training.global_vars
    try:
        case = Case("megatron-lm", options_from_args(args))
        batch, cu = global_batch(case)
        config = transformer_config(case)
        torch.manual_seed(7)
        model = GPTModel(config=config, transformer_layer_spec=import_module(("megatron_patches.specs",
                                                                              "lasp2_layer_spec")),
                         vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type=case.pos_emb)
        kinds = "".join(layer.self_attention.layer_kind for layer in model.decoder.layers)
        result = compare(loss_and_grads(build_gpt(case), case, batch, cu), loss_and_grads(model, case, batch, cu))
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
    return {"kinds": kinds, **result}


def _worker(rank, world, tmpdir):
    import time

    worker_setup()
    results, times = {}, {}
    for name, fn in (("equality", lambda: _equality(rank)), ("ckpt", lambda: _checkpoints(rank, tmpdir)),
                     ("ddp", lambda: _ddp(rank)), ("linear_moe", lambda: _linear_moe(rank)),
                     ("misc", lambda: _misc(rank))):
        start = time.perf_counter()
        results[name] = fn()
        times[name] = time.perf_counter() - start
    results["equality"], results["packed_docs"] = results["equality"]
    results["times"] = times
    return results


@pytest.fixture(scope="module")
def cp2_results(tmp_path_factory):
    return run_distributed_for_result(2, _worker, str(tmp_path_factory.mktemp("megatron_cp2")), timeout=400)


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_gpt_cp2_equals_cp1(cp2_results, name):
    r = cp2_results["equality"][name]
    assert matches(r), r


def test_gpt_cp2_all_cases_ran(cp2_results):
    assert set(cp2_results["equality"]) == {c.name for c in CASES}
    assert not format_failures(cp2_results["equality"], FP32_TOL)


def test_packed_documents_do_not_attend_across_boundaries(cp2_results):
    assert cp2_results["packed_docs"] <= 1e-5


def test_checkpoint_portable_across_cp(cp2_results):
    r = cp2_results["ckpt"]
    assert r["same_seed_state_diff"] == 0.0  # weights do not depend on the CP size
    for key, value in r.items():
        if key.startswith("before_load"):
            assert value > 1e-3, (key, value)  # the loading side really started elsewhere
        elif key.startswith(("state_dict_cp", "dist_ckpt_cp")):
            assert value == 0.0, (key, value)  # bit-identical parameters
        elif "_loss_" in key:
            assert value <= FP32_TOL, (key, value)


def test_ddp_cp2_training_equals_dp2(cp2_results):
    r = cp2_results["ddp"]
    assert len(r["curves"][(1, 2)]) == DDP_STEPS
    assert r["loss_rel"] <= 1e-5, r
    assert r["state_diff"] <= 1e-5, r


def test_linear_moe_swap_cp2(cp2_results):
    for key, r in cp2_results["linear_moe"].items():
        assert r["out_rel"] <= FP32_TOL and r["grad_rel"] <= FP32_TOL, (key, r)


def test_provider_none_keeps_megatron_attention_and_lasp2h_matches_it(cp2_results):
    r = cp2_results["misc"]
    assert r["core_attention_none"] == r["dot_product_attention"]
    assert r["core_attention_lasp2"] == "Lasp2SoftmaxCoreAttention"
    cmp = r["stock_vs_lasp2h"]
    assert matches(cmp), cmp


def test_megatron_lm_module_spec_path(cp2_results):
    """The one-flag Megatron-LM path builds the same model as the explicit block spec (CP = 2)."""
    r = cp2_results["misc"]["megatron_lm_spec"]
    assert r["kinds"] == "LSLL"
    assert r["loss_rel"] == 0.0 and r["grad_rel"] == 0.0, r


def test_balanced_batch_split_is_megatrons(cp2_results):
    assert cp2_results["misc"]["batch_matches_megatron"]


def test_mixers_compute_their_lasp2_nn_modules(cp2_results):
    r = cp2_results["misc"]["mixers_vs_lasp2_nn"]
    assert set(r) == {"L", "G", "K"}
    for kind, result in r.items():
        assert result["out_rel"] <= FP32_TOL and result["grad_rel"] <= FP32_TOL, (kind, result)


def test_delta_mixers_check_the_ranks_once_per_call(cp2_results):
    """The convolution's halo and the delta rule share one cross-rank check a call (there were two)."""
    assert cp2_results["misc"]["delta_mixer_checks"] == {"G": 1, "K": 1}


def test_checkpoints_of_the_modules_before_the_mixer_split_load(cp2_results):
    r = cp2_results["misc"]["pre_mixer_checkpoints"]
    assert len(r) == 4
    for name, result in r.items():
        assert result["same_keys"] and result["max_diff"] == 0.0, (name, result)


def test_errors_that_need_a_cp_group(cp2_results):
    r = cp2_results["misc"]
    assert "get_packed_batch_on_this_sp_rank" in r["packed_unmarked"]
    assert "heads per TP rank (1) of linear layer 1 must be divisible by --context-parallel-size 2" in \
        r["ulysses_heads"]
    assert "heads per TP rank (1) of gated DeltaNet layer 1 must be divisible by --context-parallel-size 2" in \
        r["ulysses_heads_gdn"]
    assert "heads per TP rank (1) of KDA layer 1 must be divisible by --context-parallel-size 2" in \
        r["ulysses_heads_kda"]
    assert "has 3 characters but the model has num_layers=4" in r["pattern_mismatch"]
    assert "the contiguous split needs megatron_patches.rope.use_lasp2_rope('contiguous')" in \
        r["rope_contiguous_unpatched"]
    assert "packed (THD) batches needs megatron_patches.rope.use_lasp2_rope('balanced')" in \
        r["rope_packed_unpatched"]
