"""Kernel benchmark of one causal linear attention layer on one GPU.

    python benchmarks/bench_linear_attention.py [--seq-lens 4096 16384 65536 262144] [--out DIR]

lasp2 (fwd, bwd, fwd+bwd) side by side with a plain PyTorch chunked implementation
and, when importable, flash-linear-attention's chunk_simple_gla, at H=16, D=128,
bf16, per-token gates. Prints time, TFLOP/s, GB/s and x over the memory floor
(bytes that must move / measured device-to-device copy bandwidth), the peak memory
per layer, writes a PNG plot and a JSON file.
"""

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lasp2  # noqa: E402
from torch_chunked import torch_chunked_linear_attention  # noqa: E402


def median_ms(fn, warmup=3, reps=10, budget_ms=3000.0):
    """Median of `reps` timed calls, fewer when one call is slow (at most ~budget_ms)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if times and sum(times) > budget_ms:
            break
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def copy_bandwidth_gbs():
    x = torch.empty(1 << 28, dtype=torch.float32, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    ms = median_ms(lambda: y.copy_(x))
    return 2 * x.numel() * 4 / ms / 1e6


def implementations(decay):
    """name -> fn(q, k, v, g) where g is [B, T, H] gates ("gate") or [H] log decays ("fixed")."""
    if decay == "gate":
        impls = {"lasp2": lambda q, k, v, g: lasp2.linear_attention(q, k, v, g=g),
                 "torch-chunked": lambda q, k, v, g: torch_chunked_linear_attention(q, k, v, g)}
    else:
        impls = {"lasp2": lambda q, k, v, g: lasp2.linear_attention(q, k, v, decay=g),
                 "torch-chunked": lambda q, k, v, g: torch_chunked_linear_attention(
                     q, k, v, g.view(1, 1, -1).expand(q.shape[0], q.shape[1], -1))}
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        if decay == "gate":
            impls["fla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g=g)[0]
        else:
            impls["fla"] = lambda q, k, v, g: chunk_simple_gla(q, k, v, g_gamma=g)[0]
    except Exception as exc:  # fla is optional: carried to the device when available
        print(f"# flash-linear-attention not available ({type(exc).__name__}: {exc})")
    return impls


def flops(T, H, D, C=64):
    """Matmul flops of the chunked algorithm (fwd; bwd counted as 2x fwd)."""
    per_chunk = 2 * C * C * D * 2 + 2 * C * D * D * 2
    return H * (T // C) * per_chunk


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536, 262144])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--decays", nargs="+", default=["gate", "fixed"], choices=["gate", "fixed"])
    parser.add_argument("--torch-max-len", type=int, default=65536, help="skip the slow baseline beyond this")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    bw = copy_bandwidth_gbs()
    print(f"# {torch.cuda.get_device_name()}  copy bandwidth {bw:.0f} GB/s  torch {torch.__version__}")
    H, D, dt = args.heads, args.dim, torch.bfloat16
    rows = []
    for decay, T in [(d, T) for d in args.decays for T in args.seq_lens]:
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        if decay == "gate":
            g = (F.logsigmoid(torch.randn(1, T, H, device="cuda")) / 16).requires_grad_()
        else:
            g = -torch.rand(H, device="cuda") * 0.05
        do = torch.randn(1, T, H, D, device="cuda", dtype=dt)
        grad_inputs = (q, k, v, g) if g.requires_grad else (q, k, v)
        tensor_bytes = T * H * D * 2
        floor_bytes = {"fwd": 4 * tensor_bytes, "bwd": 7 * tensor_bytes, "fwd+bwd": 11 * tensor_bytes}
        for name, fn in implementations(decay).items():
            if name == "torch-chunked" and T > args.torch_max_len:
                continue
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                o = fn(q, k, v, g)
                fwd = median_ms(lambda: fn(q, k, v, g))
                bwd_once = lambda: torch.autograd.grad(fn(q, k, v, g), grad_inputs, do)
                both = median_ms(bwd_once)
                peak_gib = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
            except Exception as exc:  # OOM, or an implementation refusing this input
                print(f"# {name} {decay} T={T}: {type(exc).__name__}: {str(exc)[:160]}")
                torch.cuda.empty_cache()
                continue
            del o
            times = {"fwd": fwd, "bwd": both - fwd, "fwd+bwd": both}
            for phase, ms in times.items():
                fl = flops(T, H, D) * (1 if phase == "fwd" else 2 if phase == "bwd" else 3)
                floor_ms = floor_bytes[phase] / bw / 1e6
                rows.append(dict(impl=name, decay=decay, T=T, phase=phase, ms=ms, tflops=fl / ms / 1e9,
                                 gbs=floor_bytes[phase] / ms / 1e6, x_floor=ms / floor_ms, peak_gib=peak_gib))
            # one line per measurement as it lands, so a run cut short still reports
            print(f"# {name} {decay} T={T}: fwd {fwd:.3f} ms, fwd+bwd {both:.3f} ms "
                  f"({both / (floor_bytes['fwd+bwd'] / bw / 1e6):.2f}x floor), peak {peak_gib:.2f} GiB", flush=True)
    print(f"\n{'impl':>14} {'decay':>6} {'T':>7} {'phase':>8} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>7} {'x floor':>8} {'peak GiB':>9}")
    for r in rows:
        print(f"{r['impl']:>14} {r['decay']:>6} {r['T']:>7} {r['phase']:>8} {r['ms']:>9.3f} {r['tflops']:>8.1f} "
              f"{r['gbs']:>7.0f} {r['x_floor']:>8.2f} {r['peak_gib']:>9.2f}")
    for decay, T in [(d, T) for d in args.decays for T in args.seq_lens]:
        base = {r["impl"]: r["ms"] for r in rows if r["T"] == T and r["decay"] == decay and r["phase"] == "fwd+bwd"}
        if "lasp2" in base:
            others = ", ".join(f"{k} {v / base['lasp2']:.2f}x" for k, v in base.items() if k != "lasp2")
            print(f"# {decay} T={T}: fwd+bwd time of the others / lasp2: {others}")
    with open(os.path.join(args.out, "bench_linear_attention.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "copy_gbs": bw, "rows": rows}, f, indent=1)
    plot(rows, os.path.join(args.out, "bench_linear_attention.png"))


def plot(rows, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no plot")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for impl, decay in sorted({(r["impl"], r["decay"]) for r in rows}):
        pts = [(r["T"], r["ms"]) for r in rows if (r["impl"], r["decay"]) == (impl, decay) and r["phase"] == "fwd+bwd"]
        ax.plot(*zip(*pts), marker="o", label=f"{impl} ({decay})")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length T (H=16, D=128, bf16)")
    ax.set_ylabel("fwd+bwd ms")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


if __name__ == "__main__":
    main()
