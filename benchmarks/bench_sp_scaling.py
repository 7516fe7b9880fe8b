"""LASP-2 sequence-parallel scaling: weak and strong, with the AllGather measured.

    # one launch per GPU count; rows accumulate in --results
    torchrun --standalone --nproc_per_node 4 benchmarks/bench_sp_scaling.py --device cuda --mode weak
    python benchmarks/bench_sp_scaling.py --report        # table + PNG from the rows

Per launch, on the SP group of all ranks: the fwd+bwd time of one linear attention
layer (H=16, D=128, bf16 on GPU) on this rank's share of the sequence; the same
local work with no group (no communication); and the AllGather of the state
records alone (B*H*(dk*dv+1) fp32 per rank, forward and backward). The exposed
communication is step - local; `hidden` is the part of the two AllGathers not
exposed. Scaling efficiency is tokens/s at P over P x tokens/s at P = 1.
On CPU (gloo) it runs with small sizes, to check the script itself.
"""

import argparse
import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from cuda_timing import median_ms  # this folder (the script's own directory is on sys.path)
from lasp2.distributed.collectives import all_gather_single


def timer(device):
    if device.type == "cuda":
        def run(fn, warmup=3, reps=10):
            return median_ms(fn, warmup, reps, budget_ms=float("inf"), before=dist.barrier)
    else:
        def run(fn, warmup=1, reps=5):
            for _ in range(warmup):
                fn()
            times = []
            for _ in range(reps):
                dist.barrier()
                s = time.perf_counter()
                fn()
                times.append((time.perf_counter() - s) * 1e3)
            return sorted(times)[len(times) // 2]
    return run


def measure(args):
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, P = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(P)))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    T_local = args.tokens_per_rank if args.mode == "weak" else args.global_tokens // P
    B, H, D = args.batch, args.heads, args.dim
    gen = torch.Generator(device=device).manual_seed(rank)
    q, k, v, do = (torch.randn(B, T_local, H, D, device=device, dtype=dtype, generator=gen) for _ in range(4))
    g = F.logsigmoid(torch.randn(B, T_local, H, device=device, generator=gen)) / 16
    leaves = [x.requires_grad_() for x in (q, k, v, g)]
    run = timer(device)

    def step(grp):
        o = lasp2.linear_attention(q, k, v, g=g, group=grp, split=args.split)
        torch.autograd.grad(o, leaves, do)

    step_ms = run(lambda: step(group))
    local_ms = run(lambda: step(None))
    record = torch.zeros(B * H * (D * D + 1), device=device)
    gathered = torch.empty(P * record.numel(), device=device)
    gather_ms = run(lambda: all_gather_single(gathered, record, group=group))
    if device.type == "cuda":
        peak_gib = torch.cuda.max_memory_allocated() / 2 ** 30
    else:
        peak_gib = float("nan")
    stats = torch.tensor([step_ms, local_ms, gather_ms], device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX, group=group)
    step_ms, local_ms, gather_ms = stats.tolist()
    if rank == 0:
        exposed = max(step_ms - local_ms, 0.0)
        row = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", mode=args.mode,
                   P=P, T_local=T_local, T_global=T_local * P, B=B, H=H, D=D, split=args.split, step_ms=step_ms,
                   local_ms=local_ms, allgather_ms=gather_ms, exposed_ms=exposed,
                   hidden_fraction=max(0.0, 1 - exposed / (2 * gather_ms)) if gather_ms > 0 else 1.0,
                   tokens_per_s=B * T_local * P / step_ms * 1e3, peak_gib=peak_gib)
        rows = json.load(open(args.results)) if os.path.exists(args.results) else []
        rows.append(row)
        os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
        json.dump(rows, open(args.results, "w"), indent=1)
        print(json.dumps(row))
    dist.destroy_process_group()


def report(args):
    rows = json.load(open(args.results))
    print(f"{'mode':>6} {'P':>3} {'T/rank':>8} {'T global':>9} {'step ms':>9} {'local ms':>9} {'AG us':>8} "
          f"{'exposed us':>10} {'hidden':>7} {'tokens/s':>11} {'eff':>6} {'peak GiB':>9}  device")
    for mode in ("weak", "strong"):
        sel = sorted((r for r in rows if r["mode"] == mode), key=lambda r: (r["device"], r["P"]))
        base = {r["device"]: r["tokens_per_s"] for r in sel if r["P"] == 1}
        for r in sel:
            eff = r["tokens_per_s"] / (r["P"] * base[r["device"]]) if r["device"] in base else float("nan")
            r["efficiency"] = eff
            print(f"{mode:>6} {r['P']:>3} {r['T_local']:>8} {r['T_global']:>9} {r['step_ms']:>9.3f} "
                  f"{r['local_ms']:>9.3f} {r['allgather_ms'] * 1e3:>8.1f} {r['exposed_ms'] * 1e3:>10.1f} "
                  f"{r['hidden_fraction']:>7.0%} {r['tokens_per_s']:>11.3e} {eff:>6.1%} {r['peak_gib']:>9.2f}  {r['device']}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, mode in zip(axes, ("weak", "strong")):
        sel = sorted((r for r in rows if r["mode"] == mode and "efficiency" in r), key=lambda r: r["P"])
        for dev in sorted({r["device"] for r in sel}):
            pts = [(r["P"], r["efficiency"]) for r in sel if r["device"] == dev]
            ax.plot(*zip(*pts), marker="o", label=dev)
        ax.set_title(f"{mode} scaling")
        ax.set_xlabel("ranks P")
        ax.set_ylabel("efficiency")
        ax.set_ylim(0, 1.1)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = os.path.splitext(args.results)[0] + ".png"
    fig.savefig(path, dpi=120)
    print(f"# plot: {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--mode", choices=["weak", "strong"], default="weak")
    parser.add_argument("--tokens-per-rank", type=int, default=65536)
    parser.add_argument("--global-tokens", type=int, default=262144)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--split", choices=["contiguous", "balanced"], default="contiguous")
    parser.add_argument("--results", default="benchmarks/results/sp_scaling.json")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args()
    report(args) if args.report else measure(args)


if __name__ == "__main__":
    main()
