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
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from launcher_testing import initial_value, max_diff, run_launcher, whole_weights  # noqa: E402
from lasp2_testing.dist import run_distributed_and_load  # noqa: E402
from test_megatron_moe import HYBRID, MODEL, NO_BALANCING, _layout  # noqa: E402

# name: (CP, EP, dispatcher); DP = 4 / CP
RUNS = {"cp1 ep1 allgather": (1, 1, "allgather"), "cp2 ep2 allgather": (2, 2, "allgather"),
        "cp2 ep2 alltoall": (2, 2, "alltoall"), "cp2 ep4 alltoall": (2, 4, "alltoall")}


def _run(argv):
    return run_launcher(MODEL + HYBRID + NO_BALANCING + argv)


def _worker(rank, world, out_path):
    import warnings

    warnings.filterwarnings("ignore")
    out = {}
    for name, (cp, ep, dispatcher) in RUNS.items():
        result = _run(_layout(cp, ep) + ["--moe-token-dispatcher-type", dispatcher])
        layer = result["chunks"][0].module.decoder.layers[0]
        out[name] = {"losses": result["losses"], "weights": whole_weights(result["chunks"]),
                     "dispatcher": type(layer.mlp.token_dispatcher).__name__,
                     "local_experts": layer.mlp.num_local_experts}
    if rank == 0:
        torch.save(out, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_and_load(4, _worker, tmp_path_factory.mktemp("megatron_moe_dispatch") / "results.pt",
                                    timeout=300)


@pytest.mark.parametrize("name, reference", [("cp2 ep2 alltoall", "cp2 ep2 allgather"),
                                             ("cp2 ep2 alltoall", "cp1 ep1 allgather"),
                                             ("cp2 ep4 alltoall", "cp1 ep1 allgather")])
def test_alltoall_dispatcher_trains_as_allgather_and_as_ep1(results, name, reference):
    r, ref = results[name], results[reference]
    assert r["dispatcher"] == "MoEAlltoAllTokenDispatcher", r["dispatcher"]
    assert r["local_experts"] == 4 // RUNS[name][1], r["local_experts"]
    assert len(r["losses"]) == 2, r["losses"]
    for got, want in zip(r["losses"], ref["losses"]):
        assert abs(got - want) <= 1e-6 * abs(want), (r["losses"], ref["losses"])
    assert max_diff(r["weights"], ref["weights"]) <= 1e-5


def test_references_use_the_allgather_dispatcher_and_the_weights_moved(results):
    """The comparison is between two dispatchers, and of trained models (not two untouched ones)."""
    for name in ("cp1 ep1 allgather", "cp2 ep2 allgather"):
        assert results[name]["dispatcher"] == "MoEAllGatherTokenDispatcher", results[name]["dispatcher"]
    weights = results["cp1 ep1 allgather"]["weights"]
    assert max((w - initial_value(k, w.shape)).abs().max().item() for k, w in weights.items()) > 1e-3
