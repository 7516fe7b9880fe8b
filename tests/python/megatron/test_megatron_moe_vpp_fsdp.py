"""MoE with interleaved pipeline stages (VPP) and with --use-torch-fsdp2, 4 gloo processes.

An LGSL hybrid with 4 experts top-2 (load-balancing loss on) trained two SGD steps:
  * PP 2 x VPP 2 x CP 2 at EP 2 (one layer per virtual stage, 4 micro-batches, interleaved 1F1B;
    the expert group spans the CP ranks of a pipeline stage) and
  * FSDP2 over DP 2 x CP 2 at EP 1 (megatron-core's TorchFullyShardedDataParallel; at EP 1 the
    expert-data-parallel group is the data x context parallel group FSDP2 shards over)
have the losses, the logged load_balancing_loss and every weight, experts included, of CP 1 x
DP 4 at EP 1 with megatron-core's DDP. Mutations tried once, not kept: gloo's batched p2p for
the interleaved schedule (the launcher's batch_p2p_comm=False removed) fails the VPP comparison
(step-2 loss 7.48 instead of 4.20); FSDP2 over the data-parallel group only (without CP) fails
the FSDP2 one (3e-3 relative at step 2).

FSDP2 at EP > 1 (the experts sharded over the expert-data-parallel group):
test_megatron_moe_fsdp_ep.py.
"""

import pytest

pytest.importorskip("megatron.core")

from launcher_testing import (assert_same_load_balancing_losses, assert_same_losses, initial_value,  # noqa: E402
                             max_diff, run_launcher, whole_weights)
from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from test_megatron_moe import AUX_LOSS, HYBRID, MODEL, _layout  # noqa: E402

VPP = ["--num-layers-per-virtual-pipeline-stage", "1"]
FSDP2 = ["--use-torch-fsdp2"]
RUNS = {"cp1 ep1": _layout(1, 1), "pp2 vpp2 cp2 ep2": _layout(2, 2, 2) + VPP,
        "fsdp2 cp2 ep1": _layout(2, 1) + FSDP2}


def _run(argv):
    return run_launcher(MODEL + HYBRID + AUX_LOSS + argv)


def _worker(rank, world):
    import warnings

    warnings.filterwarnings("ignore")
    from torch.distributed.tensor import DTensor


    out = {}
    for name, argv in RUNS.items():
        result = _run(argv)
        chunks = result["chunks"]
        out[name] = {"losses": result["losses"], "aux": result["aux_losses"], "weights": whole_weights(chunks),
                     "chunks": len(chunks), "mlp": type(chunks[0].module.decoder.layers[0].mlp).__name__,
                     "sharded": all(isinstance(p, DTensor) for c in chunks for p in c.module.parameters())}
    return out


@pytest.fixture(scope="module")
def results():
    return run_distributed_for_result(4, _worker, timeout=300)


@pytest.mark.parametrize("name", ["pp2 vpp2 cp2 ep2", "fsdp2 cp2 ep1"])
def test_moe_under_vpp_and_fsdp2_equals_cp1_ep1(results, name):
    """Measured: losses to 6e-8 relative, weights to 2.4e-7."""
    r, ref = results[name], results["cp1 ep1"]
    assert r["mlp"] == "MoELayer" and len(r["losses"]) == 2, r["losses"]
    assert r["chunks"] == (2 if "vpp" in name else 1)  # two virtual stages on each pipeline rank
    assert r["sharded"] == ("fsdp2" in name)  # FSDP2's DTensors, not DDP's plain parameters
    assert_same_losses(r, ref)
    assert_same_load_balancing_losses(r, ref)
    assert max_diff(r["weights"], ref["weights"]) <= 1e-5


def test_the_reference_trained(results):
    weights = results["cp1 ep1"]["weights"]
    assert max((w - initial_value(k, w.shape)).abs().max().item() for k, w in weights.items()) > 1e-3

