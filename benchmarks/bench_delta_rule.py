"""Kernel benchmark of one gated DeltaNet (GDN) or KDA layer on one GPU.

    python benchmarks/bench_delta_rule.py [--seq-lens 8192 ... 262144] [--heads 16] [--dim 128]
        [--out DIR] [--fla-budget-s 120] [--row-budget-s 20] [--warm-fla] [--providers lasp2 fla]
        [--profile-len 65536] [--family gdn|kda]

`--family kda`: lasp2.kda beside fla's chunk_kda, log gates per key dim (their bytes
count in the floor); writes bench_kda.json / .png.

lasp2.gated_delta_rule (the CUDA backend of csrc/core/delta_rule/cuda) side by side
with flash-linear-attention's chunk_gated_delta_rule when importable, in the same
run: fwd, bwd (the backward alone: fwd+bwd minus fwd) and fwd+bwd, B = 1, bf16 q, k,
v (k l2-normalized), fp32 log gates and betas. Each time is also given as a multiple
of the memory floor: the bytes of q, k, v, g, beta, o (forward) and of those plus dO,
dq, dk, dv, dg, dbeta (backward) at 4.2 TB/s.

fla's Triton kernels compile and autotune on their first call (minutes on a fresh
machine; the autotune keys hold no sequence length, so one warm-up serves every T):
the run warms fla up once at the first length, then times each row within
--row-budget-s, and stops timing fla after --fla-budget-s. Where fla refuses a pass
(its gated backward on some Triton versions, fla issue #640) the refusal is tried
once, printed, written into the table, and the passes that run are timed.
`--warm-fla` only compiles and autotunes fla (Triton's cache keeps both across
processes), e.g. in the background while lasp2 builds. Prints a table, writes a JSON
file and a PNG.

`--profile-len T` then runs lasp2's forward and one forward + backward at T under
torch.profiler: it prints the launches (kernels and copies, with their device time)
and the op's time next to the sum of its launches, i.e. what the op costs beyond its
kernels (its checks, allocations and host work before the first kernel). Writes
profile_T.txt.
"""

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

import cuda_timing  # this folder (the script's own directory is on sys.path)

FLOOR_BYTES_PER_S = 4.2e12


def median_ms(fn, budget_s=3.0):
    """The shared timer with this benchmark's budget: one warm-up, up to 5 calls."""
    return cuda_timing.median_ms(fn, warmup=1, reps=5, budget_ms=1000.0 * budget_s)


def make_inputs(T, H, D, seed=0, family="gdn"):
    """KDA's log gates are per key dim ([1, T, H, D]), GDN's per head ([1, T, H])."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=gen)
    q = rnd(1, T, H, D).bfloat16()
    k = F.normalize(rnd(1, T, H, D), dim=-1).bfloat16()
    v = rnd(1, T, H, D).bfloat16()
    gate_shape = (1, T, H, D) if family == "kda" else (1, T, H)
    g = F.logsigmoid(rnd(*gate_shape) + 4.0)  # fp32 log gates, mostly near 0 as in trained layers
    beta = torch.sigmoid(rnd(1, T, H))
    do = rnd(1, T, H, D).bfloat16()
    return q, k, v, g, beta, do


def out_stem(family):
    """The JSON / PNG name: bench_delta_rule for GDN (as before --family), bench_kda."""
    return "bench_delta_rule" if family == "gdn" else f"bench_{family}"


def floor_ms(T, H, D, pass_, family="gdn"):
    tok = T * H
    gate = tok * 4 * (D if family == "kda" else 1)  # fp32 log gates
    fwd = tok * D * 2 * 4 + gate + tok * 4  # q, k, v, o (bf16); g, beta (fp32)
    bwd = tok * D * 2 * 7 + 2 * gate + tok * 4 * 2  # q, k, v, dO in; dq, dk, dv out; g, beta in, dg, dbeta out
    nbytes = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd + bwd}[pass_]
    return nbytes / FLOOR_BYTES_PER_S * 1e3


def providers(with_lasp2=True, with_fla=True, family="gdn"):
    out = {}
    if with_lasp2:  # imported here: --warm-fla runs while lasp2 may still be building
        import lasp2

        op = lasp2.kda if family == "kda" else lasp2.gated_delta_rule
        out["lasp2"] = lambda q, k, v, g, beta: op(q, k, v, g, beta)[0]
    if not with_fla:
        return out
    try:
        if family == "kda":
            from fla.ops.kda import chunk_kda as fla_op
        else:
            from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_op

        out["fla"] = lambda q, k, v, g, beta: fla_op(q, k, v, g, beta.to(q.dtype))[0]
    except Exception as exc:  # fla is optional: carried to the device as a wheel
        print(f"# flash-linear-attention not available ({type(exc).__name__}: {exc})")
    return out


def time_passes(fn, q, k, v, g, beta, do, with_bwd=True, budget_s=3.0):
    """{fwd, bwd, fwd+bwd} in ms (fwd alone when not with_bwd)."""
    res = {}
    with torch.no_grad():
        res["fwd"] = median_ms(lambda: fn(q, k, v, g, beta), budget_s / 2)
    if not with_bwd:
        return res
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]

    def step():
        o = fn(*leaves)
        torch.autograd.grad(o, leaves, do)

    res["fwd+bwd"] = median_ms(step, budget_s / 2)
    res["bwd"] = res["fwd+bwd"] - res["fwd"]
    return res


def refusal(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def warm_fla(fns, T, H, D, family):
    """Compiles and autotunes fla at length T (forward, then one backward try). Returns
    the backward's refusal, or None when it runs."""
    fn = fns["fla"]
    q, k, v, g, beta, do = make_inputs(T, H, D, family=family)
    with torch.no_grad():
        fn(q, k, v, g, beta)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]
    try:
        torch.autograd.grad(fn(*leaves), leaves, do)
    except Exception as exc:  # noqa: BLE001 - fla's own refusal, reported
        return refusal(exc)
    finally:
        torch.cuda.synchronize()
    return None


def check_close(fns, q, k, v, g, beta):
    """Relative max difference of lasp2's output against fla's (both bf16)."""
    if "fla" not in fns or "lasp2" not in fns:
        return None
    with torch.no_grad():
        a, b = fns["lasp2"](q, k, v, g, beta).float(), fns["fla"](q, k, v, g, beta).float()
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[8192, 16384, 32768, 65536, 131072, 262144])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--fla-budget-s", type=float, default=120.0,
                        help="stop timing fla after this long (its warm-up included)")
    parser.add_argument("--row-budget-s", type=float, default=20.0, help="time budget of one provider at one T")
    parser.add_argument("--warm-fla", action="store_true", help="only compile and autotune fla, then exit")
    parser.add_argument("--providers", nargs="+", default=["lasp2", "fla"], choices=["lasp2", "fla"])
    parser.add_argument("--family", default="gdn", choices=["gdn", "kda"],
                        help="gated DeltaNet (fla: chunk_gated_delta_rule) or KDA (fla: chunk_kda)")
    parser.add_argument("--profile-len", type=int, default=0,
                        help="also profile lasp2's forward and forward + backward at this T (0: no)")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    fns = providers(with_lasp2=not args.warm_fla and "lasp2" in args.providers,
                    with_fla=args.warm_fla or "fla" in args.providers, family=args.family)
    H, D, fam = args.heads, args.dim, args.family
    t0 = time.time()
    fla_bwd_refused = warm_fla(fns, args.seq_lens[0], H, D, fam) if "fla" in fns else None
    fla_spent = time.time() - t0
    if "fla" in fns:
        print(f"# fla warm-up (compile + autotune at T={args.seq_lens[0]}): {fla_spent:.0f} s")
        if fla_bwd_refused:
            print(f"# fla backward refused: {fla_bwd_refused}")
    if args.warm_fla:
        return
    print(f"# {fam.upper()}, B=1, H={H}, D={D}, bf16 q/k/v, fp32 g/beta on {torch.cuda.get_device_name()}")
    rows, skipped = [], {}
    for T in args.seq_lens:
        inputs = make_inputs(T, H, D, family=fam)
        for name, fn in fns.items():
            if name == "fla" and fla_spent > args.fla_budget_s:
                skipped.setdefault("fla", f"rows from T={T} on: the fla budget of {args.fla_budget_s:.0f} s is spent")
                continue
            t1 = time.time()
            with_bwd = not (name == "fla" and fla_bwd_refused)
            try:
                res = time_passes(fn, *inputs, with_bwd=with_bwd, budget_s=args.row_budget_s / 2)
            except Exception as exc:  # noqa: BLE001 - report and go on
                skipped[f"{name} T={T}"] = refusal(exc)
                res = {}
            if name == "fla":
                fla_spent += time.time() - t1
            for pass_, ms in res.items():
                rows.append({"provider": name, "T": T, "pass": pass_, "ms": ms,
                             "x_floor": ms / floor_ms(T, H, D, pass_, fam)})
            torch.cuda.synchronize()
        if T == args.seq_lens[0]:
            diff = check_close(fns, *inputs[:5])
            if diff is not None:
                print(f"# lasp2 vs fla output at T={T}: max |diff| / max |fla| = {diff:.2e}")
        del inputs
        torch.cuda.empty_cache()
    for name, reason in skipped.items():
        print(f"# {name} skipped: {reason}")
    print(f"# total {time.time() - t0:.0f} s")
    with open(os.path.join(args.out, f"{out_stem(fam)}.json"), "w") as f:
        json.dump({"family": fam, "H": H, "D": D, "rows": rows, "fla_bwd_refused": fla_bwd_refused}, f, indent=1)
    report(rows, args, H, D, fla_bwd_refused)
    if args.profile_len and "lasp2" in fns:
        profile(fns["lasp2"], args.profile_len, H, D, args.out, fam)


def profile(fn, T, H, D, out_dir, family="gdn"):
    """lasp2's forward, then one forward + backward at T under torch.profiler: the
    launches, and the op's time (CUDA events, median of 5) beside the sum of its
    launches' device time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    q, k, v, g, beta, do = make_inputs(T, H, D, family=family)
    leaves = [x.detach().requires_grad_() for x in (q, k, v, g, beta)]

    def fwd():
        with torch.no_grad():
            fn(q, k, v, g, beta)

    def fwd_bwd():
        torch.autograd.grad(fn(*leaves), leaves, do)

    lines = []
    for name, step in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        op_ms = median_ms(step, budget_s=5.0)
        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        launches = sum(e.count for e in events)
        kernels_ms = sum(e.self_device_time_total for e in events) / 1e3
        lines.append(f"# T={T} {name}: op {op_ms:.3f} ms, its {launches} launches {kernels_ms:.3f} ms of device "
                     f"time, {op_ms - kernels_ms:.3f} ms beyond them")
        lines.append(prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70))
    text = "\n".join(lines)
    print(text)
    with open(os.path.join(out_dir, f"profile_{T}.txt"), "w") as f:
        f.write(text + "\n")


def report(rows, args, H, D, fla_bwd_refused=None):
    def get(name, T, pass_):
        for r in rows:
            if r["provider"] == name and r["T"] == T and r["pass"] == pass_:
                return r
        return None

    def fmt(r, key="ms", spec="{:8.2f}"):
        return spec.format(r[key]) if r is not None else f"{'-':>8}"

    fam = args.family.upper()
    print(f"{fam} H={H} D={D} bf16 B=1 (ms; xfl = x memory floor at 4.2 TB/s; fla/us = fla / lasp2)")
    print(f"{'T':>7} | {'pass':>7} | {'lasp2':>8} {'xfl':>6} | {'fla':>8} {'xfl':>6} | {'fla/us':>6}")
    for T in args.seq_lens:
        for pass_ in ("fwd", "bwd", "fwd+bwd"):
            a, b = get("lasp2", T, pass_), get("fla", T, pass_)
            ratio = f"{b['ms'] / a['ms']:6.2f}" if a and b and a["ms"] > 0 else f"{'-':>6}"
            fla_cell = f"{fmt(b)} {fmt(b, 'x_floor', '{:6.1f}')}"
            if b is None and pass_ != "fwd" and fla_bwd_refused:
                fla_cell = f"{'refused':>15}"
            print(f"{T:>7} | {pass_:>7} | {fmt(a)} {fmt(a, 'x_floor', '{:6.1f}')} | {fla_cell} | {ratio}")
    if fla_bwd_refused:
        print(f"refused: fla's backward on this Triton ({fla_bwd_refused}; fla issue #640)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib missing: no plot")
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4), sharey=False)
    for ax, pass_ in zip(axes, ("fwd", "bwd", "fwd+bwd")):
        for name, style in (("lasp2", "o-"), ("fla", "s--")):
            pts = [(T, get(name, T, pass_)["ms"]) for T in args.seq_lens if get(name, T, pass_)]
            if pts:
                ax.plot(*zip(*pts), style, label=name)
        floor = [floor_ms(T, H, D, pass_, args.family) for T in args.seq_lens]
        ax.plot(args.seq_lens, floor, ":", color="gray", label="memory floor")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        title = f"{fam} {pass_}, H={H}, D={D}, bf16"
        if pass_ != "fwd" and fla_bwd_refused:
            title += "\n(fla backward refused on this Triton, fla #640)"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("T (tokens, B=1)")
        ax.set_ylabel("ms")
        ax.legend()
    fig.tight_layout()
    path = os.path.join(args.out, f"{out_stem(args.family)}.png")
    fig.savefig(path, dpi=110)
    print(f"# plot: {path}")


if __name__ == "__main__":
    main()
