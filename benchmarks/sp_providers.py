"""LASP-2 vs LASP-1 vs all-to-all (Ulysses): one linear attention layer, fwd + bwd.

    # CPU (gloo), small sizes, spawns P = 1, 2, 4 processes itself:
    python benchmarks/sp_providers.py --device cpu
    # GPU: one launch per GPU count; rows accumulate in --out-dir/sp_providers.json
    torchrun --standalone --nproc_per_node 4 benchmarks/sp_providers.py --device cuda
    python benchmarks/sp_providers.py --report          # table + PNG from the stored rows

For every world size P, tokens per rank T and provider it measures, on the SP group
of all ranks (each rank holds T contiguous tokens, the global sequence is P*T):
  step      median over iterations of the slowest rank's fwd+bwd time (providers and
            modes take turns within each iteration, so load drifts hit them alike)
  tok/s     global tokens per second, P*B*T / step
  blocked   time a rank spends inside communication calls and waits (slowest rank,
            median): the lasp2/lasp1 communicator wrapped in _bench.TimedCommunicator,
            Ulysses' all_to_all_single timed with perf_counter (CUDA-synchronised).
            For lasp2/lasp1 on CUDA this is host enqueue time only, so "-".
  no-comm   the same step with communication replaced by a local no-op
            (_bench.NoopCommunicator; Ulysses: a local copy), i.e. the compute alone
  exposed   step - no-comm: what communication (incl. LASP-1's serial chain) costs
  MB/rank   bytes a rank hands to the network per step: its all-gathered records
            (lasp2), its sends (lasp1), the off-rank (P-1)/P of its all-to-all
            inputs (ulysses)
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lasp2  # noqa: E402
from lasp2 import _bench  # noqa: E402  (build with LASP2_BUILD_BENCH=1)
from lasp2.distributed import Collectives, get_communicator  # noqa: E402
from lasp2.ops.gates import lightning_log_decay  # noqa: E402
# "lasp2-fused" is provider "lasp2" with overlap=False: the AllGather is waited for and the
# prefix enters one fused pass (the same compute as LASP-1, so the two differ only in how
# they communicate); "lasp2" overlaps the gather with the local attention and adds the
# prefix term in a second pass.
PROVIDERS = ("lasp2", "lasp2-fused", "lasp1", "ulysses")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--worlds", default="1,2,4", help="world sizes to spawn (CPU / no torchrun)")
    p.add_argument("--tokens", default=None, help="tokens per rank, comma-separated "
                   "(default GPU 4096..262144, CPU 256,1024,4096)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=None, help="default GPU 16, CPU 4")
    p.add_argument("--head-dim", type=int, default=None, help="default GPU 128, CPU 64")
    p.add_argument("--decay", choices=("none", "fixed", "gate"), default="gate")
    p.add_argument("--dtype", choices=tuple(DTYPES), default=None, help="default GPU bf16, CPU fp32")
    p.add_argument("--providers", default=",".join(PROVIDERS))
    p.add_argument("--warmup", type=int, default=None, help="default GPU 3, CPU 2")
    p.add_argument("--iters", type=int, default=None, help="default GPU 10, CPU 9")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                     "sp_providers"))
    p.add_argument("--report", action="store_true", help="only print the table and plot the stored rows")
    a = p.parse_args(argv)
    gpu = a.device == "cuda"
    a.tokens = [int(x) for x in (a.tokens or ("4096,16384,65536,262144" if gpu else "256,1024,4096")).split(",")]
    a.worlds = [int(x) for x in a.worlds.split(",")]
    a.providers = [x for x in a.providers.split(",")]
    for name in a.providers:
        if name not in PROVIDERS:
            p.error(f"unknown provider {name!r}; choose from {PROVIDERS}")
    a.heads = a.heads or (16 if gpu else 4)
    a.head_dim = a.head_dim or (128 if gpu else 64)
    a.dtype = a.dtype or ("bf16" if gpu else "fp32")
    a.warmup = a.warmup if a.warmup is not None else (3 if gpu else 2)
    a.iters = a.iters or (10 if gpu else 9)
    return a


# --- instrumentation: handed to the ops through the SP context ----------------------

class UlyssesMeter:
    """all_to_all_single replacements: timed (really exchanges) or local (no-op)."""

    def __init__(self, device, world):
        self.device, self.world = device, world
        self.seconds = 0.0
        self.bytes = 0

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def timed(self, out, inp, group=None):
        self.bytes += inp.numel() * inp.element_size() * (self.world - 1) // self.world
        self.sync()
        t0 = time.perf_counter()
        work = dist.all_to_all_single(out, inp, group=group)
        self.sync()
        self.seconds += time.perf_counter() - t0
        return work

    @staticmethod
    def local(out, inp, group=None):
        out.copy_(inp)


# --- one measurement -------------------------------------------------------------

def make_inputs(a, T, device):
    dtype = DTYPES[a.dtype]
    gen = torch.Generator(device="cpu").manual_seed(1234 + dist.get_rank())
    shape = (a.batch, T, a.heads, a.head_dim)
    q, k, v, do = (torch.randn(shape, generator=gen).mul_(0.5).to(device, dtype) for _ in range(4))
    leaves = [q, k, v]
    kw = {}
    if a.decay == "gate":
        kw["g"] = F.logsigmoid(torch.randn(a.batch, T, a.heads, generator=gen) + 3.0).to(device)
        leaves.append(kw["g"])
    elif a.decay == "fixed":
        kw["decay"] = lightning_log_decay(a.heads).float().to(device)
        leaves.append(kw["decay"])
    for x in leaves:
        x.requires_grad_()
    return leaves, kw, do


def slowest(value, device):
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


class Variant:
    """One provider in one mode ("real" or "noop": communication replaced by local
    no-ops), with the instruments that mode needs."""

    def __init__(self, provider, mode, comm, device, world, group, seqlen):
        self.provider, self.mode = provider, mode
        self.meter = UlyssesMeter(device, world)
        self.timed = None
        self.steps, self.blocked, self.sent = [], [], 0
        swap = {}
        if comm is not None and mode == "real":
            self.timed = _bench.TimedCommunicator(comm)
            swap = dict(communicator=self.timed, collectives=Collectives(all_to_all_single=self.meter.timed))
        elif comm is not None:
            swap = dict(communicator=_bench.NoopCommunicator(comm),
                        collectives=Collectives(all_to_all_single=UlyssesMeter.local))
        self.sp_context = lasp2.build_sp_context(group, seqlen=seqlen, device=device, **swap)

    def run(self, step, sync, device, record):
        if self.timed is not None:
            self.timed.reset()
        self.meter.seconds, self.meter.bytes = 0.0, 0
        sync()
        dist.barrier()
        t0 = time.perf_counter()
        step(self.provider, self.sp_context)
        sync()
        elapsed = time.perf_counter() - t0
        comm_s = self.meter.seconds + (self.timed.seconds if self.timed is not None else 0.0)
        step_max, comm_max = slowest(elapsed, device), slowest(comm_s, device)
        if record:
            self.steps.append(step_max)
            self.blocked.append(comm_max)
            self.sent = self.meter.bytes + (self.timed.bytes if self.timed is not None else 0)


def measure_all(a, providers, T, group, device):
    """{provider: {mode: Variant}} after warmup + iters steps each. The variants take
    turns within every iteration, so load changes on a shared machine hit them alike."""
    world = dist.get_world_size()
    leaves, kw, do = make_inputs(a, T, device)
    comm = get_communicator(group, device) if group is not None else None
    modes = ("real", "noop") if comm is not None else ("real",)
    variants = [Variant(p, m, comm, device, world, group, world * T) for p in providers for m in modes]

    def step(provider, sp_context):
        for x in leaves:
            x.grad = None
        o = lasp2.linear_attention(leaves[0], leaves[1], leaves[2], sp_context=sp_context,
                                   provider="lasp2" if provider == "lasp2-fused" else provider,
                                   overlap=provider != "lasp2-fused", **kw)
        o.backward(do)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(a.warmup + a.iters):
        for v in variants:
            v.run(step, sync, device, record=i >= a.warmup)
    out = {}
    for v in variants:
        out.setdefault(v.provider, {})[v.mode] = v
    return out


def run_world(rank, world, a, out_path):
    if a.device == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())  # set by the launcher
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)  # one core per rank; the CPU kernels are single-threaded
    group = dist.group.WORLD if world > 1 else None
    rows = []
    providers = [p for p in a.providers if not (p == "ulysses" and a.heads % world)]
    for T in a.tokens:
        results = measure_all(a, providers, T, group, device)
        for provider in providers:
            real = results[provider]["real"]
            step, blocked, sent = (statistics.median(real.steps), statistics.median(real.blocked), real.sent)
            noop = statistics.median(results[provider]["noop"].steps) if world > 1 else step
            row = dict(world=world, tokens_per_rank=T, provider=provider, batch=a.batch, heads=a.heads,
                       head_dim=a.head_dim, dtype=a.dtype, decay=a.decay, device=a.device,
                       step_ms=step * 1e3, tokens_per_s=world * a.batch * T / step,
                       blocked_ms=None if (device.type == "cuda" and provider != "ulysses") else blocked * 1e3,
                       noop_ms=noop * 1e3, exposed_ms=(step - noop) * 1e3, mb_per_rank=sent / 2 ** 20)
            rows.append(row)
            if rank == 0:
                print(format_row(row), flush=True)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)


# --- launching ----------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawned(rank, world, port, a, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if a.device == "cuda" else "gloo"
    if a.device == "cuda":
        torch.cuda.set_device(rank)
        dist.init_process_group(backend, rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    else:
        dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        run_world(rank, world, a, out_path)
    finally:
        dist.destroy_process_group()


def store(rows, path):
    """Adds rows to the JSON file at path, replacing rows of the same configuration."""
    key = lambda r: (r["device"], r["world"], r["tokens_per_rank"], r["provider"], r["batch"], r["heads"],
                     r["head_dim"], r["dtype"], r["decay"])
    old = []
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
    merged = {key(r): r for r in old}
    merged.update({key(r): r for r in rows})
    order = lambda r: PROVIDERS.index(r["provider"]) if r["provider"] in PROVIDERS else len(PROVIDERS)
    out = sorted(merged.values(), key=lambda r: (r["device"], r["tokens_per_rank"], r["world"], order(r)))
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    return out


# --- report -------------------------------------------------------------------------

HEADER = (f"{'P':>2} {'T/rank':>7} {'provider':<11} {'step ms':>9} {'tok/s':>10} {'blocked ms':>10} "
          f"{'no-comm ms':>10} {'exposed ms':>10} {'MB/rank':>8}")


def format_row(r):
    blocked = "-" if r["blocked_ms"] is None else f"{r['blocked_ms']:.2f}"
    return (f"{r['world']:>2} {r['tokens_per_rank']:>7} {r['provider']:<11} {r['step_ms']:>9.2f} "
            f"{r['tokens_per_s']:>10.0f} {blocked:>10} {r['noop_ms']:>10.2f} {r['exposed_ms']:>10.2f} "
            f"{r['mb_per_rank']:>8.3f}")


def report(rows, png_path):
    print(HEADER)
    for r in rows:
        print(format_row(r))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = {"lasp2": "tab:blue", "lasp2-fused": "tab:purple", "lasp1": "tab:orange", "ulysses": "tab:green"}
    styles = {1: ":", 2: "--", 4: "-", 8: "-."}
    for device in sorted({r["device"] for r in rows}):
        for provider in PROVIDERS:
            for world in sorted({r["world"] for r in rows}):
                sel = sorted((r for r in rows if r["device"] == device and r["provider"] == provider
                              and r["world"] == world), key=lambda r: r["tokens_per_rank"])
                if not sel or (world == 1 and provider != "lasp2"):
                    continue  # at P = 1 every provider is the single-device op
                label = "P=1 (single device)" if world == 1 else f"{provider} P={world}"
                xs = [r["tokens_per_rank"] for r in sel]
                color = "black" if world == 1 else colors[provider]
                style = styles.get(world, "-")
                axes[0].plot(xs, [r["tokens_per_s"] for r in sel], style, color=color, marker="o", label=label)
                if world > 1:
                    # CPU: the directly timed blocked time (the exposed difference drowns in
                    # noise there); CUDA: step - no-comm step, the same measure for all providers
                    ys = [r["blocked_ms"] if device == "cpu" else max(r["exposed_ms"], 1e-3) for r in sel]
                    axes[1].plot(xs, ys, style, color=color, marker="o", label=label)
    meta = rows[0]
    title = (f"{meta['device'].upper()}: B={meta['batch']} H={meta['heads']} D={meta['head_dim']} "
             f"{meta['dtype']} decay={meta['decay']}")
    axes[0].set(xscale="log", yscale="log", xlabel="tokens per rank", ylabel="global tokens / s (fwd+bwd)",
                title=title)
    cpu_only = all(r["device"] == "cpu" for r in rows)
    axes[1].set(xscale="log", yscale="log", xlabel="tokens per rank",
                ylabel="ms per step " + ("blocked in communication" if cpu_only else "exposed communication"),
                title="communication cost (slowest rank)")
    ticks = sorted({r["tokens_per_rank"] for r in rows})
    for ax in axes:
        ax.set_xticks(ticks, [f"{t // 1024}K" if t >= 1024 else str(t) for t in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    print(f"plot: {png_path}")


def main(argv=None):
    a = parse_args(argv)
    os.makedirs(a.out_dir, exist_ok=True)
    json_path = os.path.join(a.out_dir, "sp_providers.json")
    png_path = os.path.join(a.out_dir, "sp_providers.png")
    if a.report:
        with open(json_path) as f:
            report(json.load(f), png_path)
        return
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: this launch is one world size
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        if a.device == "cuda":
            local = int(os.environ.get("LOCAL_RANK", rank))
            torch.cuda.set_device(local)
            dist.init_process_group("nccl", device_id=torch.device("cuda", local))
        else:
            dist.init_process_group("gloo")
        out = os.path.join(tempfile.gettempdir(), f"sp_providers_{os.getpid()}.json")
        if rank == 0:
            print(HEADER, flush=True)
        try:
            run_world(rank, world, a, out)
        finally:
            dist.destroy_process_group()
        if rank == 0:
            with open(out) as f:
                rows = store(json.load(f), json_path)
            os.remove(out)
            report(rows, png_path)
        return
    print(HEADER, flush=True)
    new_rows = []
    for world in a.worlds:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "rows.json")
            mp.spawn(spawned, args=(world, free_port(), a, out), nprocs=world, join=True)
            with open(out) as f:
                new_rows += json.load(f)
    print()
    report(store(new_rows, json_path), png_path)


if __name__ == "__main__":
    main()
