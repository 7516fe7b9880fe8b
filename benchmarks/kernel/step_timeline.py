"""The timeline of one synchronized eager fwd + bwd step of lasp2.linear_attention:
where the GPU waits for the host.

    python3 benchmarks/kernel/step_timeline.py [--seq-len 65536] [--decay fixed|gate] [--batch 1]

Runs a few steps, then profiles three (torch.profiler, CPU and CUDA activities) and
prints, for the median one, every GPU kernel / memset / copy in order with its start
(us after the step's first host op), its duration and the GPU idle gap before it;
with --host, the step's host events (torch ops, CUDA runtime calls) in start order.
The sum of the gaps is the GPU idle time of the step
(what an eager step costs over its kernels; the profiler's own host overhead inflates
it somewhat, so compare variants within one run). Inputs as bench_linear_attention.py
(H = 16, D = 128, bf16; fixed decays -0.05 rand(H), gates logsigmoid(randn) / 16).
"""

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import lasp2  # noqa: E402


def step_fn(args):
    B, T, H, D = args.batch, args.seq_len, 16, 128
    gen = torch.Generator(device="cuda").manual_seed(T + D + B)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()
               for _ in range(3))
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    if args.decay == "fixed":
        g = -torch.rand(H, device="cuda", generator=gen) * 0.05
        return lambda: torch.autograd.grad(lasp2.linear_attention(q, k, v, decay=g), (q, k, v), do)
    g = (F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 16).requires_grad_()
    return lambda: torch.autograd.grad(lasp2.linear_attention(q, k, v, g=g), (q, k, v, g), do)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq-len", type=int, default=65536)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--decay", choices=["fixed", "gate"], default="fixed")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--host", type=float, default=0.0,
                    help="also list the step's host events lasting at least this many us (0: none)")
    args = ap.parse_args()
    step = step_fn(args)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for i in range(args.steps):
            with torch.profiler.record_function(f"step{i}"):
                step()
            torch.cuda.synchronize()
    events = prof.events()
    steps = sorted((e for e in events if e.name.startswith("step") and e.device_type.name == "CPU"),
                   key=lambda e: e.time_range.start)
    gpu = sorted((e for e in events if e.device_type.name == "CUDA"), key=lambda e: e.time_range.start)
    launches = sorted((e for e in events if e.device_type.name == "CPU" and
                       e.name.startswith(("cudaLaunchKernel", "cuLaunchKernel", "cudaMemsetAsync", "cudaMemcpyAsync"))),
                      key=lambda e: e.time_range.start)
    rows_by_step = []
    for s in steps:
        t0, t1 = s.time_range.start, s.time_range.end
        ks = [e for e in gpu if t0 <= e.time_range.start <= t1 + 50_000]
        ls = [e for e in launches if t0 <= e.time_range.start <= t1]
        rows, prev_end, idle = [], t0, 0.0
        for j, e in enumerate(ks):
            gap = max(0.0, e.time_range.start - prev_end)
            idle += gap
            rows.append((e.name[:60], e.time_range.start - t0, e.time_range.elapsed_us(), gap))
            prev_end = max(prev_end, e.time_range.end)
        host = sorted((e for e in events if e.device_type.name == "CPU" and t0 <= e.time_range.start <= t1
                       and e.time_range.elapsed_us() >= args.host and not e.name.startswith("step")),
                      key=lambda e: e.time_range.start) if args.host > 0 else []
        rows_by_step.append((prev_end - t0, idle, rows, ls, host, t0))
    rows_by_step.sort(key=lambda r: r[0])
    total, idle, rows, ls, host, t0 = rows_by_step[len(rows_by_step) // 2]
    print(f"== {args.decay} B={args.batch} T={args.seq_len}: step {total / 1000:.3f} ms from its first host op to "
          f"its last kernel's end, GPU idle {idle:.1f} us; {len(rows)} GPU ops, {len(ls)} launches "
          f"(steps: {', '.join(f'{r[0] / 1000:.3f}/{r[1]:.0f}us' for r in rows_by_step)})")
    print(f"   {'kernel':60s} {'start':>8s} {'dur':>8s} {'gap':>7s}  (us)")
    for name, start, dur, gap in rows:
        print(f"   {name:60s} {start:8.1f} {dur:8.1f} {gap:7.1f}")
    if host:
        print(f"   host events >= {args.host:g} us (start, duration; nested events indented by start order only):")
        for e in host[:120]:
            print(f"     {e.time_range.start - t0:8.1f} {e.time_range.elapsed_us():8.1f}  {e.name[:80]}")


if __name__ == "__main__":
    main()
