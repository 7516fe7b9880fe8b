"""A/B of lasp2.linear_attention's eager fwd + bwd with a fixed decay, timed as
benchmarks/bench_linear_attention.py times it (same inputs, cuda_timing.median_ms of
`torch.autograd.grad(op(q, k, v, decay), (q, k, v), do)`), variants alternating in one
process, with fla's chunk_simple_gla(g_gamma=) in the same process when importable.

    python3 benchmarks/kernel/ab_fixed_op.py [--seq-lens 65536 16384] [--rounds 5]
        [--variants old new ...]

Variants:
  old   the checked Python path (no fast path) and state walks to fp32 underflow
        (LASP2_CUDA_STATE_FLOOR=0)
  host  the Python fast path, walks as old
  new   all defaults (walks end at the 2^-48 floor)
  sub<n>   new with LASP2_CUDA_STATE_SUB_CHUNKS=n (0: split walks off; 16, 64: pieces)
  fl<n>    new with LASP2_CUDA_STATE_FLOOR=n (walks end at 2^-n; 0: at fp32 underflow)
(Session 14's measurement, docs/history/kernels-log.md, ran this at fa1dfaf, where `old` also put the
C++ node back on lasp2_forward's five saved buffers through a temporary knob, removed
after the call.)
Also prints the host time of the forward call alone (wall, no synchronization: how long
the GPU waits for its first kernel in a synchronized step) and graph replay times.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import lasp2  # noqa: E402
from cuda_timing import median_ms  # noqa: E402
from bench_linear_attention import graph_ms  # noqa: E402
from lasp2.ops import linear_attention as la_module  # noqa: E402

PLAIN = la_module._plain_cuda_tensors
ENV = {"LASP2_CUDA_STATE_SUB_CHUNKS": None, "LASP2_CUDA_STATE_FLOOR": None}
SAME_KERNELS = ("old", "host")  # the same kernels: the same bits


def use(variant):
    env = dict(ENV)
    la_module._plain_cuda_tensors = (lambda *a: False) if variant == "old" else PLAIN
    if variant in ("old", "host"):
        env["LASP2_CUDA_STATE_FLOOR"] = "0"
    if variant.startswith("sub"):
        env["LASP2_CUDA_STATE_SUB_CHUNKS"] = variant[3:]
    if variant.startswith("fl"):
        env["LASP2_CUDA_STATE_FLOOR"] = variant[2:]
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def host_us(fwd, reps=30):
    """Median wall time of the forward call on the host (the GPU runs behind it)."""
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fwd()
        ts.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[65536, 16384])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["old", "host", "new"])
    ap.add_argument("--graph", nargs="*", default=["host", "new"])
    ap.add_argument("--fla", action="store_true")
    args = ap.parse_args()
    H, D, B, dt = 16, 128, 1, torch.bfloat16
    for T in args.seq_lens:
        gen = torch.Generator(device="cuda").manual_seed(T + D + B)  # bench_linear_attention's inputs
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, generator=gen).requires_grad_() for _ in range(3))
        g = -torch.rand(H, device="cuda", generator=gen) * 0.05
        do = torch.randn(B, T, H, D, device="cuda", dtype=dt, generator=gen)
        fwd = lambda: lasp2.linear_attention(q, k, v, decay=g)
        step = lambda: torch.autograd.grad(fwd(), (q, k, v), do)
        ref, diff = None, {}
        eager, host = {n: [] for n in args.variants}, {n: [] for n in args.variants}
        for r in range(args.rounds):
            for n in (args.variants if r % 2 == 0 else args.variants[::-1]):
                use(n)
                out = step()
                if n in SAME_KERNELS:
                    if ref is None:
                        ref = out
                    assert all(torch.equal(a, b) for a, b in zip(ref, out)), f"{n}: gradients differ"
                elif ref is not None and n not in diff:  # max |diff| / max |ref| per gradient
                    diff[n] = [float((a.float() - b.float()).abs().max() / b.float().abs().max())
                               for a, b in zip(out, ref)]
                eager[n].append(median_ms(step))
                host[n].append(host_us(fwd))
        graph = {}
        for n in args.graph:
            use(n)
            graph[n] = graph_ms(step)
        use("new")
        print(f"== T={T} (B=1, H=16, D=128, bf16, decay -0.05 rand(H)), eager fwd+bwd ms, "
              f"median of {args.rounds} alternating medians (all):")
        for n in args.variants:
            print(f"   {n:6s} {statistics.median(eager[n]):.4f}  host fwd call {statistics.median(host[n]):6.1f} us"
                  f"   [{' '.join(f'{x:.3f}' for x in eager[n])}]")
        print("   graph replay: " + ", ".join(f"{n} {ms:.4f}" for n, ms in graph.items()))
        for n, d in diff.items():
            print(f"   {n} vs {SAME_KERNELS[0]}: max |d(dq, dk, dv)| / max |.| = " + " ".join(f"{x:.2e}" for x in d))
        print("", end="", flush=True)
        if args.fla:
            try:
                from fla.ops.simple_gla import chunk_simple_gla

                ff = lambda: torch.autograd.grad(chunk_simple_gla(q, k, v, g_gamma=g)[0], (q, k, v), do)
                fla = statistics.median([median_ms(ff) for _ in range(3)])
                print(f"   fla chunk_simple_gla(g_gamma) eager fwd+bwd {fla:.4f} ms; fla / lasp2: " +
                      ", ".join(f"{n} {fla / statistics.median(eager[n]):.3f}" for n in args.variants))
            except Exception as exc:  # fla is optional
                print(f"# fla: {type(exc).__name__}: {exc}")
        del q, k, v, g, do, ref
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
