"""Timing helper shared by the GPU benchmarks of this folder."""

import torch


def median_ms(fn, warmup=3, reps=10, budget_ms=2000.0, before=None):
    """Median of up to `reps` timed calls (CUDA events), fewer when one call is slow.
    `before` (e.g. a barrier of the ranks) runs ahead of each timed call, untimed; ranks
    that time together must pass budget_ms=float("inf"), so that all make every call."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        if times and sum(times) > budget_ms:
            break
        if before is not None:
            before()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]
