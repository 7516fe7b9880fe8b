"""The table and PNG of a `knob_ab.sh` log: run-time configurations side by side per shape.

`benchmarks/kernel/knob_ab.sh "" "NAME=value" ...` runs `bench_lasp2 ... fb` for each
configuration, alternating, ROUNDS times per shape, one line per run. This script reads such
a log and prints, per shape and configuration, the median over the rounds of the forward and
of fwd + bwd replayed from a CUDA graph, with each configuration's ratio to the first one
(the defaults when the first argument was ""), then plots those ratios.

    SHAPES="65536,16,128,1,bf16,gate 4096,16,128,8,bf16,gate" ROUNDS=3 \\
        bash benchmarks/kernel/knob_ab.sh "" "LASP2_CUDA_FWD_KERNEL=v10" | tee ab.log
    python3 benchmarks/kernel/knob_ab_plot.py ab.log --png ab.png
"""

import argparse
import re
import statistics
from collections import defaultdict

# "65536 16 128 1 bf16 gate r2 [default]: lasp2_forward 0.461 ms (1.28x) | lasp2_forward (graph) ..."
LINE = re.compile(r"^(\d+) (\d+) (\d+) (\d+) (\w+) (\w+) r\d+ \[(.*)\]: (.*)$")
FIELD = re.compile(r"([^|]+?) ([\d.]+) ms \(([\d.]+)x\)")
COLUMNS = ("lasp2_forward (graph)", "fwd+bwd (graph)")


def parse(lines):
    """({(shape, config): {column: [ms, one per round]}}, shapes in order, configs in order)"""
    runs = defaultdict(lambda: defaultdict(list))
    shapes, configs = [], []
    for line in lines:
        m = LINE.match(line.strip())
        if not m:
            continue
        T, H, D, B, _, mode = m.groups()[:6]
        shape = f"T={int(T) // 1024}K B={B} {mode}" + ("" if (H, D) == ("16", "128") else f" H={H} D={D}")
        config = m.group(7)
        if shape not in shapes:
            shapes.append(shape)
        if config not in configs:
            configs.append(config)
        for name, ms, _ in FIELD.findall(m.group(8)):
            runs[(shape, config)][name.strip()].append(float(ms))
    return runs, shapes, configs


def medians(runs, shapes, configs):
    """[(shape, config, {column: median ms}, rounds)]"""
    out = []
    for shape in shapes:
        for config in configs:
            cols = runs.get((shape, config))
            if cols:
                out.append((shape, config, {c: statistics.median(v) for c, v in cols.items()},
                            max(len(v) for v in cols.values())))
    return out


def print_table(rows, configs):
    base = {shape: cols for shape, config, cols, _ in rows if config == configs[0]}
    print(f"{'shape':<22} {'configuration':<28} {'fwd (graph) ms':>15} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6} {'runs':>5}")
    for shape, config, cols, n in rows:
        cells = []
        for c in COLUMNS:
            ms = cols.get(c, float("nan"))
            ref = base.get(shape, {}).get(c, float("nan"))
            cells.append(f"{ms:>{15 if c == COLUMNS[0] else 11}.3f} {ms / ref:>6.3f}")
        print(f"{shape:<22} {config:<28} {cells[0]} {cells[1]} {n:>5}")


def plot(rows, shapes, configs, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = {shape: cols for shape, config, cols, _ in rows if config == configs[0]}
    fig, axes = plt.subplots(1, len(COLUMNS), figsize=(5 + 1.6 * len(shapes), 4), sharey=True)
    width = 0.8 / max(1, len(configs))
    for ax, col in zip(axes, COLUMNS):
        for j, config in enumerate(configs):
            ratios = []
            for shape in shapes:
                cols = next((c for s, k, c, _ in rows if s == shape and k == config), {})
                ratios.append(cols.get(col, float("nan")) / base.get(shape, {}).get(col, float("nan")))
            ax.bar([i + j * width for i in range(len(shapes))], ratios, width, label=config)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([i + width * (len(configs) - 1) / 2 for i in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=20, fontsize=8)
        ax.set_title(f"{col}, median ms / {configs[0]}")
    axes[0].set_ylabel("time / first configuration (lower is faster)")
    axes[0].legend(fontsize=8)
    lo = min(r for r in (p.get_height() for ax in axes for p in ax.patches) if r == r)
    axes[0].set_ylim(min(0.9, lo - 0.02), None)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    print(f"wrote {png}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", help="output of benchmarks/kernel/knob_ab.sh")
    ap.add_argument("--png", help="where to write the plot")
    args = ap.parse_args()
    with open(args.log) as f:
        runs, shapes, configs = parse(f.readlines())
    if not runs:
        raise SystemExit(f"{args.log}: no knob_ab.sh lines")
    rows = medians(runs, shapes, configs)
    print_table(rows, configs)
    if args.png:
        plot(rows, shapes, configs, args.png)


if __name__ == "__main__":
    main()
