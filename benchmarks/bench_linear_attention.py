"""Kernel benchmark of one causal linear attention layer on one GPU.

    python benchmarks/bench_linear_attention.py [--seq-lens 4096 16384 65536 262144]
        [--batches 1 8] [--dims 64 128] [--decays none fixed gate] [--out DIR] [--quick]

lasp2 (fwd, fwd+bwd eagerly, and fwd+bwd replayed from a CUDA graph: the GPU time
without the host's launch overhead) side by side with flash-linear-attention's
chunk_simple_gla when importable (`g_gamma` for a fixed decay, `g` for gates, neither
for none; fla refuses its gated backward on some Triton versions, then only its
forward is timed and the reason printed; fla compiles and autotunes per shape, so it
runs only on the shapes of --fla-*) and, with --torch, a plain PyTorch chunked
implementation. H = 16, bf16; B = 8 only where T <= --max-t-batched. Prints time,
TFLOP/s, GB/s and x over the memory floor (bytes that must move / measured
device-to-device copy bandwidth), writes a JSON file and a PNG, and prints a short
table last.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lasp2  # noqa: E402
from cuda_timing import captured_graph, median_ms  # noqa: E402


def copy_bandwidth_gbs():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def graph_ms(step):
    """Median time of replaying `step` (fwd + bwd) captured in a CUDA graph."""
    graph = captured_graph(step, warmup=2)
    ms = median_ms(graph.replay)
    del graph
    return ms


def impls(decay, with_torch):
    """name -> fn(q, k, v, g): g is [B, T, H] gates, [H] log decays or None."""
    out = {}
    if decay == "gate":
        out["lasp2"] = lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g)
    elif decay == "fixed":
        out["lasp2"] = lambda q, k, v, g: lasp2.linear_attention(q, k, v, decay=g)
    else:
        out["lasp2"] = lambda q, k, v, g: lasp2.linear_attention(q, k, v)
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        if decay == "gate":
            out["fla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)[0]
        elif decay == "fixed":
            out["fla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g_gamma=g)[0]
        else:
            out["fla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v)[0]
    except Exception as exc:  # fla is optional: carried to the device as a wheel
        print(f"# flash-linear-attention not available ({type(exc).__name__}: {exc})")
    if with_torch:
        from torch_chunked import torch_chunked_linear_attention

        def chunked(q, k, v, g):
            if decay == "fixed":
                g = g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1)
            return torch_chunked_linear_attention(q, k, v, g)
        out["torch-chunked"] = chunked
    return out


def flops(B, T, H, D, C=64):
    """Matmul flops of the chunked algorithm, forward (backward counted as 2x)."""
    per_chunk = 2 * C * C * D * 2 + 2 * C * D * D * 2
    return B * H * (T // C) * per_chunk


def floor_bytes(B, T, H, D, decay):
    """Fewest bytes per phase: q, k, v (+ gates) read, o written; backward reads
    q, k, v, dO (+ gates) and writes dq, dk, dv (+ dg)."""
    t = B * T * H * D * 2
    gb = B * T * H * 4 if decay == "gate" else 0
    fwd, bwd = 4 * t + gb, 7 * t + 2 * gb
    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}


def configs(args):
    for decay in args.decays:
        for D in args.dims:
            for T in args.seq_lens:
                for B in args.batches:
                    if B == 1 or T <= args.max_t_batched:
                        yield decay, D, B, T


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-t-batched", type=int, default=16384, help="B > 1 only up to this T")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--decays", nargs="+", default=["none", "fixed", "gate"], choices=["none", "fixed", "gate"])
    parser.add_argument("--torch", action="store_true", help="also time the plain PyTorch chunked version")
    parser.add_argument("--fla-budget-s", type=float, default=150.0, help="stop timing fla after this long")
    # fla compiles and autotunes per shape (about 35 s each on an H200): by default only
    # the shapes of the fixed-decay target
    parser.add_argument("--fla-decays", nargs="+", default=["fixed"], choices=["none", "fixed", "gate"])
    parser.add_argument("--fla-dims", type=int, nargs="+", default=[128])
    parser.add_argument("--fla-seq-lens", type=int, nargs="+", default=[16384, 65536])
    parser.add_argument("--fla-batches", type=int, nargs="+", default=[1])
    parser.add_argument("--quick", action="store_true", help="D = 128 only (the default run of device_check.sh)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    if args.quick:
        args.dims = [128]
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  torch {torch.__version__}  "
          f"H={args.heads} bf16", flush=True)
    H, dt = args.heads, torch.bfloat16
    rows, fla_spent, fla_refused = [], 0.0, {}
    for decay, D, B, T in configs(args):
        gen = torch.Generator(device="cuda").manual_seed(T + D + B)
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, generator=gen).requires_grad_() for _ in range(3))
        if decay == "gate":
            g = (F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 16).requires_grad_()
        elif decay == "fixed":
            g = -torch.rand(H, device="cuda", generator=gen) * 0.05
        else:
            g = None
        do = torch.randn(B, T, H, D, device="cuda", dtype=dt, generator=gen)
        leaves = (q, k, v, g) if g is not None and g.requires_grad else (q, k, v)
        fb = floor_bytes(B, T, H, D, decay)
        for name, fn in impls(decay, args.torch).items():
            if name == "torch-chunked" and T > 65536:
                continue
            if name == "fla" and (fla_spent > args.fla_budget_s or decay not in args.fla_decays or
                                  D not in args.fla_dims or T not in args.fla_seq_lens or B not in args.fla_batches):
                continue
            t0 = time.time()
            torch.cuda.empty_cache()
            times = {}
            try:
                times["fwd"] = median_ms(lambda: fn(q, k, v, g))
                if name not in fla_refused or decay != "gate":
                    times["fwd+bwd"] = median_ms(lambda: torch.autograd.grad(fn(q, k, v, g), leaves, do))
                    times["bwd"] = times["fwd+bwd"] - times["fwd"]
                if name == "lasp2":
                    times["fwd+bwd graph"] = graph_ms(lambda: torch.autograd.grad(fn(q, k, v, g), leaves, do))
            except Exception as exc:  # OOM, or an implementation refusing this input
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
                if name == "fla":
                    fla_refused[name] = reason
                print(f"# {name} {decay} D={D} B={B} T={T}: {reason}", flush=True)
                torch.cuda.empty_cache()
            if name == "fla":
                fla_spent += time.time() - t0
            for phase, ms in times.items():
                base = phase.split()[0]
                fl = flops(B, T, H, D) * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[base]
                rows.append(dict(impl=name, decay=decay, D=D, B=B, T=T, phase=phase, ms=ms,
                                 tflops=fl / ms / 1e9, gbs=fb[base] / ms / 1e6,
                                 x_floor=ms / (fb[base] / bw / 1e6)))
            if times:
                print(f"# {name:>6} {decay:>5} D={D:<3} B={B} T={T:<6} " +
                      ", ".join(f"{p} {ms:.3f} ms" for p, ms in times.items()), flush=True)
        del q, k, v, g, do
    if fla_spent > args.fla_budget_s:
        print(f"# fla: stopped after {fla_spent:.0f} s (its compile and autotune); later shapes not timed")
    for reason in fla_refused.values():
        print(f"# fla gated backward refused: {reason}")
    with open(os.path.join(args.out, "bench_linear_attention.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": bw, "heads": H, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "bench_linear_attention.png"), H)
    print_table(rows, args)


def print_table(rows, args):
    """One line per shape: lasp2 fwd / fwd+bwd (eager, graph) and fla, x floor, speed-ups:
    fla/us = fla's eager fwd+bwd over lasp2's eager one, fla/gr = over lasp2's graph replay
    (the kernels alone; fla's eager time includes its own host time)."""
    def get(impl, decay, D, B, T, phase, key="ms"):
        for r in rows:
            if (r["impl"], r["decay"], r["D"], r["B"], r["T"], r["phase"]) == (impl, decay, D, B, T, phase):
                return r[key]
        return None

    fmt = lambda x, f="{:.3f}": "-" if x is None else f.format(x)
    print(f"\n{'decay':>5} {'D':>3} {'B':>2} {'T':>7} | {'fwd ms':>7} {'xfl':>5} | {'f+b ms':>7} {'xfl':>5} "
          f"{'TF/s':>5} {'GB/s':>5} | {'graph':>7} {'xfl':>5} | {'fla fwd':>7} {'fla f+b':>7} {'fla/us':>6} {'fla/gr':>6}")
    for decay, D, B, T in configs(args):
        fb = get("lasp2", decay, D, B, T, "fwd+bwd")
        fla_fb = get("fla", decay, D, B, T, "fwd+bwd")
        graph = get("lasp2", decay, D, B, T, "fwd+bwd graph")
        print(f"{decay:>5} {D:>3} {B:>2} {T:>7} | {fmt(get('lasp2', decay, D, B, T, 'fwd'))} "
              f"{fmt(get('lasp2', decay, D, B, T, 'fwd', 'x_floor'), '{:5.2f}')} | {fmt(fb)} "
              f"{fmt(get('lasp2', decay, D, B, T, 'fwd+bwd', 'x_floor'), '{:5.2f}')} "
              f"{fmt(get('lasp2', decay, D, B, T, 'fwd+bwd', 'tflops'), '{:5.0f}')} "
              f"{fmt(get('lasp2', decay, D, B, T, 'fwd+bwd', 'gbs'), '{:5.0f}')} | "
              f"{fmt(graph)} "
              f"{fmt(get('lasp2', decay, D, B, T, 'fwd+bwd graph', 'x_floor'), '{:5.2f}')} | "
              f"{fmt(get('fla', decay, D, B, T, 'fwd'))} {fmt(fla_fb)} "
              f"{fmt(fla_fb / fb if fla_fb and fb else None, '{:6.2f}')} "
              f"{fmt(fla_fb / graph if fla_fb and graph else None, '{:6.2f}')}")


def plot(rows, path, H):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no plot")
        return
    dims = sorted({r["D"] for r in rows})
    fig, axes = plt.subplots(1, len(dims), figsize=(6 * len(dims), 4.5), squeeze=False)
    for ax, D in zip(axes[0], dims):
        for impl, decay, phase in sorted({(r["impl"], r["decay"], r["phase"]) for r in rows if r["D"] == D}):
            if phase not in ("fwd+bwd", "fwd+bwd graph") or (impl != "lasp2" and phase != "fwd+bwd"):
                continue
            pts = sorted((r["T"], r["x_floor"]) for r in rows
                         if (r["impl"], r["decay"], r["phase"], r["D"], r["B"]) == (impl, decay, phase, D, 1))
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="--" if "graph" in phase else "-",
                        label=f"{impl} {decay}" + (" (graph)" if "graph" in phase else ""))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"T (B=1, H={H}, D={D}, bf16)")
        ax.set_ylabel("fwd+bwd time / memory floor")
        ax.legend(fontsize=7)
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


if __name__ == "__main__":
    main()
