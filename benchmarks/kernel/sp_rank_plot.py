"""One SP rank's compute beside one device: the table and PNG of `bench_lasp2 T ... sp`.

`bench_lasp2 T 16 128 1 bf16 gate sp` (bench_lasp2.cpp, sp_rank_table) times one rank of
P = 2, 4, 8 (first and last rank, contiguous and balanced splits, communication free)
against the one-device call at the same local T. This script runs it for several binaries
(labels) and T, alternating the binaries each round, or reads logs of such runs, then
prints the fwd + bwd from a CUDA graph (the best of the rounds) with its efficiency
(P = 1 of the same binary and T / the rank's time) and plots efficiency against P.

    # on the device: two builds side by side, two rounds
    python3 benchmarks/kernel/sp_rank_plot.py --run new=build/bench_lasp2 old=/tmp/old/bench_lasp2 \
        --seq-lens 4096 16384 65536 --rounds 2 --log sp.log --png sp_rank.png
    # from a log (blocks headed "== T=<tokens> <label>")
    python3 benchmarks/kernel/sp_rank_plot.py --from-log docs/results/sp_rank_h100_session28.log \
        --png docs/results/sp_rank_h100_session28.png
"""

import argparse
import re
import subprocess
from collections import defaultdict

HEADER = re.compile(r"^== T=(\d+) (\S+)")
ROW = re.compile(r"^\s*(\d+)\s+(contiguous|balanced)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)")


def parse(lines):
    """{(T, label, P, split, rank): [graph fwd + bwd ms, one per round]}"""
    runs = defaultdict(list)
    T = label = None
    for line in lines:
        h = HEADER.match(line)
        if h:
            T, label = int(h.group(1)), h.group(2)
            continue
        r = ROW.match(line)
        if r and T is not None:
            P, split, rank = int(r.group(1)), r.group(2), int(r.group(3))
            runs[(T, label, P, split, rank)].append(float(r.group(8)))
    return runs


def run_benches(binaries, seq_lens, rounds, extra):
    lines = []
    for T in seq_lens:
        for _ in range(rounds):
            for label, path in binaries:
                out = subprocess.run([path, str(T), *extra, "sp"], capture_output=True, text=True, check=True).stdout
                lines.append(f"== T={T} {label}")
                lines.extend(out.splitlines())
    return lines


def table(runs):
    best = {key: min(ms) for key, ms in runs.items()}
    rows = []
    for (T, label, P, split, rank), ms in sorted(best.items()):
        base = best.get((T, label, 1, "contiguous", 0))
        eff = base / ms if base else float("nan")
        rows.append((T, label, P, split, rank, ms, eff, len(runs[(T, label, P, split, rank)])))
    print(f"{'T':>7} {'binary':>10} {'P':>2} {'split':>10} {'rank':>4} {'fb graph ms':>11} {'eff':>5} {'runs':>4}")
    for T, label, P, split, rank, ms, eff, n in rows:
        print(f"{T:>7} {label:>10} {P:>2} {split:>10} {rank:>4} {ms:>11.3f} {eff:>5.2f} {n:>4}")
    return rows


def plot(rows, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seq_lens = sorted({r[0] for r in rows})
    labels = sorted({r[1] for r in rows})
    fig, axes = plt.subplots(1, len(seq_lens), figsize=(4.2 * len(seq_lens), 3.8), sharey=True, squeeze=False)
    for ax, T in zip(axes[0], seq_lens):
        for label in labels:
            for split, style in (("contiguous", "o-"), ("balanced", "s--")):
                # rank 0 of each split (P = 1 is the one-device call, efficiency 1)
                pts = sorted((r[2], r[6]) for r in rows if r[0] == T and r[1] == label and r[4] == 0
                             and (r[3] == split or r[2] == 1))
                if len(pts) > 1:
                    ax.plot(*zip(*pts), style, label=f"{label}, {split}")
        ax.set_xscale("log", base=2)
        ax.set_xticks([1, 2, 4, 8], ["1", "2", "4", "8"])
        ax.set_title(f"{T // 1024}K tokens a rank", fontsize=9)
        ax.set_xlabel("P (ranks)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("one device's time / the rank's (fwd+bwd, graph)")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", nargs="+", metavar="LABEL=BENCH", help="bench_lasp2 binaries to run, alternating")
    src.add_argument("--from-log", nargs="+", metavar="LOG", help="logs of earlier runs")
    ap.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 16384, 65536])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--shape", nargs=5, default=["16", "128", "1", "bf16", "gate"],
                    metavar=("H", "D", "B", "DTYPE", "DECAY"))
    ap.add_argument("--log", help="with --run: also write the raw output here")
    ap.add_argument("--png", help="write the plot here")
    ap.add_argument("--title", default="one LASP-2 rank beside one device (bench_lasp2 ... sp, communication free)")
    args = ap.parse_args()
    if args.run:
        binaries = [tuple(b.split("=", 1)) for b in args.run]
        lines = run_benches(binaries, args.seq_lens, args.rounds, args.shape)
        if args.log:
            with open(args.log, "w") as f:
                f.write("\n".join(lines) + "\n")
    else:
        lines = []
        for path in args.from_log:
            with open(path) as f:
                lines.extend(f.read().splitlines())
    rows = table(parse(lines))
    if args.png:
        plot(rows, args.png, args.title)


if __name__ == "__main__":
    main()
