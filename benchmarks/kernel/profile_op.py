"""Where one fwd + bwd of lasp2.linear_attention spends its time on the GPU.

    python benchmarks/kernel/profile_op.py [--shapes 1x4096 8x4096 1x65536] [--dim 128]

For each B x T (H = 16, bf16, gates): the eager time, the CUDA-graph replay time,
and the kernels' own time summed by kernel name (torch.profiler, CUPTI), so that
host overhead (eager - graph), launch gaps (graph - kernel sum) and each pass's
share are visible.
"""

import argparse
import os
import re
import sys
from collections import defaultdict

import torch
import torch.nn.functional as F

import lasp2

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from cuda_timing import captured_graph, median_ms  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1x4096", "8x4096", "1x65536"])
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--heads", type=int, default=16)
    args = ap.parse_args()
    H, D = args.heads, args.dim
    for shape in args.shapes:
        B, T = (int(x) for x in shape.split("x"))
        q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = (F.logsigmoid(torch.randn(B, T, H, device="cuda")) / 16).requires_grad_()
        do = torch.randn_like(v)
        step = lambda: torch.autograd.grad(lasp2.linear_attention(q, k, v, g=g), (q, k, v, g), do)
        eager = median_ms(step, budget_ms=float("inf"))
        graph = captured_graph(step, warmup=1)
        replay = median_ms(graph.replay, budget_ms=float("inf"))
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA], acc_events=True) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        per = defaultdict(lambda: [0.0, 0])
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                m = re.search(r"(\w+_kernel)(<[^>]*>)?", e.name)  # tc_fwd_kernel<...>, meta_kernel, ...
                name = (m.group(0) if m else e.name)[:70]
                per[name][0] += e.device_time / 5 / 1000.0
                per[name][1] += 1
        total = sum(ms for ms, _ in per.values())
        print(f"== B={B} T={T} H={H} D={D} gate bf16: eager {eager:.3f} ms, graph replay {replay:.3f} ms, "
              f"kernels {total:.3f} ms, launches/step {sum(n for _, n in per.values()) // 5}")
        for name, (ms, n) in sorted(per.items(), key=lambda kv: -kv[1][0])[:14]:
            print(f"   {ms:8.3f} ms {n // 5:3d}x  {name}")
        del graph, q, k, v, g, do


if __name__ == "__main__":
    main()
