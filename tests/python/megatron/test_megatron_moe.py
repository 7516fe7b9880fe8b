"""The launcher's MoE flags (megatron_patches.moe) on megatron-core's MoELayer, 4 gloo processes.

A hybrid with an MoE MLP in every layer (pattern LGSL: linear attention, gated DeltaNet,
softmax; 4 experts, top-2, SequentialMLP, allgather dispatcher) trained two SGD steps at
CP 2 x DP 2 with its experts spread over EP 2 (and EP 4: the expert group spans CP and DP
ranks; and PP 2 x CP 2 at EP 2, 1F1B) has the losses and every weight, experts included, of
CP 1 x DP 4 at EP 1; so does
megatron-core's own gated DeltaNet hybrid with MoE (Qwen3-Next's layout) at CP 2 x EP 2.
With the load-balancing loss on, TP 2 x CP 2 and TP 2 x DP 2 at EP 2 (expert TP 2, with
--sequence-parallel, which megatron-core's MoE layer needs at TP > 1) have them too; TP > 1
without --sequence-parallel is refused at parse time.

megatron-core's distributed optimizer (Adam) at CP 2 x EP 2, which shards the expert
parameters over the expert-data-parallel group, equals the plain optimizer.

Each rank must hold num_experts / EP experts, the ones of its EP rank: a run that ignores
--expert-model-parallel-size holds all 4 on every rank and fails that check; expert gradients
reduced over the wrong group (not megatron-core's expert-data-parallel group) fail the
weight comparison.

The load-balancing loss (--moe-router-load-balancing-type aux_loss, coefficient 0.1) is
compared the same way, not only with load balancing "none": megatron-core counts the tokens per
expert over the tensor x context parallel group and scales the loss's gradient by the CP size
(schedules.forward_step_calc_loss), so CP 2 trains as CP 1 with it too. The logged
load_balancing_loss (Megatron-LM's log: summed over CP ranks, averaged over micro-batches, DP
ranks and layers) is the same at both layouts, and the coefficient changes the weights (the
loss reaches the gradient).

SGD at lr 0.1, not the other launcher tests' 0.5: at 0.5 the second step of this MoE model
amplifies fp32 summation-order differences to ~1e-4 in the embedding and the first layer (EP 2
at CP 1 alone, measured; a 1e-6 weight perturbation moves the same weights by 5e-3), at 0.1 the
layouts agree to ~1e-7 under the same 1e-5 tolerance.

A checkpoint (model + Adam state) saved after step 2 at CP 2 x DP 2 x EP 2 resumes at CP 1 x
DP 4 x EP 4 (each rank then holds one expert, from another rank's file) with the uninterrupted
run's step-3 loss and weights (EP 1 <-> EP > 1 resumes: test_megatron_moe_resume.py).

Every run starts from the same weights: each parameter, expert weights by their global expert
index, is set from a generator seeded by its global name.
"""

import os
import re

import pytest
import torch.distributed as dist

pytest.importorskip("megatron.core")

from launcher_testing import (EXPERT, assert_resumed_as_the_uninterrupted_run,  # noqa: E402
                             assert_same_load_balancing_losses, assert_same_losses, global_named_params,
                             initial_value, max_diff, run_launcher, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402

EXPERTS = 4
LR = "0.1"
MODEL = ["--num-layers", "4", "--hidden-size", "32", "--ffn-hidden-size", "32", "--num-attention-heads", "4",
         "--seq-length", "16", "--vocab-size", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--device", "cpu", "--log-interval", "1000", "--linear-attention-decay", "gate",
         "--num-experts", str(EXPERTS), "--moe-router-topk", "2", "--disable-bias-linear",
         "--optimizer", "sgd", "--lr", LR, "--clip-grad", "0", "--train-iters", "2"]
# megatron-core's own gated DeltaNet hybrid (GDN, GDN, softmax, GDN) instead of the pattern
HYBRID = ["--hybrid-layer-pattern", "LGSL"]
CORE_GDN = ["--experimental-attention-variant", "gated_delta_net",
            "--linear-attention-freq", "([1]*2+[0])+[1]", "--linear-conv-kernel-dim", "3",
            "--linear-key-head-dim", "8", "--linear-value-head-dim", "8", "--linear-num-key-heads", "2",
            "--linear-num-value-heads", "4"]
NO_BALANCING = ["--moe-router-load-balancing-type", "none"]
AUX_LOSS = ["--moe-router-load-balancing-type", "aux_loss", "--moe-aux-loss-coeff", "0.1"]
# name: (PP, CP, EP); DP = 4 / (PP x CP)
LAYOUTS = {"cp1 ep1": (1, 1, 1), "cp2 ep2": (1, 2, 2), "cp2 ep4": (1, 2, 4), "pp2 cp2 ep2": (2, 2, 2)}
# TP 2 (expert TP 2, megatron-core's default) with Megatron's sequence parallelism, which
# megatron-core's MoE layer needs at TP > 1; name: (CP, EP); DP = 4 / (2 x CP)
TP2 = ["--tensor-model-parallel-size", "2", "--sequence-parallel"]
TP_LAYOUTS = {"tp2 cp2 ep2": (2, 2), "tp2 dp2 ep2": (1, 2)}


def _layout(cp, ep, pp=1):
    return ["--context-parallel-size", str(cp), "--expert-model-parallel-size", str(ep),
            "--pipeline-model-parallel-size", str(pp)]


def _experts_held(chunks):
    """This rank's global expert indices, per layer."""
    return sorted({(int(name.split(".")[2]), int(EXPERT.match(name)[2]))
                   for name, _ in global_named_params(chunks) if EXPERT.match(name)})


def _run(argv):
    return run_launcher(MODEL + argv)


def _resume(argv):
    return run_launcher(MODEL + argv, after_model_build=None)  # weights from the checkpoint


def _checkpoint_across_ep(tmpdir):
    """Saved at CP 2 x EP 2 after step 2 (the run goes on to step 3), resumed at CP 1 x EP 4."""
    save = os.path.join(tmpdir, "moe_ckpt")
    adam = HYBRID + NO_BALANCING + ["--optimizer", "adam", "--lr", "0.01", "--train-iters", "3"]
    whole = _run(_layout(2, 2) + adam + ["--save", save, "--save-interval", "2"])
    whole_at_ep2 = whole_weights(whole["chunks"])  # named by EP 2's ranks: before the next run's groups
    resumed = _resume(_layout(1, 4) + adam + ["--load", save, "--ckpt-step", "2"])
    return {"whole": whole["losses"], "resumed": resumed["losses"],
            "weight_diff": max_diff(whole_weights(resumed["chunks"]), whole_at_ep2)}


def _worker(rank, world, tmpdir):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron.core import parallel_state as ps

    from megatron_patches import Lasp2ConfigError

    out = {}
    for balancing, flags in (("none", NO_BALANCING), ("aux_loss", AUX_LOSS)):
        runs = {}
        for name, (pp, cp, ep) in LAYOUTS.items():
            if balancing == "aux_loss" and name == "cp2 ep4":
                continue  # one EP layout at PP 1 is enough for the loss's CP scaling
            result = _run(_layout(cp, ep, pp) + HYBRID + flags)
            held = [None] * world
            dist.all_gather_object(held, (ps.get_expert_model_parallel_rank(), _experts_held(result["chunks"])))
            runs[name] = {"losses": result["losses"], "aux": result["aux_losses"],
                          "weights": whole_weights(result["chunks"]), "held": held,
                          "kinds": "".join(layer.self_attention.layer_kind
                                           for layer in result["chunks"][0].module.decoder.layers),
                          "mlp": type(result["chunks"][0].module.decoder.layers[0].mlp).__name__}
        if balancing == "aux_loss":  # the loss counts tokens over TP x CP: TP's layouts with it
            for name, (cp, ep) in TP_LAYOUTS.items():
                result = _run(_layout(cp, ep) + HYBRID + flags + TP2)
                runs[name] = {"losses": result["losses"], "aux": result["aux_losses"],
                              "weights": whole_weights(result["chunks"]),
                              "mlp": type(result["chunks"][0].module.decoder.layers[0].mlp).__name__}
        out[balancing] = runs
    # Qwen3-Next's layout: megatron-core's gated DeltaNet hybrid (Lasp2CoreGatedDeltaNet, LASP-2H
    # softmax) with MoE, load balancing on
    core = {}
    for name, (cp, ep) in (("cp1 ep1", (1, 1)), ("cp2 ep2", (2, 2))):
        result = _run(_layout(cp, ep) + AUX_LOSS + CORE_GDN)
        core[name] = {"losses": result["losses"], "aux": result["aux_losses"], "weights": whole_weights(result["chunks"]),
                      "mlp": type(result["chunks"][0].module.decoder.layers[0].mlp).__name__}
    out["core_gdn"] = core
    # the distributed optimizer (Adam; megatron-core's needs it) shards the expert parameters over
    # the expert-data-parallel group: CP 2 x EP 2 with it against the plain optimizer
    adam = _layout(2, 2) + HYBRID + NO_BALANCING + ["--optimizer", "adam", "--lr", "0.01"]
    plain, sharded = _run(adam), _run(adam + ["--use-distributed-optimizer"])
    plain_weights = whole_weights(plain["chunks"])
    out["distopt"] = {"plain": plain["losses"], "distributed": sharded["losses"],
                      "weight_diff": max_diff(whole_weights(sharded["chunks"]), plain_weights),
                      "moved": max((w - initial_value(k, w.shape)).abs().max().item() for k, w in plain_weights.items())}
    out["aux_moves_weights"] = max_diff(out["aux_loss"]["cp1 ep1"]["weights"], out["none"]["cp1 ep1"]["weights"])
    for runs in out.values():
        if isinstance(runs, dict) and "cp1 ep1" in runs:
            ref = runs["cp1 ep1"]["weights"]
            for run in runs.values():
                weights = run.pop("weights")
                run["weight_diff"] = max_diff(weights, ref)
                run["worst"] = sorted(((weights[k] - ref[k]).abs().max().item(), k) for k in ref)[-6:]
    # EP x TP x PP must divide the world: refused on every rank before any expert group is made
    errors = []
    for argv in (_layout(2, 3) + ["--num-experts", "6"], _layout(1, 8) + ["--num-experts", "8"]):
        try:
            _run(argv)
            errors.append(None)
        except Lasp2ConfigError as exc:
            errors.append(str(exc))
    every_rank = [None] * world
    dist.all_gather_object(every_rank, errors)
    out["world_errors"] = every_rank
    out["ckpt"] = _checkpoint_across_ep(tmpdir)
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_for_result(4, _worker, str(tmp_path_factory.mktemp("megatron_moe")), timeout=450)


@pytest.mark.parametrize("balancing, layout", [("none", "cp2 ep2"), ("none", "cp2 ep4"), ("none", "pp2 cp2 ep2"),
                                               ("aux_loss", "cp2 ep2"), ("aux_loss", "pp2 cp2 ep2")])
def test_moe_hybrid_cp2_with_expert_parallelism_equals_cp1_ep1(results, balancing, layout):
    r, ref = results[balancing][layout], results[balancing]["cp1 ep1"]
    assert r["kinds"] == ("LG" if layout.startswith("pp2") else "LGSL") and r["mlp"] == "MoELayer", r
    assert len(r["losses"]) == 2, r
    assert_same_losses(r, ref)
    assert r["weight_diff"] <= 1e-5, r["worst"]  # two SGD steps of lr 0.5: the gradients agree


def _assert_trains_as_with_aux_loss(r, ref):
    """Run r (an MoE MLP, load-balancing loss on) trained as ref: the two losses, the logged
    load_balancing_loss and every weight."""
    assert r["mlp"] == "MoELayer" and len(r["losses"]) == 2, r
    assert_same_losses(r, ref)
    assert_same_load_balancing_losses(r, ref)
    assert r["weight_diff"] <= 1e-5, r["worst"]


@pytest.mark.parametrize("layout", list(TP_LAYOUTS))
def test_moe_hybrid_at_tp2_with_sequence_parallelism_equals_tp1(results, layout):
    """TP 2 x CP 2 and TP 2 x DP 2 (EP 2, expert TP 2; --sequence-parallel, the norms' gradients
    summed over TP) train as TP 1 x CP 1 x DP 4 at EP 1, load-balancing loss on: the losses, the
    logged load_balancing_loss and every weight, TP shards gathered (measured: weights to 6e-7)."""
    r, ref = results["aux_loss"][layout], results["aux_loss"]["cp1 ep1"]
    _assert_trains_as_with_aux_loss(r, ref)


def test_core_gated_deltanet_moe_hybrid_cp2_ep2_equals_cp1_ep1(results):
    """Qwen3-Next's layout (megatron-core's GatedDeltaNet layers as Lasp2CoreGatedDeltaNet,
    LASP-2H softmax, an MoE MLP in every layer, aux_loss on): CP 2 x DP 2 at EP 2 as CP 1 x DP 4."""
    r, ref = results["core_gdn"]["cp2 ep2"], results["core_gdn"]["cp1 ep1"]
    _assert_trains_as_with_aux_loss(r, ref)


def test_distributed_optimizer_with_experts_equals_plain_optimizer(results):
    """As test_megatron_pretrain's dense check, with the same tolerances (Adam's normalised
    steps turn float noise of near-zero gradients into lr-sized differences of a few weights)."""
    r = results["distopt"]
    assert r["moved"] > 1e-3, r  # the comparison is not of two untouched models
    for a, b in zip(r["plain"], r["distributed"]):
        assert abs(a - b) <= 1e-6 * abs(a), r
    assert r["weight_diff"] <= 2e-5, r


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_rank_holds_its_ep_ranks_experts(results, layout):
    """EP ignored: every rank holds experts 0-3 (fails here); EP 2: ranks of EP rank e hold
    experts 2e, 2e+1 of every layer."""
    pp, _, ep = LAYOUTS[layout]
    per_rank = EXPERTS // ep
    for (ep_rank, held), rank in zip(results["none"][layout]["held"], range(4)):
        stage = rank // (4 // pp)  # megatron-core's default order: the pipeline rank varies slowest
        layers = range(stage * 4 // pp, (stage + 1) * 4 // pp)
        assert held == [(layer, ep_rank * per_rank + i) for layer in layers for i in range(per_rank)], \
            (layout, ep_rank, held)
    assert sorted({ep_rank for ep_rank, _ in results["none"][layout]["held"]}) == list(range(ep)), layout


def test_load_balancing_loss_is_logged_the_same_at_cp2_ep2(results):
    """Megatron-LM's logged value (without the coefficient); absent without load balancing."""
    r, ref = results["aux_loss"]["cp2 ep2"], results["aux_loss"]["cp1 ep1"]
    assert all(set(step) == {"load_balancing_loss"} for step in r["aux"] + ref["aux"]), (r["aux"], ref["aux"])
    for got, want in zip(r["aux"], ref["aux"]):
        assert abs(got["load_balancing_loss"] - want["load_balancing_loss"]) <= 1e-5 * want["load_balancing_loss"]
        # E x sum_i f_i P_i (f, P: each expert's share of the routed tokens and of the router
        # probability): 1 for uniform routing, at most E; measured 1.03. A CP rank's half alone
        # (no sum over the CP ranks) would be about 0.5
        assert 0.9 < want["load_balancing_loss"] <= EXPERTS, ref["aux"]
    assert results["none"]["cp2 ep2"]["aux"] == [None, None]
    assert results["aux_moves_weights"] > 1e-4, results["aux_moves_weights"]


def test_expert_parallel_size_not_dividing_the_world_is_refused_on_every_rank(results):
    for errors in results["world_errors"]:
        assert re.search(r"--expert-model-parallel-size 3 x --tensor-model-parallel-size 1 x "
                         r"--pipeline-model-parallel-size 1 = 3 must divide the world size 4", errors[0]), errors
        assert re.search(r"= 8 must divide the world size 4", errors[1]), errors


def test_moe_checkpoint_at_ep2_resumes_at_ep4_with_the_same_step(results):
    """Step 3 at CP 1 x DP 4 x EP 4 from the CP 2 x DP 2 x EP 2 checkpoint: the loss and every
    weight (experts by global index) of the uninterrupted run (measured: loss to 3e-8 relative,
    weights to 1.2e-7)."""
    r = results["ckpt"]
    assert_resumed_as_the_uninterrupted_run(r, weight_tol=2e-5)  # Adam: as the distributed-optimizer comparison


@pytest.mark.parametrize("argv, match", [
    (["--num-experts", "4", "--expert-model-parallel-size", "3"],
     r"--num-experts 4 must be divisible by --expert-model-parallel-size 3"),
    (["--num-experts", "4", "--moe-router-topk", "5"], r"--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--num-experts", "4", "--moe-router-topk", "0"], r"--moe-router-topk 0 must be between 1"),
    (["--num-experts", "0"], r"--num-experts must be >= 1"),
    (["--expert-model-parallel-size", "2"], r"--expert-model-parallel-size needs --num-experts"),
    (["--moe-ffn-hidden-size", "16"], r"--moe-ffn-hidden-size needs --num-experts"),
    (["--num-experts", "4", "--moe-router-topk", "1"], r"--moe-router-topk 1 needs --moe-router-pre-softmax"),
    (["--num-experts", "4", "--moe-aux-loss-coeff", "-1"], r"--moe-aux-loss-coeff must be >= 0"),
    (["--moe-shared-expert-intermediate-size", "16"], r"--moe-shared-expert-intermediate-size needs --num-experts"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "0"],
     r"--moe-shared-expert-intermediate-size must be >= 1, got 0"),
    (["--moe-shared-expert-gate"], r"--moe-shared-expert-gate needs --num-experts"),
    # megatron-core builds no shared expert then, and so no gate: the flag would do nothing
    (["--num-experts", "4", "--moe-shared-expert-gate"],
     r"--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size"),
    (["--num-experts", "4", "--moe-shared-expert-overlap"],
     r"--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size"),
    # DeepEP's fused CUDA kernels: megatron-core fails when the first MoE layer is built, naming no flag
    (["--num-experts", "4", "--moe-token-dispatcher-type", "flex", "--expert-model-parallel-size", "2"],
     r"--moe-token-dispatcher-type flex needs --device cuda: megatron-core's MoEFlexTokenDispatcher dispatches "
     r"through DeepEP's fused CUDA kernels"),
    (["--num-experts", "4", "--moe-shared-expert-intermediate-size", "16", "--moe-shared-expert-overlap",
      "--device", "cuda"], r"--moe-shared-expert-overlap needs --moe-token-dispatcher-type alltoall"),
    # megatron-core's MoE layer raised at the first training step, naming no flag
    (["--num-experts", "4", "--tensor-model-parallel-size", "2"],
     r"--tensor-model-parallel-size 2 with --num-experts needs --sequence-parallel"),
])
def test_bad_moe_flags_are_refused_before_anything_is_built(argv, match):
    """lasp2_options runs on every rank before the process groups and the model: the same
    command line raises the same error everywhere."""
    from megatron_patches import Lasp2ConfigError, pretrain_gpt

    base = ["--num-layers", "4", "--device", "cpu", "--hybrid-layer-pattern", "LGSL", "--disable-bias-linear"]
    with pytest.raises(Lasp2ConfigError, match=match):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(base + argv))


@pytest.mark.parametrize("have_deep_ep, argv, match", [
    (False, ["--expert-model-parallel-size", "2"], r"--moe-token-dispatcher-type flex needs DeepEP \(the deep_ep"),
    (True, [], r"--moe-token-dispatcher-type flex needs --tensor-model-parallel-size x "
               r"--expert-model-parallel-size > 1"),
    (True, ["--expert-model-parallel-size", "2"], None)])
def test_flex_dispatcher_on_cuda_needs_deep_ep_and_an_expert_group(monkeypatch, have_deep_ep, argv, match):
    """--device cuda: without DeepEP megatron-core raises an ImportError when the first MoE layer is
    built, at TP x EP 1 an assertion naming no flag; both refused at parse time. With DeepEP (its
    import flag stood in: not installed here) and EP 2 the flag goes to megatron-core's config."""
    from megatron.core.transformer.moe import fused_a2a

    from megatron_patches import Lasp2ConfigError, pretrain_gpt
    from megatron_patches.moe import moe_config_kwargs

    monkeypatch.setattr(fused_a2a, "HAVE_DEEP_EP", have_deep_ep, raising=False)
    args = pretrain_gpt.parse_args(["--num-layers", "4", "--device", "cuda", "--hybrid-layer-pattern", "LGSL",
                                    "--disable-bias-linear", "--num-experts", "4",
                                    "--moe-token-dispatcher-type", "flex"] + argv)
    if match is not None:
        with pytest.raises(Lasp2ConfigError, match=match):
            pretrain_gpt.lasp2_options(args)
    else:
        pretrain_gpt.lasp2_options(args)
        assert moe_config_kwargs(args)["moe_token_dispatcher_type"] == "flex"


def test_moe_with_linear_biases_on_the_local_spec_is_refused():
    """megatron-core 0.16.1's expert MLP adds the fc2 bias in place to a view (autograd error at
    the first forward, measured): refused up front, naming the flag that avoids it."""
    from megatron_patches import Lasp2ConfigError, pretrain_gpt

    with pytest.raises(Lasp2ConfigError, match=r"--num-experts with the local spec needs --disable-bias-linear"):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(["--device", "cpu", "--num-experts", "4"]))


def test_moe_flags_parse_with_megatron_lm_defaults():
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches import pretrain_gpt
    from megatron_patches.moe import moe_config_kwargs

    args = pretrain_gpt.parse_args(["--device", "cpu", "--num-experts", "8", "--disable-bias-linear"])
    pretrain_gpt.lasp2_options(args)
    fields = TransformerConfig.__dataclass_fields__
    for flag, field in (("moe_router_topk", "moe_router_topk"),
                        ("moe_token_dispatcher_type", "moe_token_dispatcher_type"),
                        ("moe_router_load_balancing_type", "moe_router_load_balancing_type"),
                        ("moe_aux_loss_coeff", "moe_aux_loss_coeff"),
                        ("moe_router_pre_softmax", "moe_router_pre_softmax"),
                        ("expert_model_parallel_size", "expert_model_parallel_size")):
        assert getattr(args, flag) == fields[field].default, flag
    kwargs = moe_config_kwargs(args)
    assert kwargs["num_moe_experts"] == 8 and kwargs["moe_ffn_hidden_size"] == args.ffn_hidden_size
    assert kwargs["moe_grouped_gemm"] is False
    assert kwargs["moe_shared_expert_intermediate_size"] is None and kwargs["moe_shared_expert_overlap"] is False
    assert kwargs["moe_shared_expert_gate"] is False
    for field in ("moe_shared_expert_intermediate_size", "moe_shared_expert_gate", "moe_shared_expert_overlap"):
        assert kwargs[field] == fields[field].default, field  # no shared expert unless asked, as Megatron-LM
    assert moe_config_kwargs(pretrain_gpt.parse_args(["--device", "cpu"])) == {}
