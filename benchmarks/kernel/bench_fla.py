"""flash-linear-attention's chunk kernels (chunk_simple_gla: scalar gate per head,
the same math as lasp2's DecayMode.kGate) at the benchmark's size, for comparison.

    python3 benchmarks/kernel/bench_fla.py [T=65536] [H=16] [D=128] [B=1]

fla-core is pure Python + Triton; on the device machine it is carried as a wheel
(benchmarks/kernel/device_run.sh installs it into /tmp/site when .whl/ has it).
Times are medians of triton.testing.do_bench (CUDA events). The forward is timed
as chunk_simple_gla's forward; fwd+bwd includes dq, dk, dv (and dg for gates).

Two variants: `g_gamma` (a fixed per-head decay, lasp2's DecayMode.kFixed) and
`g` (per-token gates, kGate). fla 0.6.0 refuses the gated backward with Triton
3.4 .. 3.7.0 on Hopper because that Triton miscompiles it (fla issue #640); the
device image's Triton is in that range, so for TIMING ONLY the gated variant
lifts the guard (`--unsafe-gate-timing`); its gradients are not used.
"""
import sys

import torch
import triton

from fla.ops.simple_gla import chunk_simple_gla


def main():
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    T = int(args[0]) if len(args) > 0 else 65536
    H = int(args[1]) if len(args) > 1 else 16
    D = int(args[2]) if len(args) > 2 else 128
    B = int(args[3]) if len(args) > 3 else 1
    torch.manual_seed(0)
    dev = "cuda"
    q, k, v, do = (0.5 * torch.randn(B, T, H, D, device=dev, dtype=torch.bfloat16) for _ in range(4))
    g = torch.empty(B, T, H, device=dev, dtype=torch.float32).uniform_(-0.1, -0.001)
    g_gamma = -0.01 * torch.arange(1, H + 1, device=dev, dtype=torch.float32)
    for t in (q, k, v, g):
        t.requires_grad_(True)
    scale = D ** -0.5
    print(f"fla chunk_simple_gla on {torch.cuda.get_device_name()}: B={B} T={T} H={H} D={D} bf16, "
          f"triton {triton.__version__}, torch {torch.__version__}")

    variants = [("g_gamma", dict(g_gamma=g_gamma))]
    if "--unsafe-gate-timing" in sys.argv:
        import fla.ops.common.chunk_o as chunk_o
        chunk_o.TRITON_ABOVE_3_7_1 = True  # timing only, see the module docstring
        variants.append(("g (guard lifted, timing only)", dict(g=g)))
    for name, kw in variants:
        def fwd():
            with torch.no_grad():
                return chunk_simple_gla(q, k, v, scale=scale, **kw)[0]

        def fwd_bwd():
            o = chunk_simple_gla(q, k, v, scale=scale, **kw)[0]
            o.backward(do)

        try:
            for fn in (fwd, fwd_bwd):  # compile / autotune outside the timing
                fn()
            torch.cuda.synchronize()
            t_f = triton.testing.do_bench(fwd, warmup=100, rep=500, return_mode="median")
            t_fb = triton.testing.do_bench(fwd_bwd, warmup=100, rep=500, return_mode="median",
                                           grad_to_none=[q, k, v, g])
            print(f"fla[{name}] fwd_ms {t_f:.3f} fwd_bwd_ms {t_fb:.3f} bwd_ms {t_fb - t_f:.3f}", flush=True)
        except Exception as e:  # report and go on with the next variant
            print(f"fla[{name}] failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
