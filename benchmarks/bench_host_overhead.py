"""Host overhead of one lasp2 layer call: the eager path against the registered
torch.library custom op, side by side in one run.

In plain eager mode lasp2's ops run their implementation through a
torch.autograd.Function (lasp2/ops/_eager.py); under torch.compile / export they
run as registered custom ops, whose Python dispatch costs host time on every call.
This benchmark times a forward + backward loop of one layer both ways (the eager
gate patched off for the second) and, on CUDA, the same step replayed from a CUDA
graph (kernels only, no host; not for gated_delta_rule, whose value checks read g
and beta on the host). At small T on a GPU the host decides the step time.

  python benchmarks/bench_host_overhead.py                 # CUDA if present, else CPU
  python benchmarks/bench_host_overhead.py --device cpu --seq-lens 256

  python benchmarks/bench_host_overhead.py --device cpu --seq-lens 64 --heads 1 --dim 8 --split
      # tiny shapes: the op path's host time with negligible compute

  OMP_NUM_THREADS=1 python benchmarks/bench_host_overhead.py --device cpu --seq-lens 64 --heads 1 --dim 8 \
      --ops linear_attention --iters 500 --cpu-time
      # the same by this thread's CPU time (a shared box: other jobs' load moves wall time)

Ops: linear_attention (per-token gates g), linear_attention_fixed (a fixed per-head
decay without gradient), gated_delta_rule, softmax_attention.

--split also times the parts of one eager step on the host (wall clock and this
thread's CPU time): the forward call, the loss, the backward call, and the wait for
the device at the end. On CUDA the backward runs on autograd's device thread, so the
backward's wall time with little CPU time on this thread is that thread's work plus
the hand-offs; wall time well above CPU time in the forward means the host waited.

Prints a table, writes docs/results/host_overhead.png (--png to change) and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import lasp2
from cuda_timing import captured_graph  # this folder (the script's own directory is on sys.path)
from lasp2.ops import _eager


def _ops(names):
    """name -> (make inputs, step) for each op timed."""
    def linear(B, T, H, D, dtype, device):
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        g = (-0.1 * torch.rand(B, T, H, device=device)).requires_grad_()
        return (q, k, v, g), lambda: lasp2.linear_attention(q, k, v, g=g)

    def linear_fixed(B, T, H, D, dtype, device):
        # a fixed per-head log decay (lightning attention's), a constant: no gradient
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        decay = -0.05 * torch.rand(H, device=device)
        return (q, k, v), lambda: lasp2.linear_attention(q, k, v, decay=decay)

    def softmax(B, T, H, D, dtype, device):
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        return (q, k, v), lambda: lasp2.softmax_attention(q, k, v)

    def delta(B, T, H, D, dtype, device):
        q, k, v = (torch.randn(B, T, H, D, device=device, dtype=dtype) for _ in range(3))
        q, k = (torch.nn.functional.normalize(x, dim=-1).requires_grad_() for x in (q, k))
        v.requires_grad_()
        g = (-0.1 * torch.rand(B, T, H, device=device)).requires_grad_()
        beta = torch.rand(B, T, H, device=device, dtype=dtype).mul(0.9).add(0.05).requires_grad_()
        return (q, k, v, g, beta), lambda: lasp2.gated_delta_rule(q, k, v, g, beta)[0]

    table = {"linear_attention": linear, "linear_attention_fixed": linear_fixed, "softmax_attention": softmax,
             "gated_delta_rule": delta}
    return {n: table[n] for n in names}


_EAGER_CALL = _eager.eager_call  # kept: _set_eager(False) replaces the name in lasp2.ops._eager itself too


def _patched_modules():
    return [m for n, m in list(sys.modules.items()) if n.startswith("lasp2.ops") and hasattr(m, "eager_call")]


def _set_eager(enabled: bool):
    for mod in _patched_modules():
        mod.eager_call = _EAGER_CALL if enabled else (lambda *a: False)


_CLOCK = time.perf_counter  # --cpu-time: time.thread_time


def _wall_ms(step, iters, device):
    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = _CLOCK()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (_CLOCK() - start) / iters * 1e3


def _graph_ms(step, iters):
    return _wall_ms(captured_graph(step, warmup=3).replay, iters, torch.device("cuda"))


def _split(forward, inputs, steps, device):
    """Median microseconds per part of one eager step: wall clock and (in parentheses
    in the printout) this thread's CPU time."""
    cuda = device.type == "cuda"
    parts = ("forward", "loss", "backward", "sync")
    wall = {p: [] for p in parts}
    cpu = {p: [] for p in parts}
    for i in range(steps + 3):
        for x in inputs:
            x.grad = None
        if cuda:
            torch.cuda.synchronize()
        marks = [(time.perf_counter_ns(), time.thread_time_ns())]
        out = forward()
        marks.append((time.perf_counter_ns(), time.thread_time_ns()))
        loss = out.float().sum()
        marks.append((time.perf_counter_ns(), time.thread_time_ns()))
        loss.backward()
        marks.append((time.perf_counter_ns(), time.thread_time_ns()))
        if cuda:
            torch.cuda.synchronize()
        marks.append((time.perf_counter_ns(), time.thread_time_ns()))
        if i < 3:  # warm-up
            continue
        for j, p in enumerate(parts):
            wall[p].append((marks[j + 1][0] - marks[j][0]) / 1e3)
            cpu[p].append((marks[j + 1][1] - marks[j][1]) / 1e3)
    med = lambda xs: round(sorted(xs)[len(xs) // 2], 1)  # noqa: E731
    out = {p: {"wall_us": med(wall[p]), "cpu_us": med(cpu[p])} for p in parts}
    print("  split (median us, wall (this thread's CPU)): " +
          ", ".join(f"{p} {v['wall_us']} ({v['cpu_us']})" for p, v in out.items()))
    return out


def _profile(step, steps, device):
    """cProfile of `steps` eager steps: microseconds per step inside lasp2._C's functions
    (binding + core, host side), in everything else, and the top Python functions.
    linear_attention's one-device backward runs in its C++ autograd node, so its time
    is counted under torch's run_backward, not under lasp2._C."""
    import cProfile
    import pstats

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    prof.disable()
    stats = pstats.Stats(prof).stats  # (file, line, name) -> (calls, ncalls, tottime, cumtime, callers)
    per = 1e6 / steps
    total = sum(v[2] for v in stats.values()) * per
    core = sum(v[2] for k, v in stats.items() if "lasp2._C" in k[2]) * per
    top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:15]
    out = {"us_per_step": round(total, 1), "in_lasp2_C_us": round(core, 1),
           "top": [(f"{k[0].split('site-packages/')[-1].split('lasp2/')[-1]}:{k[1]}({k[2]})", v[1] // steps,
                    round(v[2] * per, 1)) for k, v in top]}
    print(f"  profile: {out['us_per_step']} us/step under cProfile, {out['in_lasp2_C_us']} in lasp2._C; top:")
    for name, calls, us in out["top"]:
        print(f"    {us:8.1f} us  x{calls:<3} {name}")
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--ops", nargs="+", default=["linear_attention", "gated_delta_rule", "softmax_attention"])
    ap.add_argument("--seq-lens", nargs="+", type=int, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--iters", type=int, default=None)
    ap.add_argument("--png", default="docs/results/host_overhead.png")
    ap.add_argument("--profile", type=int, default=0,
                    help="also profile this many eager steps of each op and length (cProfile): the host time "
                         "inside the binding's calls (lasp2._C) and the Python functions that cost most")
    ap.add_argument("--split", action="store_true",
                    help="also time the parts of an eager step (forward, loss, backward, device wait) on the host")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time the eager and custom-op loops by this thread's CPU time, not the wall clock: on a "
                         "shared CPU box other jobs' load then moves the numbers less (CPU devices; with "
                         "OMP_NUM_THREADS=1 the kernels run on this thread too)")
    args = ap.parse_args()
    if args.cpu_time:
        global _CLOCK
        _CLOCK = time.thread_time
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    seq_lens = args.seq_lens or ([1024, 4096, 16384] if cuda else [256])
    heads, dim = args.heads or (16 if cuda else 2), args.dim or (128 if cuda else 32)
    iters = args.iters or (50 if cuda else 20)
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    rows = []
    print(f"{'op':<22} {'T':>7} {'eager ms':>9} {'custom op ms':>13} {'custom/eager':>13} {'graph ms':>9}")
    for name, make in _ops(args.ops).items():
        for T in seq_lens:
            inputs, forward = make(args.batch, T, heads, dim, dtype, device)

            def step():
                for x in inputs:
                    x.grad = None
                forward().float().sum().backward()

            times = {}
            for mode in (True, False, True, False):  # alternate: each mode's best of two
                _set_eager(mode)
                ms = _wall_ms(step, iters, device)
                times[mode] = min(times.get(mode, ms), ms)
            _set_eager(True)
            # gated_delta_rule reads g and beta on the host (its value checks), which a
            # capture forbids (and a failed capture leaves the CUDA RNG unusable)
            graph = _graph_ms(step, iters) if cuda and name != "gated_delta_rule" else None
            row = dict(op=name, T=T, B=args.batch, H=heads, D=dim, eager_ms=times[True], custom_op_ms=times[False],
                       graph_ms=graph)
            if args.profile:
                row["profile"] = _profile(step, args.profile, device)
            if args.split:
                row["split"] = _split(forward, inputs, iters, device)
            rows.append(row)
            graph_txt = f"{graph:9.3f}" if graph is not None else f"{'-':>9}"
            print(f"{name:<22} {T:>7} {times[True]:9.3f} {times[False]:13.3f} "
                  f"{times[False] / times[True]:12.2f}x {graph_txt}")

    print(json.dumps(dict(device=torch.cuda.get_device_name() if cuda else "cpu", dtype=str(dtype), rows=rows)))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    labels = [f"{r['op'].replace('_attention', '').replace('_rule', '')}\n{r['T']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(rows)), 4))
    ax.bar([i - 0.27 for i in x], [r["custom_op_ms"] for r in rows], 0.27, label="registered custom op")
    ax.bar(list(x), [r["eager_ms"] for r in rows], 0.27, label="eager path")
    if cuda:
        ax.bar([i + 0.27 for i in x], [r["graph_ms"] or 0 for r in rows], 0.27, label="CUDA graph (no host)")
    ax.set_xticks(list(x), labels)
    ax.set_ylabel("fwd + bwd ms per layer call")
    ax.set_title(f"host overhead, {'one ' + torch.cuda.get_device_name() if cuda else 'CPU'}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
