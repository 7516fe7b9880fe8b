"""--moe-shared-expert-intermediate-size (DeepSeek / Qwen-MoE's shared experts) on megatron-core's
MoELayer through the launcher, 4 gloo processes.

Every token passes the shared expert (megatron-core's SharedExpertMLP, a dense MLP of that FFN
size in each MoE layer) besides its top-2 routed experts; the two outputs are summed. The shared
expert is an ordinary dense parameter (reduced over data x context parallel ranks, not the
expert-data-parallel group) and lives on every EP rank.

An LGSL hybrid with 4 experts top-2 plus a shared expert of size 16 (load-balancing loss on)
trained two SGD steps at CP 2 x DP 2 x EP 2 has the losses, the logged load_balancing_loss and
every weight, the shared expert's included, of CP 1 x DP 4 x EP 1. The shared expert's weights
moved (so its gradient reached them): with its gradient dropped, or its output not added to the
routed experts' (then it gets no gradient either), the second test fails; with its parameters
marked as experts' (allreduce False: reduced over the expert-data-parallel group, 2 ranks at
CP 2 x EP 2, instead of the 4 data x context parallel ranks) the first (step-2 loss off by 6e-4
relative). Mutations tried once, not kept.
"""

import pytest
import torch

pytest.importorskip("megatron.core")

from launcher_testing import initial_value, max_diff, run_launcher, whole_weights  # noqa: E402
from lasp2_testing.dist import run_distributed_and_load  # noqa: E402
from test_megatron_moe import AUX_LOSS, HYBRID, MODEL, _layout  # noqa: E402

SHARED_SIZE = 16
SHARED = ["--moe-shared-expert-intermediate-size", str(SHARED_SIZE)]
LAYOUTS = {"cp1 ep1": (1, 1), "cp2 ep2": (2, 2)}  # (CP, EP); DP = 4 / CP


def _run(argv):
    return run_launcher(MODEL + HYBRID + AUX_LOSS + SHARED + argv)


def _worker(rank, world, out_path):
    import warnings

    warnings.filterwarnings("ignore")
    out = {}
    for name, (cp, ep) in LAYOUTS.items():
        result = _run(_layout(cp, ep))
        mlp = result["chunks"][0].module.decoder.layers[0].mlp
        out[name] = {"losses": result["losses"], "aux": result["aux_losses"],
                     "weights": whole_weights(result["chunks"]),
                     "shared": type(mlp.shared_experts).__name__,
                     "shared_fc1": tuple(mlp.shared_experts.linear_fc1.weight.shape)}
    if rank == 0:
        torch.save(out, out_path)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed_and_load(4, _worker, tmp_path_factory.mktemp("megatron_moe_shared") / "results.pt", timeout=300)


def test_moe_with_a_shared_expert_at_cp2_ep2_equals_cp1_ep1(results):
    """Measured: losses to 2e-8 relative, weights to 2e-7."""
    r, ref = results["cp2 ep2"], results["cp1 ep1"]
    assert r["shared"] == ref["shared"] == "SharedExpertMLP", (r["shared"], ref["shared"])
    assert r["shared_fc1"] == (SHARED_SIZE, 32), r["shared_fc1"]  # the flag's size, not --ffn-hidden-size
    assert len(r["losses"]) == 2, r
    for got, want in zip(r["losses"], ref["losses"]):
        assert abs(got - want) <= 1e-5 * abs(want), (r["losses"], ref["losses"])
    for got, want in zip(r["aux"], ref["aux"]):
        assert abs(got["load_balancing_loss"] - want["load_balancing_loss"]) <= 1e-5 * want["load_balancing_loss"]
    assert max_diff(r["weights"], ref["weights"]) <= 1e-5


def test_every_layers_shared_expert_is_trained(results):
    """The shared expert of each of the 4 layers is in the comparison and moved in both layouts:
    its output reaches the loss and its gradient its weights."""
    for name in LAYOUTS:
        weights = results[name]["weights"]
        shared = {k: w for k, w in weights.items() if ".mlp.shared_experts." in k}
        assert sorted({k.split(".")[2] for k in shared}) == ["0", "1", "2", "3"], sorted(shared)
        for k, w in shared.items():
            assert (w - initial_value(k, w.shape)).abs().max().item() > 1e-4, (name, k)
