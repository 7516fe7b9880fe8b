"""--moe-token-dispatcher-type alltoall (megatron-core's MoEAlltoAllTokenDispatcher, Megatron-LM's
usual choice at EP > 1) on CPU with gloo, 4 processes.

On CPU the dispatcher runs through the launcher's CPU patches (megatron_patches.cpu,
"moe_alltoall": its CUDA stream and event do nothing, its split sizes become numpy arrays as
from a GPU); the dispatch itself is megatron-core's: permute by expert, all_to_all_single over the
EP group with uneven splits (gloo), sort by local expert, the expert MLPs, and back.

An LGSL hybrid with an MoE MLP in every layer (4 experts, top-2, load balancing none) trained two
SGD steps at CP 2 x DP 2 with the alltoall dispatcher has the losses and every weight (experts by
global index) of the allgather dispatcher at the same layout and of CP 1 x DP 4 at EP 1: at EP 2
(two local experts per rank: the tokens a rank receives are re-sorted by local expert) and at EP 4
(one per rank). Tokens sent to the wrong rank, or combined in the wrong order, change the expert
outputs and so the losses and the router and expert gradients.

So do PP 2 x CP 2 at EP 2 (1F1B; each stage's layers dispatch over their own EP group) and
TP 2 x CP 2 at EP 2 with --sequence-parallel (expert TP 2: the dispatcher
gathers the tokens its TP ranks send to an expert, a different number from each, and
reduce-scatters them back). That gather is an all_gather into unequal slices, which gloo
refuses; the launcher's CPU patches pad it ("uneven_all_gather"): without that patch the TP
run fails at the first step (gloo: "invalid tensor size"; TP 2 x DP 2 the same, run once).

--moe-token-dispatcher-type flex (megatron-core's MoEFlexTokenDispatcher: DeepEP's or HybridEP's
fused CUDA kernels, no CPU path) is refused on every rank on CPU, naming the flag and why, before
anything is built (test_megatron_moe.py: the same on CUDA without DeepEP, and at TP x EP 1).
Before session 23 argparse refused it as an invalid choice, saying nothing of why.
"""

import pytest

pytest.importorskip("megatron.core")

from launcher_testing import (assert_same_losses, config_errors_on_every_rank, initial_value, max_diff,  # noqa: E402
                             run_launcher, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from test_megatron_moe import HYBRID, MODEL, NO_BALANCING, TP2, _layout  # noqa: E402

FLEX = ["--moe-token-dispatcher-type", "flex"]
# name: (layout flags, EP, dispatcher); DP = 4 / (TP x PP x CP)
RUNS = {"cp1 ep1 allgather": (_layout(1, 1), 1, "allgather"), "cp2 ep2 allgather": (_layout(2, 2), 2, "allgather"),
        "cp2 ep2 alltoall": (_layout(2, 2), 2, "alltoall"), "cp2 ep4 alltoall": (_layout(2, 4), 4, "alltoall"),
        "pp2 cp2 ep2 alltoall": (_layout(2, 2, pp=2), 2, "alltoall"),
        "tp2 cp2 ep2 alltoall": (_layout(2, 2) + TP2, 2, "alltoall")}


def _run(argv):
    return run_launcher(MODEL + HYBRID + NO_BALANCING + argv)


def _worker(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    out = {}
    for name, (layout, _, dispatcher) in RUNS.items():
        result = _run(layout + ["--moe-token-dispatcher-type", dispatcher])
        layer = result["chunks"][0].module.decoder.layers[0]
        out[name] = {"losses": result["losses"], "weights": whole_weights(result["chunks"]),
                     "dispatcher": type(layer.mlp.token_dispatcher).__name__,
                     "local_experts": layer.mlp.num_local_experts}
    out["flex_errors"] = config_errors_on_every_rank(_run, _layout(2, 2) + FLEX)
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed_for_result(4, _worker, timeout=300)


@pytest.mark.parametrize("name, reference", [("cp2 ep2 alltoall", "cp2 ep2 allgather"),
                                             ("cp2 ep2 alltoall", "cp1 ep1 allgather"),
                                             ("cp2 ep4 alltoall", "cp1 ep1 allgather"),
                                             ("pp2 cp2 ep2 alltoall", "cp1 ep1 allgather"),
                                             ("tp2 cp2 ep2 alltoall", "cp1 ep1 allgather")])
def test_alltoall_dispatcher_trains_as_allgather_and_as_ep1(results, name, reference):
    """Measured: PP 2 losses to 6e-8 relative, weights to 2.4e-7; TP 2 losses to 1e-7,
    weights to 9e-7 (TP 2 x DP 2, run once: the same)."""
    r, ref = results[name], results[reference]
    assert r["dispatcher"] == "MoEAlltoAllTokenDispatcher", r["dispatcher"]
    assert r["local_experts"] == 4 // RUNS[name][1], r["local_experts"]
    assert len(r["losses"]) == 2, r["losses"]
    assert_same_losses(r, ref, rel=1e-6)
    assert max_diff(r["weights"], ref["weights"]) <= 1e-5


def test_references_use_the_allgather_dispatcher_and_the_weights_moved(results):
    """The comparison is between two dispatchers, and of trained models (not two untouched ones)."""
    for name in ("cp1 ep1 allgather", "cp2 ep2 allgather"):
        assert results[name]["dispatcher"] == "MoEAllGatherTokenDispatcher", results[name]["dispatcher"]
    weights = results["cp1 ep1 allgather"]["weights"]
    assert max((w - initial_value(k, w.shape)).abs().max().item() for k, w in weights.items()) > 1e-3


def test_flex_dispatcher_is_refused_on_every_cpu_rank(results):
    """megatron-core's flex dispatcher runs DeepEP's CUDA kernels: on CPU every rank refuses it
    before any process group or layer is built (megatron-core would fail only where the first MoE
    layer is built), naming the flag, why, and the dispatcher to use instead."""
    errors = results["flex_errors"]
    assert len(errors) == 4, errors
    for error in errors:
        assert error is not None and error.startswith("--moe-token-dispatcher-type flex needs --device cuda"), errors
        assert "DeepEP" in error and "use --moe-token-dispatcher-type alltoall" in error, error
