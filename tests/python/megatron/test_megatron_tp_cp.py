"""Tensor x context parallelism (4 gloo processes): TP = 2 x CP = 2 and CP = 4 equal one
device, per-head parameters are sharded by global head, distributed checkpoints move
between TP x CP and one device, and Megatron's DDP over dp x cp trains identically.

One set of 4 processes runs everything; the CP = 1 references run in the same
processes after re-initialising Megatron's parallel state with TP = CP = 1 (DP = 4).
With TP = 2 and CP = 2, Megatron's default order (tp-cp-ep-dp-pp) gives CP groups
[0, 2] and [1, 3]: LASP-2 runs over those, never over a group of its own.
"""

import os

import pytest
import torch

pytest.importorskip("megatron.core")

from lasp2_testing.dist import run_distributed_for_result  # noqa: E402
from megatron_patches import Lasp2Options  # noqa: E402
from megatron_testing import (  # noqa: E402
    ddp_train,
    Case,
    build_gpt,
    compare,
    full_state,
    global_batch,
    init_parallel,
    loss_and_grads,
    matches,
    max_state_diff,
    worker_setup,
)

O = Lasp2Options
CASES = [
    Case("balanced fixed-decay rope gqa", O(layer_pattern="LNLN", decay="fixed", learnable_decay=True)),
    Case("balanced gate silu", O(layer_pattern="NLLN", decay="gate", feature_map="silu")),
    Case("contiguous ulysses", O(provider="ulysses", split="contiguous", layer_pattern="LLNL"),
         rope_split="contiguous"),
    Case("packed balanced gate", O(layer_pattern="LNLN", decay="gate"), packed=True, rope_split="balanced"),
    # gated DeltaNet under Ulysses: TP splits the heads, the all-to-all the TP rank's heads
    # again (one head a rank at TP 2 x CP 2 and at CP 4)
    Case("contiguous ulysses gdn", O(provider="ulysses", split="contiguous", layer_pattern="LGSG", decay="gate"),
         rope_split="contiguous"),
    # gated DeltaNet: heads split over TP, the convolution halo over CP (at CP 4 parts of 4 tokens)
    Case("balanced gdn", O(layer_pattern="GLSG", decay="gate")),
    # KDA (per-key gate): its gate logits and dt_bias (Dk a head) split over TP with their heads
    Case("balanced kda", O(layer_pattern="KKSK")),
]
LAYOUTS = [(2, 2), (1, 4)]  # (TP, CP) against (1, 1)
CP4_CASES = {"balanced fixed-decay rope gqa", "packed balanced gate", "balanced gdn", "contiguous ulysses gdn",
             "balanced kda"}
GDN_CASE, KDA_CASE = CASES[-2], CASES[-1]
DDP_CASE = Case("ddp", O(layer_pattern="LNLN", decay="gate"))


def _equality(rank):
    from megatron.core import parallel_state as ps

    init_parallel(tp=1, cp=1)
    refs = {c.name: loss_and_grads(build_gpt(c), c, *global_batch(c)) for c in CASES}
    out, groups = {}, {}
    for tp, cp in LAYOUTS:
        init_parallel(tp=tp, cp=cp)
        groups[(tp, cp)] = ps.get_context_parallel_global_ranks()
        for case in CASES:
            if cp == 4 and case.name not in CP4_CASES:
                continue
            out[f"tp{tp} cp{cp} {case.name}"] = compare(refs[case.name],
                                                         loss_and_grads(build_gpt(case), case, *global_batch(case)))
    return out, groups


def _sharding(rank):
    """Global shapes / offsets of the per-head parameters in Megatron's sharded state dict."""
    from megatron.core import parallel_state as ps

    init_parallel(tp=2, cp=2)
    model = build_gpt(CASES[0])
    sharded = model.sharded_state_dict()
    out = {"tp_rank": ps.get_tensor_model_parallel_rank(), "cp_rank": ps.get_context_parallel_rank()}
    for key, t in sharded.items():
        if key.endswith(("core_attention.log_decay", "core_attention.output_norm_weight")) and ".layers.0." in key:
            out[key.rsplit(".", 1)[1]] = (tuple(t.global_shape), tuple(t.global_offset), tuple(t.replica_id),
                                         t.data.clone())
    return out


def _checkpoints(rank, tmpdir):
    from megatron.core import dist_checkpointing

    out = {}
    # gate: linear_gate is TP-sharded too; gdn / kda: conv.weight, A_log, dt_bias by head (kda: Dk entries
    # of dt_bias a head), out_norm replicated
    for case in (CASES[1], GDN_CASE, KDA_CASE):
        states = {}
        for tp, cp in ((1, 1), (2, 2)):
            init_parallel(tp=tp, cp=cp)
            model = build_gpt(case, seed=1)
            states[(tp, cp)] = full_state(model)
            path = os.path.join(tmpdir, case.name.replace(" ", "_"), f"tp{tp}cp{cp}")
            os.makedirs(path, exist_ok=True)
            dist_checkpointing.save(model.sharded_state_dict(), path)
        out[f"{case.name}: same_seed_state_diff"] = max_state_diff(states[(1, 1)], states[(2, 2)])
        for (tp, cp), src in (((1, 1), (2, 2)), ((2, 2), (1, 1))):
            init_parallel(tp=tp, cp=cp)
            model = build_gpt(case, seed=99)
            name = f"tp{src[0]}cp{src[1]}->tp{tp}cp{cp}"
            out[f"{case.name}: before_load {name}"] = max_state_diff(full_state(model), states[src])
            loaded = dist_checkpointing.load(model.sharded_state_dict(),
                                             os.path.join(tmpdir, case.name.replace(" ", "_"), f"tp{src[0]}cp{src[1]}"))
            model.load_state_dict(loaded)
            out[f"{case.name}: loaded {name}"] = max_state_diff(full_state(model), states[src])
    return out


def _ddp(rank):
    curves = {}
    for tp, cp in ((1, 1), (1, 2), (2, 2)):  # DP = 4, 2, 1
        curves[(tp, cp)], _ = ddp_train(DDP_CASE, tp, cp)
    ref = curves[(1, 1)]
    return {"curves": curves,
            "loss_rel": {k: max(abs(a - b) / abs(b) for a, b in zip(c, ref)) for k, c in curves.items()}}


def _worker(rank, world, tmpdir):
    import time

    worker_setup()
    results, times = {}, {}
    for name, fn in (("equality", lambda: _equality(rank)), ("sharding", lambda: _sharding(rank)),
                     ("ckpt", lambda: _checkpoints(rank, tmpdir)), ("ddp", lambda: _ddp(rank))):
        start = time.perf_counter()
        results[name] = fn()
        times[name] = time.perf_counter() - start
    results["times"] = times
    gathered = [None] * world
    torch.distributed.all_gather_object(gathered, results["sharding"])
    results["sharding"] = gathered
    return results


@pytest.fixture(scope="module")
def tp_cp_results(tmp_path_factory):
    return run_distributed_for_result(4, _worker, str(tmp_path_factory.mktemp("megatron_tp_cp")), timeout=500)


def test_cp_groups_are_megatrons(tp_cp_results):
    _, groups = tp_cp_results["equality"]
    assert groups[(2, 2)] in ([0, 2], [1, 3]) and groups[(1, 4)] == [0, 1, 2, 3]


@pytest.mark.parametrize("layout", [f"tp{t} cp{c}" for t, c in LAYOUTS])
def test_tp_cp_equals_one_device(tp_cp_results, layout):
    results, _ = tp_cp_results["equality"]
    mine = {k: r for k, r in results.items() if k.startswith(layout + " ")}
    assert mine
    for name, r in mine.items():
        assert matches(r), (name, r)


def test_per_head_parameters_are_sharded_by_global_head(tp_cp_results):
    from lasp2.nn.linear_attention import lightning_log_decay

    slopes = lightning_log_decay(4).float()
    for r in tp_cp_results["sharding"]:
        tp, cp = r["tp_rank"], r["cp_rank"]
        shape, offset, replica, data = r["log_decay"]
        # layers are keyed separately (hybrid pattern): [heads] with this rank's 2 heads
        assert shape == (4,) and offset == (2 * tp,), r
        assert replica[-1] == cp  # CP ranks are replicas: only CP rank 0 writes
        assert torch.equal(data, slopes[2 * tp:2 * tp + 2])
        shape, offset, _, _ = r["output_norm_weight"]
        assert shape == (4, 16) and offset == (2 * tp, 0), r


def test_dist_checkpoint_between_tp_cp_and_one_device(tp_cp_results):
    r = tp_cp_results["ckpt"]
    assert len(r) == 15  # three cases: same seed, two loads, two starting points
    for key, value in r.items():
        what = key.split(": ", 1)[1]
        if what == "same_seed_state_diff":
            assert value == 0.0, (key, value)  # the same weights at TP 1 and TP 2 (sliced)
        elif what.startswith("before_load"):
            assert value > 1e-3, (key, value)
        else:
            assert what.startswith("loaded") and value == 0.0, (key, value)


def test_ddp_dp_cp_tp_training_curves_match(tp_cp_results):
    r = tp_cp_results["ddp"]
    for layout, rel in r["loss_rel"].items():
        assert rel <= 1e-5, (layout, r["curves"])
