"""GPU time of the L2 norm of q and k (use_qk_l2norm=True): the unfused PyTorch formula
x * rsqrt(sum x^2 + eps) under autograd (what lasp2 ran before the fused op) against
lasp2's fused op (lasp2/ops/_l2norm_library.py: one launch for q and k each way), when
lasp2 is importable with its CUDA kernels; otherwise the unfused numbers alone (the
fused kernels' own time then comes from the CUDA GoogleTest QkL2NormCuda.Timing).

    python benchmarks/bench_qk_l2norm.py [T H D B dtype]     (default 65536 16 128 1 bf16)

Prints one line per variant: forward, backward and fwd + bwd medians (CUDA events) and
the number of CUDA kernels each direction launched (torch.profiler).
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cuda_timing import median_ms  # noqa: E402

EPS = 1e-6


def unfused(q, k):
    f = lambda x: x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + EPS)  # noqa: E731
    return f(q), f(k)


def fused_or_none():
    try:
        import lasp2
        from lasp2.ops._l2norm_library import qk_l2norm
    except ImportError:
        return None
    return qk_l2norm if lasp2.has_cuda_kernels() else None


def kernels_launched(fn):
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def measure(name, norm, q, k, dy_q, dy_k):
    leaves = [x.detach().requires_grad_() for x in (q, k)]

    def forward():
        with torch.no_grad():
            norm(q, k)

    def fwd_bwd():
        yq, yk = norm(*leaves)
        torch.autograd.backward((yq, yk), (dy_q, dy_k))

    fwd = median_ms(forward)
    both = median_ms(fwd_bwd)
    n_fwd, n_both = kernels_launched(forward), kernels_launched(fwd_bwd)
    print(f"{name}: forward {fwd:.3f} ms, backward {both - fwd:.3f} ms, fwd + bwd {both:.3f} ms; "
          f"CUDA kernels forward {n_fwd}, fwd + bwd {n_both} (grad accumulation included)", flush=True)


def main():
    args = sys.argv[1:]
    T, H, D, B = (int(a) for a in (args + ["65536", "16", "128", "1"][len(args):])[:4])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args[4] if len(args) > 4 else "bf16"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, dy_q, dy_k = (torch.randn(B, T, H, D, device="cuda", dtype=dtype, generator=gen) for _ in range(4))
    print(f"B={B} T={T} H={H} D={D} {dtype}, {torch.cuda.get_device_name()}", flush=True)
    measure("unfused (PyTorch autograd)", unfused, q, k, dy_q, dy_k)
    fused = fused_or_none()
    if fused is not None:
        measure("fused (lasp2.qk_l2norm)", fused, q, k, dy_q, dy_k)
    else:
        print("fused: lasp2 with CUDA kernels not importable here", flush=True)


if __name__ == "__main__":
    main()
