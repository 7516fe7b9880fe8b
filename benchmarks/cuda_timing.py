"""Timing helpers shared by the GPU benchmarks of this folder."""

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


def captured_graph(step, warmup):
    """`step` captured in a CUDA graph, after `warmup` calls on a side stream (the order
    PyTorch's CUDA-graph notes give): those calls do the lazy set-up (cuBLAS handles,
    allocator blocks, lasp2's scratch) that must not happen inside the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph
