"""The launcher (megatron_patches.pretrain_gpt) on megatron-core's own machinery, 4 gloo
processes: pipeline schedules, Megatron DDP, get_megatron_optimizer (plain and
distributed), dist_checkpointing, the mock GPT dataset.

* PP 2 x CP 2 (1F1B) and PP 2 x VPP 2 x CP 2 (interleaved 1F1B) train exactly as PP 1 x CP 1
  x DP 4: the same losses and the same weights after each SGD step (an SGD step moves every
  weight by lr x its gradient, so equal weights mean equal gradients).
* A delta-rule hybrid (pattern LGKS: gated DeltaNet and KDA layers) trains at CP 2 exactly as at CP 1.
* The distributed optimizer (DP 2 x CP 2) equals the plain one (Adam).
* `--use-torch-fsdp2` (megatron-core's TorchFullyShardedDataParallel, FSDP2 over dp-cp)
  trains the LGKS hybrid at DP 2 x CP 2 exactly as DDP at CP 1 x DP 4, with and without
  `--calculate-per-token-loss`; sharded over the dp group alone (no CP reduction) it does not.
* A checkpoint (model + distributed optimizer) saved at (TP, PP, CP) = (1, 2, 2)
  loads at (1, 1, 1) and (2, 1, 1) and the next step has the loss the uninterrupted
  run had; the saves return (a hang fails the test through the worker timeout).

Every run of one layout starts from the same weights: each parameter is set from a
generator seeded by its global name (Megatron's own initialisation depends on the
pipeline rank).
"""

import os
import zlib

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("megatron.core")

from lasp2_testing.dist import run_distributed  # noqa: E402

PATTERN = "LNLN"
GDN_PATTERN = "LGKS"  # gated DeltaNet and KDA layers
BASE = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--vocab-size", "64", "--micro-batch-size", "1", "--global-batch-size", "4",
        "--hybrid-layer-pattern", PATTERN, "--linear-attention-decay", "gate", "--device", "cpu",
        "--log-interval", "1000"]
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
}


def _layout(tp, pp, cp):
    return ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
            "--context-parallel-size", str(cp)]


def _global_named_params(chunks):
    """(global name, parameter) of this rank's chunks: layer indices made global, the last
    stage's copy of the tied embedding named as the embedding."""
    for chunk in chunks:
        model = chunk.module
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
            elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"
            yield name, param


def _set_weights(chunks):
    """TP = 1 in every run that calls this: each parameter is whole (or, under FSDP2, a
    DTensor whose shards are cut from the whole value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, param in _global_named_params(chunks):
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            values = torch.randn(param.shape, generator=gen) * 0.1
            if name.endswith(("layernorm.weight", "norm.weight", "norm_weight")):
                values += 1.0
            if isinstance(param, DTensor):
                values = distribute_tensor(values, param.device_mesh, param.placements)
            param.copy_(values)


def _whole(param):
    """A parameter's whole value (FSDP2's DTensors are gathered: a collective, same order on every rank)."""
    full_tensor = getattr(param, "full_tensor", None)
    return (full_tensor() if full_tensor is not None else param).detach().clone()


def _weights(chunks):
    """Every parameter of the whole model, on every rank (TP = 1 layouts)."""
    mine = {name: _whole(p) for name, p in _global_named_params(chunks)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    out = {}
    for part in gathered:
        out.update(part)
    return out


def _run(argv, set_weights=True):
    from megatron_patches import pretrain_gpt

    args = pretrain_gpt.parse_args(BASE + argv)
    return pretrain_gpt.pretrain(args, after_model_build=_set_weights if set_weights else None)


def _max_diff(a, b):
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _worker(rank, world, out_path, tmpdir):
    import warnings

    warnings.filterwarnings("ignore")
    from megatron_patches.cpu import enable_cpu_execution

    enable_cpu_execution()
    out = {"pipeline": {}, "ckpt": {}}
    # 1. pipeline x context parallelism against one device (DP 4), SGD, 2 steps
    runs = {}
    for name, (tp, pp, cp, extra) in LAYOUTS.items():
        result = _run(_layout(tp, pp, cp) + extra + SGD + ["--train-iters", "2"])
        runs[name] = (result["losses"], _weights(result["chunks"]))
    ref_losses, ref_weights = runs["pp1 cp1"]
    for name, (losses, weights) in runs.items():
        out["pipeline"][name] = {"losses": losses, "ref_losses": ref_losses,
                                 "weight_diff": _max_diff(weights, ref_weights)}
    # 1b. a gated DeltaNet hybrid: CP 2 (x DP 2) against CP 1 (x DP 4)
    gdn = {cp: _run(_layout(1, 1, cp) + SGD + ["--train-iters", "2", "--hybrid-layer-pattern", GDN_PATTERN])
           for cp in (1, 2)}
    out["gdn"] = {"losses": gdn[2]["losses"], "ref_losses": gdn[1]["losses"],
                  "weight_diff": _max_diff(_weights(gdn[2]["chunks"]), _weights(gdn[1]["chunks"])),
                  "kinds": "".join(layer.self_attention.layer_kind
                                   for layer in gdn[2]["chunks"][0].module.decoder.layers)}
    # 2. the distributed optimizer against the plain one (DP 2 x CP 2, Adam, 2 steps)
    plain = _run(_layout(1, 1, 2) + ADAM + ["--train-iters", "2"])
    distributed = _run(_layout(1, 1, 2) + ADAM + ["--train-iters", "2", "--use-distributed-optimizer"])
    out["distopt"] = {"plain": plain["losses"], "distributed": distributed["losses"],
                      "weight_diff": _max_diff(_weights(plain["chunks"]), _weights(distributed["chunks"])),
                      "moved": _max_diff(_weights(plain["chunks"]), ref_weights)}
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
            "weight_diff": _max_diff(_weights(fsdp["chunks"]), _weights(ddp_ref[form]["chunks"])),
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
    out["fsdp"]["mean"]["dp_only_weight_diff"] = _max_diff(_weights(dp_only["chunks"]), _weights(gdn[1]["chunks"]))
    # 3. checkpoint at (1, 2, 2) after step 2 (model + distributed optimizer; the run goes on to
    # step 3), resumed from it at other layouts
    save = os.path.join(tmpdir, "ckpt")
    opt = ADAM + ["--use-distributed-optimizer"]
    whole = _run(_layout(1, 2, 2) + opt + ["--train-iters", "3", "--save", save, "--save-interval", "2"])
    out["ckpt"]["whole"] = whole["losses"]
    for tp, pp, cp in ((1, 1, 1), (2, 1, 1)):
        resumed = _run(_layout(tp, pp, cp) + opt + ["--train-iters", "3", "--load", save, "--ckpt-step", "2"],
                       set_weights=False)
        out["ckpt"][f"resumed tp{tp} pp{pp} cp{cp}"] = resumed["losses"]
    out["files"] = sorted(os.listdir(os.path.join(save, "iter_0000002")))
    if rank == 0:
        torch.save(out, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("megatron_pretrain")
    out = tmp / "results.pt"
    run_distributed(4, _worker, str(out), str(tmp), timeout=400)
    return torch.load(out, weights_only=False)


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


@pytest.mark.parametrize("layout", ["tp1 pp1 cp1", "tp2 pp1 cp1"])
def test_checkpoint_resumes_at_another_layout_with_the_same_loss(results, layout):
    r = results["ckpt"]
    resumed = r[f"resumed {layout}"]
    assert len(resumed) == 1  # only step 3 ran: steps 1 and 2 came from the checkpoint
    assert abs(resumed[0] - r["whole"][2]) <= 1e-5 * abs(r["whole"][2]), r
    assert resumed[0] < r["whole"][0]  # it continued from trained weights, not from scratch


def test_checkpoint_is_written_by_every_rank(results):
    files = results["files"]
    assert "common.pt" in files and "metadata.json" in files
    assert sum(f.endswith(".distcp") for f in files) >= 2, files
