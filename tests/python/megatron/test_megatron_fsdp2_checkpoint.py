"""--save / --load with --use-torch-fsdp2 (megatron_patches.fsdp2_checkpoint), 4 gloo processes.

The LGSL hybrid with 4 experts top-2 of test_megatron_moe.py, Adam, 3 steps, saved after step
2 and resumed from it in a new launch; step 3 of the resumed run has the uninterrupted run's
loss and every weight:
  * FSDP2 at DP 2 x CP 2 resumed by FSDP2 at DP 2 x CP 2 (EP 1: the experts are sharded over
    dp x cp with their layers), and at EP 2;
  * the same checkpoint resumed by megatron-core's DDP at CP 1 x DP 4, and a DDP checkpoint
    (CP 1 x DP 4) resumed by FSDP2 at DP 2 x CP 2: the files hold whole tensors under DDP's
    keys, so either side loads the other's;
  * FSDP2 at DP 2 x CP 2 x EP 2 (the experts in units of their own over the expert-data-parallel
    group) resumed at the same layout, and at EP 1 (the optimizer state mapped from two optimizers
    to one, megatron_patches.moe_checkpoint);
  * FSDP2 at TP 2 x CP 2 x EP 2 (--sequence-parallel, expert TP 2) resumed by DDP at CP 1 x DP 4
    x EP 1 (TP and FSDP2 both split fc1's dim 0; without TP and PP: test_megatron_fsdp2_tp_pp.py).
Adam's update at step 3 depends on its moments and step: a resume that lost the moments, or
loaded one rank's shard where another's belongs, moves the weights by ~lr = 1e-2.

A model whose FSDP2 shards megatron-core cannot place in a checkpoint (a dim 0 that is not a
multiple of the dp-cp size: FSDP2's last shard is shorter, megatron-core assumes equal ones) is
refused at the start of a run with --save, on every rank, naming the flags. So is FSDP2's
checkpoint (the plain optimizer's) loaded with --use-distributed-optimizer, whose checkpoint
layout differs (megatron_patches.checkpointing.check_optimizer_kind; DDP alike).

Before megatron_patches.fsdp2_checkpoint the launcher refused --save / --load with FSDP2 (every
case here failed). Mutations tried once, not kept: megatron-core's placement of the expert shards
kept (only their replica ids fixed): the EP 2 save fails ("Invalid access pattern", global shape
(4, 64, 32) for (4, 32, 32): dp-cp size 4 instead of the expert-dp group's 2); the replica ids
not fixed: the EP 1 save fails the same way (rows nobody writes); the loaded shards not made
DTensors: the model's load_state_dict fails (size mismatch), the optimizer's Adam step ("aten.lerp_
got mixed torch.Tensor and DTensor").
"""

import os
import re

import pytest

pytest.importorskip("megatron.core")

from launcher_testing import (assert_resumed_as_the_uninterrupted_run, config_errors_on_every_rank,  # noqa: E402
                             max_diff, run_launcher, set_weights, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from test_megatron_moe import HYBRID, MODEL, NO_BALANCING, TP2, _layout  # noqa: E402

ADAM = HYBRID + NO_BALANCING + ["--optimizer", "adam", "--lr", "0.01", "--train-iters", "3"]
FSDP2 = ["--use-torch-fsdp2"]
SAVES = {"fsdp2 cp2": _layout(2, 1) + FSDP2, "ddp cp1": _layout(1, 1), "fsdp2 cp2 ep2": _layout(2, 2) + FSDP2,
         "fsdp2 tp2 cp2 ep2": _layout(2, 2) + TP2 + FSDP2}
RESUMES = {  # name: (the saving run, the resuming run's flags)
    "fsdp2 cp2 to fsdp2 cp2": ("fsdp2 cp2", _layout(2, 1) + FSDP2),
    "fsdp2 cp2 to ddp cp1": ("fsdp2 cp2", _layout(1, 1)),
    "fsdp2 cp2 to fsdp2 cp2 ep2": ("fsdp2 cp2", _layout(2, 2) + FSDP2),  # one optimizer to two
    "ddp cp1 to fsdp2 cp2": ("ddp cp1", _layout(2, 1) + FSDP2),
    "fsdp2 cp2 ep2 to fsdp2 cp2 ep2": ("fsdp2 cp2 ep2", _layout(2, 2) + FSDP2),
    # across EP 2 -> EP 1: the optimizer state mapped by megatron_patches.moe_checkpoint
    "fsdp2 cp2 ep2 to fsdp2 cp2 ep1": ("fsdp2 cp2 ep2", _layout(2, 1) + FSDP2),
    # TP 2 (expert TP 2: fc1 split along dim 0 by TP and FSDP2 both) x EP 2 to DDP at TP 1 x EP 1
    "fsdp2 tp2 cp2 ep2 to ddp cp1": ("fsdp2 tp2 cp2 ep2", _layout(1, 1)),
}


def _pretrain(argv, after_model_build=None):
    return run_launcher(MODEL + ADAM + argv, after_model_build=after_model_build)


def _worker(rank, world, tmpdir):
    import warnings

    warnings.filterwarnings("ignore")

    out, whole = {}, {}
    for name, argv in SAVES.items():
        path = os.path.join(tmpdir, name.replace(" ", "_"))
        run = _pretrain(argv + ["--save", path, "--save-interval", "2"], after_model_build=set_weights)
        whole[name] = {"path": path, "losses": run["losses"], "weights": whole_weights(run["chunks"])}
    for name, (saved, argv) in RESUMES.items():
        result = _pretrain(argv + ["--load", whole[saved]["path"], "--ckpt-step", "2"])  # weights from the checkpoint
        out[name] = {"whole": whole[saved]["losses"], "resumed": result["losses"],
                     "weight_diff": max_diff(whole_weights(result["chunks"]), whole[saved]["weights"])}
    # the plain optimizer's checkpoint (FSDP2's) loaded by DDP with the distributed optimizer
    out["distopt_errors"] = config_errors_on_every_rank(
        _pretrain, _layout(1, 1) + ["--use-distributed-optimizer", "--load", whole["fsdp2 cp2"]["path"],
                                    "--ckpt-step", "2"])
    # fc1's dim 0 of 30 over dp x cp = 4: FSDP2 shards of 8, 8, 8 and 6 rows
    out["uneven_errors"] = config_errors_on_every_rank(
        _pretrain, _layout(2, 1) + FSDP2 + ["--ffn-hidden-size", "30", "--save", os.path.join(tmpdir, "uneven")])
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_for_result(4, _worker, str(tmp_path_factory.mktemp("megatron_fsdp2_checkpoint")),
                                      timeout=400)


@pytest.mark.parametrize("name", list(RESUMES))
def test_fsdp2_checkpoint_resumes_as_the_uninterrupted_run(results, name):
    r = results[name]
    assert_resumed_as_the_uninterrupted_run(r, weight_tol=2e-5)  # Adam: as test_megatron_moe_resume's


def test_shards_megatron_core_cannot_place_are_refused_on_every_rank(results):
    for error in results["uneven_errors"]:
        assert error is not None and re.search(
            r"--use-torch-fsdp2 with --save / --load: megatron-core cannot place this model's shards .*"
            r"linear_fc1\.weight: dim 0 of \(30, 32\) is not a multiple of its FSDP2 mesh's 4 ranks", error), \
            results["uneven_errors"]


def test_a_plain_optimizer_checkpoint_loaded_with_the_distributed_one_is_refused_on_every_rank(results):
    """Before the checkpoint recorded its optimizer's kind: a KeyError on every rank."""
    for error in results["distopt_errors"]:
        assert error is not None and re.search(
            r"saved without --use-distributed-optimizer; loading it with --use-distributed-optimizer is not "
            r"supported", error), results["distopt_errors"]
