"""Cost of lasp2's per-call cross-rank consistency check (docs/reliability.md).

Times, on every rank of a group of 2+ processes, for the check's configurations
(lasp2/ops/_group_consistency.py): auto (the default: one C++ exchange per call; device
values staged into a ring and sent --depth calls later; depth 1 is the previous design,
which waited for the previous call's values) and sync (the Python check, every value read
at the call):
  check : verify_group_consistency alone (one 256-byte all-gather per rank + compare),
  step  : a forward+backward of a stack of 1 (and 8) lasp2.linear_attention layers over a
          4K-token global sequence, with the check (as shipped) and with the check
          replaced by a no-op (and one layer without gates, whose check reads no device
          tensor),
  model : a training step (forward + backward) of lasp2.nn.HybridStack, --model-layers
          linear-attention blocks at hidden size --hidden (projections, SwiGLU MLP, norms),
          with and without the check; --big-hidden adds a second, clearly GPU-bound model
          (same blocks at that hidden size),
and prints the check's share of the step. Each with/without pair is timed in --rounds
alternating rounds (with, without, without, with, ...) and reported as medians, with the
median of the rounds' overheads: a host-bound loop's speed drifts by 10-20% over a run, which
back-to-back single timings took for the check's cost. "host_parts" splits the auto check's
time per call: the Python part (the row built, the C++ object replaced by a stub), the
C++ exchange alone (head only: one row kernel, the all-gather, the table's copy and the
side stream's sync), and staging one gate flag plus sending it. Rank 0 prints one JSON line.

CPU (gloo):  python benchmarks/bench_consistency_check.py --device cpu
GPU (NCCL):  torchrun --nproc-per-node 2 benchmarks/bench_consistency_check.py --device cuda
One GPU:     python benchmarks/bench_consistency_check.py --device cuda --world 1
(--device cpu also works under torchrun; without torchrun it spawns --world processes.)
With one process the ops skip the check (there is nobody to disagree with), so the
"with check" step runs the check explicitly beside the op, as a group call would: this
measures everything but the wire (the row, the digests, the flags, the NCCL launch of a
one-rank all-gather, the table's copy to the host with its stream sync, the ring's
waits). With 2+ GPUs the all-gather adds the interconnect's latency, and with the torch
communicator it queues behind the op's own collectives on the group's NCCL stream.
"host_reads_of_the_table" counts exchanges over the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, iters, device):
    for _ in range(3):
        fn()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def _paired(fn, switch, iters, device, rounds):
    """Times fn with the check (switch(True)) and without (switch(False)) in `rounds` rounds
    of alternating order (with first, then without first), so a drift of the loop's speed
    over the run lands on both columns alike; leaves the check on. Returns the median with,
    the median without, and the median of the rounds' overheads in %."""
    withs, withouts, overheads = [], [], []
    try:
        for r in range(rounds):
            times = {}
            for enabled in ((True, False) if r % 2 == 0 else (False, True)):
                switch(enabled)
                times[enabled] = _time(fn, iters, device)
            withs.append(times[True])
            withouts.append(times[False])
            overheads.append(100 * (times[True] - times[False]) / times[False])
    finally:
        switch(True)
    return statistics.median(withs), statistics.median(withouts), statistics.median(overheads)


class _StubCheck:
    """A GroupCheck that sends nothing: the Python part of a check, timed alone."""

    def __init__(self, depth):
        self.depth = depth

    def exchange(self, head, sends, max_slots):
        return -1

    def exchange_then_stage(self, head, sends, max_slots, values, kinds):
        return -1, 0

    def stage(self, values, kinds):
        return 0

    def discard(self):
        pass


def _host_parts(GC, group, device, check, gate, iters):
    """The auto check's time per call, split (see the module's docstring), in us."""
    st = GC._state(group)
    gc = GC._group_check(st, device)
    head = [1] * 20
    slot = GC.ROW - GC.LAGGED  # the staged flag's slot when one entry is sent

    def stage_and_send():
        gc.exchange(head, [gc.stage([gate], [GC._KIND_MAX])], [slot])

    GC.settle_consistency_checks(group)  # the ring's entries are free
    out = {"exchange_us": _time(lambda: gc.exchange(head, [], []), iters, device) * 1e6,
           "stage_and_send_us": _time(stage_and_send, iters, device) * 1e6}
    GC.settle_consistency_checks(group)
    st.checks[device] = _StubCheck(st.depth)
    try:
        out["python_us"] = _time(lambda: check(gate), iters, device) * 1e6
    finally:
        st.checks[device] = gc
        st.pending.clear()
    return {k: round(v, 1) for k, v in out.items()}


def _patch_check(enabled: bool, original):
    """Swap the check in every lasp2 module that imported it (on or off)."""
    from lasp2.ops._group_consistency import NO_CHECK

    for name, mod in list(sys.modules.items()):
        if name.startswith("lasp2") and hasattr(mod, "verify_group_consistency"):
            mod.verify_group_consistency = original if enabled else (lambda *a, **k: NO_CHECK)


def bench(rank, world, args):
    import lasp2
    from lasp2.ops import _checks as C
    from lasp2.ops import _group_consistency as GC

    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    group = dist.group.WORLD
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T = args.tokens // world
    gen = torch.Generator().manual_seed(rank)
    layer_counts = [int(n) for n in args.layers.split(",")]
    L_max = max(layer_counts)
    # a stack of layers, each h -> h + linear_attention(h * wq, h * wk, h, g): the backward of
    # layer l runs after the forward of the layers above it, as in a model
    x = torch.randn(1, T, args.heads, args.head_dim, generator=gen).to(device, dtype).requires_grad_()
    wq, wk = (torch.rand(L_max, args.head_dim, generator=gen).to(device, dtype).requires_grad_() for _ in range(2))
    gates = [torch.nn.functional.logsigmoid(torch.randn(1, T, args.heads, generator=gen)).to(device).requires_grad_()
             for _ in range(L_max)]

    # the linear-attention call's check: 13 size fields, 4 host values, decay (absent) and
    # the positive-gate flag on CUDA
    signature = [1, T, args.heads, args.head_dim, args.head_dim, 1, 2, 1, 0, 0, 0, 0, 1]
    names = [f"f{i}" for i in range(len(signature))]

    def check(g):
        return GC.verify_group_consistency(
            "bench", group, signature, names, device,
            host_values=[("scale", args.head_dim ** -0.5), ("cu", None), ("layout", "bthd"), ("overlap", None)],
            device_values=[("decay", None)],
            positive=[("`g` holds positive log gates", g)] if g is not None else ())

    def step(layers, beside, gated=True):
        h = x
        for i in range(layers):
            g = gates[i] if gated else None
            verdict = check(g) if beside else GC.NO_CHECK
            h = h + verdict.seal(lasp2.linear_attention(h * wq[i], h * wk[i], h, g=g, group=group))
        h.float().sum().backward()

    o_like = torch.zeros_like(x)
    original = GC.verify_group_consistency
    result = {"device": str(device), "world": world, "global_tokens": args.tokens, "heads": args.heads,
              "head_dim": args.head_dim, "dtype": str(dtype)}
    configs = []
    for mode in args.mode.split(","):
        configs += [(f"auto_depth{d}", mode, int(d)) for d in args.depth.split(",")] if mode == "auto" else [
            (mode, mode, GC.DEPTH)]
    for label, mode, depth in configs:
        GC.MODE, GC.DEPTH = mode, depth
        GC._STATES.clear()  # a fresh GroupCheck (its ring takes DEPTH when made)
        GC.STATS.update(sync=0)
        mode = label
        # the check alone: the call, and the seal of one output
        t_check = _time(lambda: check(gates[0]).seal(o_like), args.iters * 4, device)
        result[mode] = {"check_us": round(t_check * 1e6, 1)}
        if label.startswith("auto"):
            result[mode]["host_parts"] = _host_parts(GC, group, device, check, gates[0], args.iters * 4)
        # stacks of gated layers; and one layer without gates (its check's row is host values
        # only: no device fields, so on CUDA it does not wait for the op's stream at all)
        for layers, gated in [(n, True) for n in layer_counts] + [(1, False)]:
            iters = max(10, args.iters // layers)
            if world == 1:  # the op does not check itself: run the check beside it, as a group call would
                beside = [True]
                t_with, t_without, overhead = _paired(
                    lambda: step(layers, beside[0], gated), lambda on: beside.__setitem__(0, on), iters, device,
                    args.rounds)
            else:
                t_with, t_without, overhead = _paired(
                    lambda: step(layers, False, gated), lambda on: _patch_check(on, original), iters, device,
                    args.rounds)
            result[mode][f"{layers}_layers" + ("" if gated else "_no_gates")] = {
                "step_with_check_ms": round(t_with * 1e3, 3), "step_without_check_ms": round(t_without * 1e3, 3),
                "check_share_of_step_pct": round(100 * layers * t_check / t_without, 3),
                "measured_overhead_pct": round(overhead, 3)}
        if args.model_layers:
            for key, hidden in [("model", args.hidden)] + ([("model_big", args.big_hidden)] if args.big_hidden else []):
                model = result[mode][key] = _model_step(GC, group, device, world, args, original, hidden)
                model["check_share_of_step_pct"] = round(100 * args.model_layers * t_check / (
                    model["step_without_check_ms"] * 1e-3), 3)
        result[mode].update(host_reads_of_the_table=GC.STATS["sync"])
    GC.MODE = "auto"
    if rank == 0:
        print(json.dumps(result), flush=True)


def _model_step(GC, group, device, world, args, original, hidden):
    """A training step of a small model: lasp2.nn.HybridStack of --model-layers linear-attention
    blocks (q/k/v/g/o projections, per-head norm, SwiGLU MLP of 4x hidden, RMSNorms) at hidden
    size --hidden, bf16 on CUDA, forward + backward of a 4K-token (global) sequence, with and
    without the per-call check. With one process the op skips the check (nobody to disagree
    with), so each layer's call runs it beside the op, with the op's own arguments."""
    import lasp2.nn.linear_attention as nn_la
    from lasp2.nn import HybridStack
    from lasp2.ops import linear_attention as op_module
    from lasp2.ops import _checks as C

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    heads = max(1, hidden // args.head_dim)  # heads of --head-dim (16 of 128 at hidden 2048)
    T = args.tokens // world
    model = HybridStack(hidden, heads, pattern="L" * args.model_layers, group=group if world > 1 else None,
                        device=device, dtype=dtype, linear_kwargs={"decay": args.model_decay})
    x = torch.randn(1, T, hidden, device=device, dtype=dtype, generator=None) * 0.5
    plain = nn_la.linear_attention

    def beside(q, k, v, g=None, decay=None, **kw):  # the call's check (as linear_attention runs it), then the op
        signature = [q.shape[0], q.shape[1], q.shape[2], q.shape[3], v.shape[3], 1,
                     0 if g is None and decay is None else (1 if decay is not None else 2), 1, 0, 0, 0, 0,
                     C.builds_backward(q, k, v, g, decay)]
        verdict = GC.verify_group_consistency(
            op_module.OP, group, signature, op_module.CHECK_NAMES, device,
            host_values=[("`scale`", q.shape[3] ** -0.5), ("`cu_seqlens` contents", None), ("`layout`", "bthd"),
                         ("`overlap`", None)],
            device_values=[("`decay` values", decay)],
            positive=[(f"`{n}` holds positive log gates/decays", t) for n, t in (("g", g), ("decay", decay))
                      if t is not None])
        return verdict.seal(plain(q, k, v, g=g, decay=decay, **kw))

    def step():
        model(x).float().square().mean().backward()

    iters = max(10, args.iters // 2)
    out = {"layers": args.model_layers, "hidden": hidden, "heads": heads, "decay": args.model_decay}

    def switch(with_check):
        if world == 1:
            nn_la.linear_attention = beside if with_check else plain
        else:
            _patch_check(with_check, original)

    try:
        t_with, t_without, overhead = _paired(step, switch, iters, device, args.rounds)
    finally:
        nn_la.linear_attention = plain
    out.update(step_with_check_ms=round(t_with * 1e3, 3), step_without_check_ms=round(t_without * 1e3, 3),
               measured_overhead_pct=round(overhead, 3))
    return out


def _spawned(rank, world, store, args):
    backend = "nccl" if args.device == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    bench(rank, world, args)
    dist.destroy_process_group()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=4096, help="global sequence length")
    p.add_argument("--heads", type=int, default=None)
    p.add_argument("--head-dim", type=int, default=None)
    p.add_argument("--iters", type=int, default=None)
    p.add_argument("--world", type=int, default=2, help="processes to spawn when not under torchrun")
    p.add_argument("--layers", default="1,8",
                   help="comma-separated stack depths to time (layer l's backward follows the layers above)")
    p.add_argument("--mode", default="auto,sync", help="the check's modes, comma-separated from auto, sync")
    p.add_argument("--depth", default="1,4",
                   help="auto: ring depths to time, comma-separated (1: the previous design, waiting for the "
                        "previous call's device values; the default depth is lasp2's)")
    p.add_argument("--model-layers", type=int, default=4,
                   help="also time a training step of a HybridStack of this many linear-attention blocks (0: no)")
    p.add_argument("--hidden", type=int, default=None, help="the model's hidden size (default heads x head dim)")
    p.add_argument("--big-hidden", type=int, default=0,
                   help="also time the model at this hidden size (a GPU-bound step; 0: no)")
    p.add_argument("--rounds", type=int, default=5,
                   help="alternating with/without rounds per pair (medians reported)")
    p.add_argument("--model-decay", default="gate", choices=["gate", "fixed", "none"])
    args = p.parse_args()
    gpu = args.device == "cuda"
    args.heads = args.heads or (16 if gpu else 4)
    args.head_dim = args.head_dim or (128 if gpu else 32)
    args.iters = args.iters or (50 if gpu else 5)
    args.hidden = args.hidden or args.heads * args.head_dim
    if "RANK" in os.environ:  # torchrun
        dist.init_process_group("nccl" if gpu else "gloo")
        bench(dist.get_rank(), dist.get_world_size(), args)
        dist.destroy_process_group()
        return
    store = os.path.join(tempfile.mkdtemp(prefix="lasp2_bench_"), "store")
    mp.spawn(_spawned, args=(args.world, store, args), nprocs=args.world)


if __name__ == "__main__":
    main()
