"""MoE checkpoints resumed across EP 1 <-> EP > 1 (megatron_patches.moe_checkpoint), 4 gloo processes.

megatron-core keeps the expert parameters in a second optimizer only at EP > 1 and prefixes
its checkpoint keys ("chained_0." dense, "chained_1." experts); at EP 1 there is one optimizer
without a prefix. The launcher maps the optimizer state across that boundary.

An LGSL hybrid (4 experts, top-2, load balancing none) trained with Adam for 3 steps and saved
after step 2: at CP 2 x DP 2 x EP 2, resumed at CP 1 x DP 4 x EP 1; at CP 1 x DP 4 x EP 1,
resumed at CP 2 x DP 2 x EP 2. Step 3 of the resumed run has the uninterrupted run's loss and
every weight (experts by global index), and Adam's step is 3 in every state of both layouts'
optimizers. Adam's update at step 3 depends on its moments and step (bias correction): a resume
that dropped the expert optimizer's moments, or the step, moves the weights by ~lr = 1e-2.

The distributed optimizer keeps per-layout shard state that is not mapped: across the boundary
it is refused at --load on every rank, naming the flags. An optimizer tensor missing from the
checkpoint on one rank is an error on every rank, before the load's collectives.
"""

import os
import re

import pytest
import torch

pytest.importorskip("megatron.core")

from launcher_testing import (assert_resumed_as_the_uninterrupted_run, config_errors_on_every_rank,  # noqa: E402
                             max_diff, run_launcher, set_weights, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from test_megatron_moe import HYBRID, MODEL, NO_BALANCING, _layout  # noqa: E402

ADAM = HYBRID + NO_BALANCING + ["--optimizer", "adam", "--lr", "0.01", "--train-iters", "3"]
# name: (CP, EP) saved, (CP, EP) resumed; DP = 4 / CP
RESUMES = {"ep2 to ep1": ((2, 2), (1, 1)), "ep1 to ep2": ((1, 1), (2, 2))}


def _pretrain(argv, after_model_build=None):
    return run_launcher(MODEL + ADAM + argv, after_model_build=after_model_build)


def _optimizer_summary(optimizer):
    """(sub-optimizers, the Adam steps of every parameter state, over all of them)."""
    subs = optimizer.chained_optimizers
    steps = {float(state["step"]) for sub in subs for state in sub.optimizer.state.values()}
    return len(subs), sorted(steps)


def _rekey_checks(rank, world, directory):
    """rekey_optimizer_state on the EP 2 checkpoint: an unprefixed (EP 1) key gets its "chained_0."
    prefix; a key the checkpoint lacks on rank 1 alone raises on every rank (none waits)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_patches.moe_checkpoint import rekey_optimizer_state

    def state(key):
        return {"state": {0: {"exp_avg": ShardedTensor.from_rank_offsets(key, torch.zeros(2))}}}

    present = state("optimizer.state.exp_avg.embedding.word_embeddings.weight")
    rekey_optimizer_state(present, directory)
    missing = "no_such_parameter" if rank == 1 else "embedding.word_embeddings.weight"
    errors = config_errors_on_every_rank(rekey_optimizer_state, state(f"optimizer.state.exp_avg.{missing}"), directory)
    return {"renamed": present["state"][0]["exp_avg"].key, "errors": errors,
            "rebuild_errors": _rebuild_checks(rank, world)}


def _rebuild_checks(rank, world):
    """state_in_current_layout fails on rank 1 alone (its checkpoint's two optimizers at different
    steps; the other ranks' inputs rebuild): every rank raises, none goes on to train."""
    from types import SimpleNamespace

    from megatron_patches.moe_checkpoint import state_in_current_layout

    optimizer = SimpleNamespace(optimizer=SimpleNamespace(param_groups=[]))  # one optimizer, no groups
    loaded = {"state": {}, "param_groups": []}
    steps = (1, 2) if rank == 1 else (2, 2)
    saved = {i: {"state": {"common_step": torch.tensor(step)}, "param_groups": []} for i, step in enumerate(steps)}
    return config_errors_on_every_rank(state_in_current_layout, loaded, saved, optimizer)


def _worker(rank, world, tmpdir):
    import warnings

    warnings.filterwarnings("ignore")

    out = {}
    for name, (saved, resumed) in RESUMES.items():
        path = os.path.join(tmpdir, name.replace(" ", "_"))
        whole = _pretrain(_layout(*saved) + ["--save", path, "--save-interval", "2"], after_model_build=set_weights)
        whole_weights_ = whole_weights(whole["chunks"])  # named by the saving run's EP ranks
        result = _pretrain(_layout(*resumed) + ["--load", path, "--ckpt-step", "2"])  # weights from the checkpoint
        out[name] = {"whole": whole["losses"], "resumed": result["losses"],
                     "weight_diff": max_diff(whole_weights(result["chunks"]), whole_weights_),
                     "saved_optimizer": _optimizer_summary(whole["optimizer"]),
                     "resumed_optimizer": _optimizer_summary(result["optimizer"])}
    out["distopt_errors"] = config_errors_on_every_rank(
        _pretrain, _layout(1, 1) + ["--use-distributed-optimizer", "--load", os.path.join(tmpdir, "ep2_to_ep1"),
                                    "--ckpt-step", "2"])
    out["rekey"] = _rekey_checks(rank, world, os.path.join(tmpdir, "ep2_to_ep1", "iter_0000002"))
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_for_result(4, _worker, str(tmp_path_factory.mktemp("megatron_moe_resume")), timeout=300)


@pytest.mark.parametrize("name", list(RESUMES))
def test_moe_checkpoint_resumes_across_ep1_with_the_same_step(results, name):
    r = results[name]
    assert_resumed_as_the_uninterrupted_run(r, weight_tol=2e-5)  # Adam: as test_megatron_moe's EP 2 -> EP 4 resume


@pytest.mark.parametrize("name", list(RESUMES))
def test_the_resume_crossed_the_optimizer_layout_and_kept_adams_step(results, name):
    """Two optimizers (dense, experts) at EP 2, one at EP 1; every state at step 3 after the resume."""
    r = results[name]
    saved_ep, resumed_ep = RESUMES[name][0][1], RESUMES[name][1][1]
    assert r["saved_optimizer"] == (2 if saved_ep > 1 else 1, [3.0]), r
    assert r["resumed_optimizer"] == (2 if resumed_ep > 1 else 1, [3.0]), r


def test_distributed_optimizer_across_ep1_is_refused_on_every_rank(results):
    for error in results["distopt_errors"]:
        assert error is not None and re.search(
            r"saved at --expert-model-parallel-size 2; loading it at --expert-model-parallel-size 1 maps the "
            r"optimizer state only for the plain fp32 optimizer, not DistributedOptimizer", error), \
            results["distopt_errors"]


def test_optimizer_tensor_keys_take_the_checkpoints_prefix(results):
    assert results["rekey"]["renamed"] == "chained_0.optimizer.state.exp_avg.embedding.word_embeddings.weight"


def test_an_optimizer_tensor_missing_on_one_rank_is_an_error_on_every_rank(results):
    for error in results["rekey"]["errors"]:
        assert error is not None and re.search(
            r"cannot map this MoE checkpoint's optimizer state .*no optimizer tensor "
            r"'optimizer.state.exp_avg.no_such_parameter'", error), results["rekey"]["errors"]


def test_a_rebuild_failing_on_one_rank_raises_on_every_rank(results):
    for error in results["rekey"]["rebuild_errors"]:
        assert error is not None and re.search(
            r"cannot rebuild this MoE checkpoint's optimizer state .*different steps", error), \
            results["rekey"]["rebuild_errors"]


class _FP32Stub:
    """A ChainedOptimizer's view for optimizer_layout_changes: its sub-optimizers' types."""

    def __init__(self, *types):
        self.chained_optimizers = [object.__new__(t) for t in types]


@pytest.mark.parametrize("saved, ep, changes", [(2, 1, True), (1, 4, True), (2, 4, False), (4, 2, False),
                                                (1, 1, False), (None, 1, False), (None, 2, False)])
def test_optimizer_layout_changes_only_across_ep1(saved, ep, changes):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params, FP32Optimizer

    from megatron_patches import Lasp2ConfigError
    from megatron_patches.moe_checkpoint import optimizer_layout_changes

    assert optimizer_layout_changes(saved, ep, _FP32Stub(FP32Optimizer, FP32Optimizer)) is changes
    for unmapped in (DistributedOptimizer, Float16OptimizerWithFloat16Params):  # --use-distributed-optimizer, --bf16
        optimizer = _FP32Stub(FP32Optimizer, unmapped)
        if changes:
            with pytest.raises(Lasp2ConfigError, match=f"not {unmapped.__name__}"):
                optimizer_layout_changes(saved, ep, optimizer)
        else:  # the same side of EP 1 | EP > 1: megatron-core's own load, whatever the optimizer
            assert optimizer_layout_changes(saved, ep, optimizer) is False
