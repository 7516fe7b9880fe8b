"""The launcher (megatron_patches.pretrain_gpt) on megatron-core's own machinery, 4 gloo
processes: pipeline schedules, Megatron DDP, get_megatron_optimizer (plain and
distributed), dist_checkpointing, the mock GPT dataset.

* PP 2 x CP 2 (1F1B) and PP 2 x VPP 2 x CP 2 (interleaved 1F1B) train exactly as PP 1 x CP 1
  x DP 4: the same losses and the same weights after each SGD step (an SGD step moves every
  weight by lr x its gradient, so equal weights mean equal gradients).
* TP 2 x CP 2 with --sequence-parallel (weights TP-sharded from the same whole values) too.
* A delta-rule hybrid (pattern LGKS: gated DeltaNet and KDA layers) trains at CP 2 exactly as at CP 1.
* megatron-core's own gated DeltaNet hybrid (--experimental-attention-variant gated_delta_net
  --linear-attention-freq: Lasp2CoreGatedDeltaNet layers, LASP-2H softmax) trains at CP 2
  exactly as at CP 1; its checkpoint saved at CP 2 x DP 2 resumes at TP 2 x CP 2 with the
  uninterrupted run's loss; bad flag combinations are refused before anything is built.
* The distributed optimizer (DP 2 x CP 2) equals the plain one (Adam).
* `--use-torch-fsdp2` (megatron-core's TorchFullyShardedDataParallel, FSDP2 over dp-cp)
  trains the LGKS hybrid at DP 2 x CP 2 exactly as DDP at CP 1 x DP 4, with and without
  `--calculate-per-token-loss`; sharded over the dp group alone (no CP reduction) it does not.
  With the per-token loss it also equals DDP when ranks hold unequal token counts (a loss mask
  with zeros), over 4 accumulated micro-batches, with gradient clipping active.
* A checkpoint (model + distributed optimizer) saved at (TP, PP, CP) = (1, 2, 2)
  loads at (1, 1, 1) and (2, 1, 1) and the next step has the loss the uninterrupted
  run had; the saves return (a hang fails the test through the worker timeout).

Every run of one layout starts from the same weights: each parameter is set from a
generator seeded by its global name (Megatron's own initialisation depends on the
pipeline rank).
"""

import os

import pytest
import torch.distributed as dist

pytest.importorskip("megatron.core")

from launcher_testing import (assert_resumed_as_the_uninterrupted_run, max_diff, run_launcher,  # noqa: E402
                             set_weights, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402

PATTERN = "LNLN"
GDN_PATTERN = "LGKS"  # gated DeltaNet and KDA layers
MODEL = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
         "--vocab-size", "64", "--micro-batch-size", "1", "--global-batch-size", "4", "--device", "cpu",
         "--log-interval", "1000"]
BASE = MODEL + ["--hybrid-layer-pattern", PATTERN, "--linear-attention-decay", "gate"]
# megatron-core's own gated DeltaNet hybrid (its flags; list form of the frequency): GDN, GDN,
# softmax, GDN, built with local modules and Lasp2CoreGatedDeltaNet
CORE_GDN = ["--experimental-attention-variant", "gated_delta_net",
            "--linear-attention-freq", "([1]*2+[0])+[1]", "--linear-conv-kernel-dim", "3",
            "--linear-key-head-dim", "8", "--linear-value-head-dim", "8", "--linear-num-key-heads", "2",
            "--linear-num-value-heads", "4"]
SGD = ["--optimizer", "sgd", "--lr", "0.5", "--clip-grad", "0"]
ADAM = ["--optimizer", "adam", "--lr", "0.01", "--clip-grad", "0"]
PER_TOKEN = ["--calculate-per-token-loss"]
LOSS_FORMS = {"mean": [], "per_token": PER_TOKEN}  # a rank's loss: mean, or sum, over its tokens
LAYOUTS = {  # name: (TP, PP, CP, extra)
    "pp1 cp1": (1, 1, 1, []),
    "pp2 cp2": (1, 2, 2, []),
    # interleaved 1F1B, two virtual stages of one layer per pipeline rank; 4 micro-batches, so the
    # steady state sends activations and gradients between the two ranks in one step
    "pp2 vpp2 cp2": (1, 2, 2, ["--num-layers-per-virtual-pipeline-stage", "1"]),
    # Megatron's sequence parallelism: the CPU's torch norms take it through
    # apply_megatron_core_fixes, their gradients summed over TP (test_megatron_moe.py: with MoE)
    "tp2 cp2 sp": (2, 1, 2, ["--sequence-parallel"]),
}


def _layout(tp, pp, cp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--context-parallel-size", str(cp)]


def _run(argv, set_weights_first=True, base=BASE):
    return run_launcher(base + argv, after_model_build=set_weights if set_weights_first else None)


def _worker(rank, world, tmpdir):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_patches.cpu import enable_cpu_execution

    enable_cpu_execution()
    out = {"pipeline": {}, "ckpt": {}}
    # 1. pipeline x context parallelism against one device (DP 4), SGD, 2 steps
    runs = {}
    for name, (tp, pp, cp, extra) in LAYOUTS.items():
        result = _run(_layout(tp, pp, cp) + extra + SGD + ["--train-iters", "2"])
        runs[name] = (result["losses"], whole_weights(result["chunks"]))
    ref_losses, ref_weights = runs["pp1 cp1"]
    for name, (losses, weights) in runs.items():
        out["pipeline"][name] = {"losses": losses, "ref_losses": ref_losses,
                                 "weight_diff": max_diff(weights, ref_weights)}
    # 1b. a gated DeltaNet hybrid: CP 2 (x DP 2) against CP 1 (x DP 4)
    gdn = {cp: _run(_layout(1, 1, cp) + SGD + ["--train-iters", "2", "--hybrid-layer-pattern", GDN_PATTERN])
           for cp in (1, 2)}
    out["gdn"] = {"losses": gdn[2]["losses"], "ref_losses": gdn[1]["losses"],
                  "weight_diff": max_diff(whole_weights(gdn[2]["chunks"]), whole_weights(gdn[1]["chunks"])),
                  "kinds": "".join(layer.self_attention.layer_kind
                                   for layer in gdn[2]["chunks"][0].module.decoder.layers)}
    # 1c. megatron-core's gated DeltaNet hybrid (Lasp2CoreGatedDeltaNet): CP 2 (x DP 2) against CP 1 (x DP 4)
    from megatron_patches.core_gdn import Lasp2CoreGatedDeltaNet

    core = {cp: _run(_layout(1, 1, cp) + SGD + ["--train-iters", "2"] + CORE_GDN, base=MODEL) for cp in (1, 2)}
    layers = core[2]["chunks"][0].module.decoder.layers
    out["core_gdn"] = {
        "losses": core[2]["losses"], "ref_losses": core[1]["losses"],
        "weight_diff": max_diff(whole_weights(core[2]["chunks"]), whole_weights(core[1]["chunks"])),
        "kinds": "".join("G" if isinstance(layer.self_attention, Lasp2CoreGatedDeltaNet)
                         else layer.self_attention.layer_kind for layer in layers),
        "gdn_input_norm": [type(layer.input_layernorm).__name__ for layer in layers]}
    # its checkpoint (Adam) saved at CP 2 x DP 2 after step 2, resumed at TP 2 x CP 2 (in_proj's
    # [q, k, v, z, beta, alpha] sections resharded by megatron-core's sharded_state_dict)
    core_save = os.path.join(tmpdir, "core_gdn_ckpt")
    core_whole = _run(_layout(1, 1, 2) + ADAM + CORE_GDN + ["--train-iters", "3", "--save", core_save,
                                                            "--save-interval", "2"], base=MODEL)
    core_resumed = _run(_layout(2, 1, 2) + ADAM + CORE_GDN + ["--train-iters", "3", "--load", core_save,
                                                              "--ckpt-step", "2"], set_weights_first=False, base=MODEL)
    out["core_gdn"]["ckpt"] = {"whole": core_whole["losses"], "resumed": core_resumed["losses"]}
    # 2. the distributed optimizer against the plain one (DP 2 x CP 2, Adam, 2 steps)
    plain = _run(_layout(1, 1, 2) + ADAM + ["--train-iters", "2"])
    distributed = _run(_layout(1, 1, 2) + ADAM + ["--train-iters", "2", "--use-distributed-optimizer"])
    out["distopt"] = {"plain": plain["losses"], "distributed": distributed["losses"],
                      "weight_diff": max_diff(whole_weights(plain["chunks"]), whole_weights(distributed["chunks"])),
                      "moved": max_diff(whole_weights(plain["chunks"]), ref_weights)}
    # 2b. FSDP2 over dp-cp (DP 2 x CP 2) against DDP at CP 1 x DP 4, the LGKS hybrid, SGD, with
    # each loss form: the mean over a rank's tokens (DDP's run is 1b's) and the per-token sum
    from torch.distributed.tensor import DTensor

    gdn_sgd = SGD + ["--train-iters", "2", "--hybrid-layer-pattern", GDN_PATTERN]
    ddp_ref = {"mean": gdn[1], "per_token": _run(_layout(1, 1, 1) + gdn_sgd + PER_TOKEN)}
    out["fsdp"] = {}
    for form, extra in LOSS_FORMS.items():
        fsdp = _run(_layout(1, 1, 2) + gdn_sgd + extra + ["--use-torch-fsdp2"])
        out["fsdp"][form] = {
            "losses": fsdp["losses"], "ref_losses": ddp_ref[form]["losses"],
            "weight_diff": max_diff(whole_weights(fsdp["chunks"]), whole_weights(ddp_ref[form]["chunks"])),
            "sharded": all(isinstance(p, DTensor) for p in fsdp["chunks"][0].module.parameters())}
    # the same sharded over the dp group only: CP ranks keep partial gradients, the check must see it
    from megatron.core import parallel_state as ps
    from megatron_patches import torch_fsdp

    wrap = torch_fsdp.wrap_torch_fsdp2
    torch_fsdp.wrap_torch_fsdp2 = lambda config, module: wrap(config, module, ps.get_data_parallel_group())
    try:
        dp_only = _run(_layout(1, 1, 2) + SGD + ["--train-iters", "2", "--hybrid-layer-pattern", GDN_PATTERN,
                                                 "--use-torch-fsdp2"])
    finally:
        torch_fsdp.wrap_torch_fsdp2 = wrap
    out["fsdp"]["mean"]["dp_only_weight_diff"] = max_diff(whole_weights(dp_only["chunks"]), whole_weights(gdn[1]["chunks"]))
    # 2c. per-token loss with unequal token counts per rank (loss mask 0 where the token is a
    # multiple of 3), 4 micro-batches per rank at DP 2 and gradient clipping active: FSDP2 equals DDP
    out["fsdp"]["masked"] = _fsdp_with_unequal_token_counts(gdn_sgd + PER_TOKEN + [
        "--clip-grad", "0.05", "--global-batch-size", "8"])
    # 3. checkpoint at (1, 2, 2) after step 2 (model + distributed optimizer; the run goes on to
    # step 3), resumed from it at other layouts
    save = os.path.join(tmpdir, "ckpt")
    opt = ADAM + ["--use-distributed-optimizer"]
    whole = _run(_layout(1, 2, 2) + opt + ["--train-iters", "3", "--save", save, "--save-interval", "2"])
    out["ckpt"]["whole"] = whole["losses"]
    whole_after_step_3 = whole_weights(whole["chunks"])
    for tp, pp, cp in ((1, 1, 1), (2, 1, 1)):
        resumed = _run(_layout(tp, pp, cp) + opt + ["--train-iters", "3", "--load", save, "--ckpt-step", "2"],
                       set_weights_first=False)
        out["ckpt"][f"resumed tp{tp} pp{pp} cp{cp}"] = resumed["losses"]
        out["ckpt"][f"weight_diff tp{tp} pp{pp} cp{cp}"] = max_diff(whole_weights(resumed["chunks"]), whole_after_step_3)
    out["files"] = sorted(os.listdir(os.path.join(save, "iter_0000002")))
    # 3b. SGD with momentum (megatron-core gives SGD no init_state_fn, which its loading calls):
    # saved after step 2 at (1, 1, 2), resumed there for steps 3 and 4; step 4's loss and the
    # weights read the momentum buffers the load restored
    sgd_save = os.path.join(tmpdir, "ckpt_sgd")
    sgd = ["--optimizer", "sgd", "--sgd-momentum", "0.9", "--lr", "0.1", "--clip-grad", "0"] + _layout(1, 1, 2)
    sgd_whole = _run(sgd + ["--train-iters", "4", "--save", sgd_save, "--save-interval", "2"])
    sgd_resumed = _run(sgd + ["--train-iters", "4", "--load", sgd_save, "--ckpt-step", "2"], set_weights_first=False)
    out["ckpt_sgd"] = {"whole": sgd_whole["losses"], "resumed": sgd_resumed["losses"],
                       "weight_diff": max_diff(whole_weights(sgd_resumed["chunks"]), whole_weights(sgd_whole["chunks"]))}
    return out


def _fsdp_with_unequal_token_counts(argv):
    from megatron_patches import pretrain_gpt

    plain_iterator, plain_loss, plain_log = pretrain_gpt.data_iterator, pretrain_gpt.loss_func, pretrain_gpt._log
    counts, norms = [], []

    def masked_iterator(args, dataset, start_iteration):
        for batch in plain_iterator(args, dataset, start_iteration):  # the same tokens masked in every layout
            batch["loss_mask"] = (batch["tokens"] % 3 != 0).to(batch["loss_mask"].dtype)
            yield batch

    def counting_loss(loss_mask, output_tensor):
        counts.append(int(loss_mask.sum()))
        return plain_loss(loss_mask, output_tensor)

    def grad_norms(line):  # rank 0's step lines: the norm before clipping, of the 1 / tokens scaled gradient
        if "grad norm" in line:
            norms[-1].append(float(line.split("grad norm ")[1].split()[0]))

    pretrain_gpt.data_iterator, pretrain_gpt.loss_func, pretrain_gpt._log = masked_iterator, counting_loss, grad_norms
    try:
        runs = []
        for extra in (_layout(1, 1, 1), _layout(1, 1, 2) + ["--use-torch-fsdp2"]):
            norms.append([])
            runs.append(_run(argv + ["--log-interval", "1"] + extra))
        ddp, fsdp = runs
    finally:
        pretrain_gpt.data_iterator, pretrain_gpt.loss_func, pretrain_gpt._log = plain_iterator, plain_loss, plain_log
    every_rank = [None] * dist.get_world_size()
    dist.all_gather_object(every_rank, counts)
    return {"losses": fsdp["losses"], "ref_losses": ddp["losses"], "counts": sorted(set(sum(every_rank, []))),
            "grad_norms": norms[1], "ref_grad_norms": norms[0],
            "weight_diff": max_diff(whole_weights(fsdp["chunks"]), whole_weights(ddp["chunks"]))}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_for_result(4, _worker, str(tmp_path_factory.mktemp("megatron_pretrain")), timeout=400)


@pytest.mark.parametrize("layout", [k for k in LAYOUTS if k != "pp1 cp1"])
def test_pipeline_x_context_parallel_equals_one_device(results, layout):
    r = results["pipeline"][layout]
    assert len(r["losses"]) == 2
    for got, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), r
    assert r["weight_diff"] <= 1e-5, r  # after two SGD steps of lr 0.5: the gradients agree


def test_gated_deltanet_hybrid_cp2_equals_cp1(results):
    r = results["gdn"]
    assert r["kinds"] == GDN_PATTERN and len(r["losses"]) == 2
    for got, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), r
    assert r["weight_diff"] <= 1e-5, r


def test_core_gated_deltanet_hybrid_cp2_equals_cp1(results):
    """megatron-core's layer order from --linear-attention-freq, its GatedDeltaNet as
    Lasp2CoreGatedDeltaNet after a layer input norm (the unfused in_proj), LASP-2H softmax.
    With the delta rule's state exchange off (each rank alone) the weights differ by 0.41
    (measured; 2e-6 with it)."""
    r = results["core_gdn"]
    assert r["kinds"] == "GGSG" and len(r["losses"]) == 2, r
    assert all(name != "IdentityOp" for name in r["gdn_input_norm"]), r
    for got, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), r
    assert r["weight_diff"] <= 1e-5, r


def test_core_gated_deltanet_checkpoint_resumes_at_tp2_cp2(results):
    """Step 3 at TP 2 x CP 2 from the CP 2 x DP 2 checkpoint has the uninterrupted run's loss."""
    r = results["core_gdn"]["ckpt"]
    assert_resumed_as_the_uninterrupted_run(r)


@pytest.mark.parametrize("argv, match", [
    (["--sp-provider", "none"], "runs its GatedDeltaNet layers under --sp-provider lasp2"),
    (["--linear-attention-freq", "[1,1,0]"], "Invalid length of linear_attention_pattern: 3, expected 4"),
    (["--linear-attention-freq", "[1,2,0,1]"], "holds 1 .gated DeltaNet. or 0"),
    (["--linear-attention-freq", "0"], "must be an int >= 1"),
    (["--hybrid-layer-pattern", "GGSG"], "both set the layer order"),
    # before: raised by the layers at build time, so with PP 2 and layers GGSS only the first
    # stage did; the second stage's ranks failed with gloo's 'Connection closed by peer'
    (["--sp-provider", "ulysses", "--context-parallel-size", "2", "--linear-num-key-heads", "1",
      "--linear-num-value-heads", "3"], r"--linear-num-value-heads 3 / --tensor-model-parallel-size 1 = 3 must be "
                                         r"divisible by --context-parallel-size 2"),
    (["--sp-provider", "ulysses", "--context-parallel-size", "2", "--tensor-model-parallel-size", "2",
      "--linear-num-key-heads", "2", "--linear-num-value-heads", "2"], r"/ --tensor-model-parallel-size 2 = 1 must"),
])
def test_core_gated_deltanet_bad_flag_combinations(argv, match):
    """Refused before any process group or model exists (every rank raises the same)."""
    from megatron_patches import Lasp2ConfigError, pretrain_gpt

    with pytest.raises(Lasp2ConfigError, match=match):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(MODEL + CORE_GDN + argv))


@pytest.mark.parametrize("pattern, split", [("LLNN", "contiguous"), ("GGNN", "balanced"), ("NNKN", "balanced")])
def test_ulysses_heads_not_divisible_by_cp_refused_on_every_rank(pattern, split):
    """Before: only the layers checked it when built, so with PP 2 the stage without such a
    layer (LLNN: the second) failed with gloo's 'Connection closed by peer' instead."""
    from megatron_patches import Lasp2ConfigError, pretrain_gpt

    argv = MODEL + ["--hybrid-layer-pattern", pattern, "--sp-provider", "ulysses", "--sp-split", split,
                    "--context-parallel-size", "2", "--pipeline-model-parallel-size", "2"]
    with pytest.raises(Lasp2ConfigError, match=r"--num-attention-heads 3 / --tensor-model-parallel-size 1 = 3 must "
                                               r"be divisible by --context-parallel-size 2"):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(argv + ["--hidden-size", "48", "--num-attention-heads", "3"]))
    assert pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(argv)).provider == "ulysses"  # 4 heads: divisible


def test_core_gated_deltanet_flags_parse_as_megatron_lm():
    """--linear-attention-freq: an int or Megatron-LM's list expression (no eval: names are
    refused); the linear_* sizes only with the variant; no variant without a frequency."""
    from megatron_patches import Lasp2ConfigError, pretrain_gpt

    args = pretrain_gpt.parse_args(MODEL + CORE_GDN + ["--linear-attention-freq", "([1]*3+[0])*1"])
    assert args.linear_attention_freq == [1, 1, 1, 0]
    assert pretrain_gpt.lasp2_options(args).layer_pattern == "GGGS"
    args = pretrain_gpt.parse_args(MODEL + CORE_GDN + ["--linear-attention-freq", "2"])
    assert args.linear_attention_freq == 2 and pretrain_gpt.lasp2_options(args).layer_pattern == "GSGS"
    # validated against that order: ulysses takes the balanced split for GDN layers (not for
    # the default pattern's linear-attention layers, whose check refused this before)
    ulysses = pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(MODEL + CORE_GDN + ["--sp-provider", "ulysses"]))
    assert (ulysses.provider, ulysses.split, ulysses.layer_pattern) == ("ulysses", "balanced", "GGSG")
    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(MODEL + ["--linear-attention-freq", "__import__('os').getpid()"])
    with pytest.raises(Lasp2ConfigError, match="--linear-num-key-heads is for --experimental-attention-variant"):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(MODEL + ["--linear-num-key-heads", "2"]))
    with pytest.raises(Lasp2ConfigError, match="needs --linear-attention-freq"):
        pretrain_gpt.lasp2_options(pretrain_gpt.parse_args(MODEL + ["--experimental-attention-variant",
                                                                    "gated_delta_net"]))


@pytest.mark.parametrize("freq", [
    "[1]*100000000",  # 0.8 GB allocated, then compared with --num-layers
    "[1]*1000000000000",  # MemoryError
    "[]*100000000000000000000",  # OverflowError
    "+".join(["1"] * 20000),  # RecursionError in ast.parse
], ids=["800MB", "MemoryError", "OverflowError", "RecursionError"])
def test_linear_attention_freq_too_large_is_an_argument_error(freq, capsys):
    """Bounded before it is built: argparse's error naming the flag, not a traceback or a
    list of a billion layers."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(MODEL + CORE_GDN + ["--linear-attention-freq", freq])
    assert "argument --linear-attention-freq: expected an int or a list of at most" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value", [("--linear-key-head-dim", "0"), ("--linear-num-key-heads", "-1"),
                                         ("--linear-conv-kernel-dim", "0"), ("--linear-value-head-dim", "x")])
def test_linear_sizes_below_one_are_argument_errors(flag, value, capsys):
    """Refused at parse time on every rank. Before: at CP 1 megatron-core's config took them and
    only the pipeline stages holding a GatedDeltaNet layer raised; PP 2 with layers GGSS: ranks
    of the second stage failed with gloo's 'Connection closed by peer'."""
    from megatron_patches import pretrain_gpt

    with pytest.raises(SystemExit):
        pretrain_gpt.parse_args(MODEL + CORE_GDN + [flag, value])
    assert f"argument {flag}: expected an int >= 1, got {value!r}" in capsys.readouterr().err


def test_distributed_optimizer_equals_plain_optimizer(results):
    r = results["distopt"]
    assert r["moved"] > 1e-3  # Adam moved the weights: the comparison is not of two untouched models
    for a, b in zip(r["plain"], r["distributed"]):
        assert abs(a - b) <= 1e-6 * abs(a), r
    # Adam's normalised steps turn float noise of near-zero gradients into ~lr-sized differences
    # of a few weights (measured 2e-6 after two steps of lr 0.01)
    assert r["weight_diff"] <= 2e-5, r


@pytest.mark.parametrize("form", LOSS_FORMS)
def test_torch_fsdp2_over_dp_cp_equals_ddp_at_cp1(results, form):
    """per_token: FSDP2 must sum over dp-cp and apply finalize_model_grads' 1 / tokens, as DDP
    does; without the division (megatron-core's FSDP2 class alone) the weights ended 175 off."""
    r = results["fsdp"][form]
    assert r["sharded"], r  # every parameter is an FSDP2 shard (DTensor): FSDP did run
    assert len(r["losses"]) == 2
    for got, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), r
    assert r["weight_diff"] <= 1e-5, r  # two SGD steps of lr 0.5: the gradients agree
    if form == "mean":
        assert r["dp_only_weight_diff"] > 1e-2, r  # without CP in the FSDP group (measured 0.15)


def test_torch_fsdp2_per_token_loss_with_unequal_token_counts_equals_ddp(results):
    """The loss mask leaves ranks and micro-batches different token counts (the all-ones mock
    mask cannot tell 1 / global tokens from 1 / (local tokens x ranks)); 4 micro-batches per
    rank accumulate; the gradient norm (3.0 measured) is clipped to 0.05, from FSDP2's
    sharded gradients as from DDP's whole ones, after the 1 / tokens scaling in both (the
    reported norm is taken before clipping: it checks that scale, the weights the clipping)."""
    r = results["fsdp"]["masked"]
    assert len(r["counts"]) > 1, r  # unequal token counts
    assert len(r["losses"]) == 2 and len(r["grad_norms"]) == 2 and min(r["ref_grad_norms"]) > 1.0, r
    for got, ref in zip(r["grad_norms"], r["ref_grad_norms"]):
        assert abs(got - ref) <= 1e-3 * ref, r  # the log prints 4 decimals
    for got, ref in zip(r["losses"], r["ref_losses"]):
        assert abs(got - ref) <= 1e-5 * abs(ref), r
    assert r["weight_diff"] <= 1e-6, r  # clipped SGD steps move weights by at most lr x 0.05


@pytest.mark.parametrize("layout", ["tp1 pp1 cp1", "tp2 pp1 cp1"])
def test_checkpoint_resumes_at_another_layout_with_the_same_loss(results, layout):
    """And the same weights after step 3: megatron-core's distributed optimizer shares one Adam
    step tensor between its parameters after a load, which torch's Adam then advanced once per
    parameter (the weights 3.3e-3 off before checkpointing.own_step_count_per_parameter; the
    loss of step 3, computed before the update, agreed)."""
    r = results["ckpt"]
    resumed = r[f"resumed {layout}"]
    assert len(resumed) == 1  # only step 3 ran: steps 1 and 2 came from the checkpoint
    assert abs(resumed[0] - r["whole"][2]) <= 1e-5 * abs(r["whole"][2]), r
    assert resumed[0] < r["whole"][0]  # it continued from trained weights, not from scratch
    assert r[f"weight_diff {layout}"] <= 2e-5, r


def test_sgd_with_momentum_resumes_with_the_same_losses_and_weights(results):
    r = results["ckpt_sgd"]
    assert len(r["resumed"]) == 2, r  # steps 3 and 4; 1 and 2 came from the checkpoint
    for got, want in zip(r["resumed"], r["whole"][2:]):
        assert abs(got - want) <= 1e-5 * abs(want), r
    assert r["weight_diff"] <= 1e-6, r


def test_checkpoint_is_written_by_every_rank(results):
    files = results["files"]
    assert "common.pt" in files and "metadata.json" in files
    assert sum(f.endswith(".distcp") for f in files) >= 2, files
