"""LASP-2H throughput: sequence-parallel softmax attention at P = 1, 2, 4 ranks.

    python benchmarks/sp_softmax_attention.py --device cpu                     # small, gloo
    python benchmarks/sp_softmax_attention.py --device cuda --seq-len 32768 \\
        --heads 32 --kv-heads 8 --head-dim 128 --dtype bfloat16 --worlds 1,2,4,8

For each world size P (one process per rank, spawned here; gloo on CPU, NCCL on
CUDA) and each split it times, on a fixed global sequence (strong scaling):
  lasp2h fwd+bwd   lasp2.softmax_attention forward and backward
  lasp2h fwd       forward only
  ring fwd         an all-gather-free ring for comparison: P-1 neighbour exchanges
                   of K/V (isend/irecv overlapped with the blocks), the same block
                   kernels and causal skipping (forward only)
A step's time is the slowest rank's (ranks wait for each other in the collectives,
so per-rank times hide the imbalance); "work max/min" is the ratio of query-key
pairs on the busiest and the idlest rank from the block plan: ~2P-1 for
"contiguous", 1 for "balanced". Tokens/s = batch x global length / step time.
Prints a table and writes <out-dir>/lasp2h_bench.{csv,png}.

On a CPU box all ranks share the same cores, so the numbers show that the code
runs and how the work splits, not a speedup; P = 1 is the single-device baseline.
"""

from __future__ import annotations

import argparse
import csv
import os
import socket
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ring_forward(q, k, v, group, split, scale, backend):
    """All-gather-free causal attention: K/V travel around the ring, one neighbour at a time."""
    from lasp2.ops import _softmax_blocks as K
    from lasp2.distributed.sequence_split import local_parts

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    parts = 1 if split == "contiguous" or world == 1 else 2
    b, t, h, _ = q.shape
    d = k.shape[3]
    acc = K.acc_dtype(q.dtype)
    o_acc = torch.zeros(b, t, h, v.shape[3], dtype=acc, device=q.device)
    lse_acc = torch.full((b, h, t), float("-inf"), dtype=acc, device=q.device)
    cur = torch.cat([k, v], dim=-1).contiguous()
    mine = local_parts(t, rank, world, parts)
    for step in range(world):
        src = (rank - step) % world
        reqs, nxt = [], None
        if step < world - 1:
            nxt = torch.empty_like(cur)
            # the benchmark's group is the world group: group ranks are global ranks
            ops = [dist.P2POp(dist.isend, cur, (rank + 1) % world, group),
                   dist.P2POp(dist.irecv, nxt, (rank - 1) % world, group)]
            reqs = dist.batch_isend_irecv(ops)
        for lq, length, gq in mine:
            for lk, _, gk in local_parts(t, src, world, parts):
                if gk > gq:
                    continue  # keys after every query of the part: skipped
                rows = slice(lq, lq + length)
                kv = cur[:, lk:lk + length]
                o_b, lse_b = K.block_forward(backend, q[:, rows], kv[..., :d], kv[..., d:], scale, gk == gq)
                K.merge_into(o_acc, lse_acc, rows, o_b, lse_b)
        for req in reqs:
            req.wait()
        if nxt is not None:
            cur = nxt
    return o_acc.to(q.dtype)


def work_ratio(local_len, world, split):
    """Busiest / idlest rank in causal query-key pairs, from lasp2's block plan."""
    from lasp2.ops.softmax_attention import plan_blocks

    parts = 1 if split == "contiguous" or world == 1 else 2
    work = []
    for r in range(world):
        blocks = plan_blocks(local_len, r, world, parts, True, None)
        work.append(sum((b.q_hi - b.q_lo) * (b.q_hi - b.q_lo + 1) // 2 if b.local
                        else (b.q_hi - b.q_lo) * (b.k_hi - b.k_lo) for b in blocks))
    return max(work) / min(work)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, warmup, iters, group):
    for _ in range(warmup):
        fn()
    _sync(device)
    dist.barrier(group)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    mine = (time.perf_counter() - start) / iters
    t = torch.tensor([mine], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.item()  # the slowest rank's


def worker(rank, world, port, args, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import lasp2
    from lasp2.ops._softmax_blocks import resolve_backend

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    dtype = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(rank)
    T = args.seq_len // world
    make = lambda hh, dd: torch.randn(args.batch, T, hh, dd, generator=gen).to(device=device, dtype=dtype)
    q, k, v = make(args.heads, args.head_dim), make(args.kv_heads, args.head_dim), make(args.kv_heads, args.head_dim)
    do = make(args.heads, args.head_dim)
    leaves = [x.requires_grad_() for x in (q, k, v)]
    scale = args.head_dim ** -0.5
    backend = resolve_backend(args.backend, q, args.head_dim)
    rows = []
    for split in args.splits:
        sp = group if world > 1 else None

        def fwd_bwd():
            o = lasp2.softmax_attention(*leaves, group=sp, split=split, backend=args.backend)
            torch.autograd.grad(o, leaves, do)

        def fwd():
            with torch.no_grad():
                lasp2.softmax_attention(q, k, v, group=sp, split=split, backend=args.backend)

        def ring():
            with torch.no_grad():
                ring_forward(q, k, v, group, split, scale, backend)

        for name, fn in (("lasp2h fwd+bwd", fwd_bwd), ("lasp2h fwd", fwd), ("ring fwd", ring)):
            if name == "ring fwd" and args.no_ring:
                continue
            slow = _time(fn, device, args.warmup, args.iters, group)
            rows.append(dict(world=world, split=split, method=name, seconds=slow,
                             tokens_per_s=args.batch * args.seq_len / slow,
                             work_ratio=work_ratio(T, world, split), backend=backend))
    if rank == 0:
        queue.put(rows)
    dist.destroy_process_group()


def run_world(world, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    rows = queue.get(timeout=args.timeout)
    for p in procs:
        p.join(60)
    return rows


def plot(rows, path, args):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no plot (pip install matplotlib); table in {path[:-4]}.csv")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for split in args.splits:
        for method, style in (("lasp2h fwd+bwd", "-o"), ("lasp2h fwd", "-s"), ("ring fwd", ":^")):
            pts = [(r["world"], r["tokens_per_s"]) for r in rows if r["split"] == split and r["method"] == method]
            if pts:
                ax.plot(*zip(*pts), style, label=f"{method} ({split})")
    ax.set_xlabel("SP ranks P")
    ax.set_ylabel("tokens / s (global sequence)")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.set_title(f"LASP-2H, T={args.seq_len}, B={args.batch}, H={args.heads}/{args.kv_heads}, "
                 f"D={args.head_dim}, {args.dtype}, {args.device}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--seq-len", type=int, default=1024, help="global sequence length")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes")
    parser.add_argument("--splits", default="contiguous,balanced")
    parser.add_argument("--backend", default="auto", choices=["auto", "sdpa", "plain"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--no-ring", action="store_true", help="skip the ring comparison")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out-dir", default="benchmarks/results/lasp2h")
    args = parser.parse_args()
    args.splits = args.splits.split(",")
    worlds = [int(w) for w in args.worlds.split(",")]
    if args.device == "cuda" and max(worlds) > torch.cuda.device_count():
        raise SystemExit(f"--worlds {args.worlds} needs {max(worlds)} GPUs, found {torch.cuda.device_count()}")
    for w in worlds:
        if args.seq_len % (2 * w):
            raise SystemExit(f"--seq-len {args.seq_len} must divide into {2 * w} parts for P={w}")

    rows = []
    for w in worlds:
        rows += run_world(w, args)
    base = {(r["split"], r["method"]): r["seconds"] for r in rows if r["world"] == worlds[0]}
    print(f"\nLASP-2H, global T={args.seq_len}, B={args.batch}, heads {args.heads}/{args.kv_heads} (q/kv), "
          f"D={args.head_dim}, {args.dtype}, {args.device}, block backend {rows[0]['backend']}")
    print(f"{'P':>3} {'split':<11} {'method':<15} {'ms/step':>9} {'tokens/s':>11} "
          f"{'vs P=' + str(worlds[0]):>8} {'work max/min':>12}")
    for r in rows:
        speedup = base[(r["split"], r["method"])] / r["seconds"]
        print(f"{r['world']:>3} {r['split']:<11} {r['method']:<15} {r['seconds'] * 1e3:>9.1f} "
              f"{r['tokens_per_s']:>11.0f} {speedup:>7.2f}x {r['work_ratio']:>12.2f}")
    os.makedirs(args.out_dir, exist_ok=True)
    csv_path = os.path.join(args.out_dir, "lasp2h_bench.csv")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {csv_path}")
    plot(rows, os.path.join(args.out_dir, "lasp2h_bench.png"), args)


if __name__ == "__main__":
    main()
