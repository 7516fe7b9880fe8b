"""Where a kernel's warp-stall samples lie in its source: an ncu source page (one row per
SASS instruction, absolute addresses) mapped onto a local -lineinfo cubin of the same
source and compiler, region by region.

    nvcc <the file's CMake flags> -lineinfo -arch=sm_90a -cubin FILE.cu -o k.cubin
    nvdisasm -gi -c k.cubin > k.sass
    ncu ... --page source --csv --print-source sass > k.src.csv   # on the device
    python3 benchmarks/kernel/ncu_sass_map.py k.sass k.src.csv MANGLED_NAME \
        --src tc_dkdv.cu --body 106 --regions regions.txt --top 30

The offset of a row is its address minus the kernel's first; the script checks that the
opcodes agree (a different build shows as mismatches). Each instruction is attributed to
its innermost inlining frame in --src at or below line --body (the kernel body: helpers
above it and in other files resolve to their call site), then to the first region of
--regions ("LO HI name" lines, source line ranges) that holds the line. Prints per region
the share of samples and of executed instructions with the top stall reasons, then the
top instructions with their inlining chains.
"""

import argparse
import collections
import csv
import re


def parse_sass(path, func):
    """offset -> (instruction text, [(file, line) innermost first])"""
    ins, infn, chain, fresh = {}, False, [], True
    for ln in open(path):
        if ln.startswith("//----") and ".text." in ln:
            infn = ln.split(".text.")[1].split()[0] == func
            continue
        if not infn:
            continue
        m = re.search(r'//## File "([^"]+)", line (\d+)', ln)
        if m:
            if fresh:
                chain, fresh = [], False
            chain.append((m.group(1).split("/")[-1], int(m.group(2))))
            continue
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?);", ln)
        if m:
            ins[int(m.group(1), 16)] = (" ".join(m.group(2).split()), list(chain))
            fresh = True
    return ins


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sass")
    ap.add_argument("csv")
    ap.add_argument("func", help="mangled kernel name as nvdisasm prints it")
    ap.add_argument("--src", required=True, help="the kernel's source file name")
    ap.add_argument("--body", type=int, default=1, help="first line of the kernel body")
    ap.add_argument("--regions")
    ap.add_argument("--top", type=int, default=30)
    a = ap.parse_args()
    regions = []
    if a.regions:
        for ln in open(a.regions):
            if ln.strip() and not ln.startswith("#"):
                lo, hi, name = ln.split(None, 2)
                regions.append((int(lo), int(hi), name.strip()))
    ins = parse_sass(a.sass, a.func)
    rows = [r for r in csv.reader(open(a.csv)) if r]
    hdr = next(r for r in rows if r[0] == "Address")
    data = [r for r in rows if r[0].startswith("0x")]
    idx = {k: i for i, k in enumerate(hdr)}
    stalls = [k for k in hdr if k.startswith("stall_") and "Not Issued" not in k]
    base = int(data[0][0], 16)

    def op(s):
        return re.sub(r"^@!?U?P\w+\s+", "", s).split()[0]

    def num(r, k):
        return int(r[idx[k]] or 0)

    mism = 0
    for r in data:
        off = int(r[0], 16) - base
        mism += off not in ins or op(ins[off][0]) != op(" ".join(r[1].split()))
    print(f"rows {len(data)} local {len(ins)} opcode mismatches {mism}")

    def site(ch):
        for f, line in ch:
            if f == a.src and line >= a.body:
                return line
        return 0

    def region(line):
        for lo, hi, n in regions:
            if lo <= line <= hi:
                return n
        return f"line {line}"

    reg = collections.defaultdict(collections.Counter)
    for r in data:
        off = int(r[0], 16) - base
        if off not in ins:
            continue
        c = reg[region(site(ins[off][1]))]
        c["samples"] += num(r, "Warp Stall Sampling (All Samples)")
        c["executed"] += num(r, "Instructions Executed")
        for s in stalls:
            c[s] += num(r, s)
    tot = max(1, sum(c["samples"] for c in reg.values()))
    ex = max(1, sum(c["executed"] for c in reg.values()))
    print(f"{'region':44s} {'samples':>8s} {'%':>5s} {'exec%':>6s}  top stalls")
    for name, c in sorted(reg.items(), key=lambda kv: -kv[1]["samples"]):
        top = sorted(stalls, key=lambda s: -c[s])[:4]
        print(f"{name[:44]:44s} {c['samples']:8d} {100 * c['samples'] / tot:5.1f} {100 * c['executed'] / ex:6.1f}  "
              + " ".join(f"{s[6:]}={100 * c[s] / max(c['samples'], 1):.0f}%" for s in top))
    print("\ntop instructions (offset, samples, main stall, inlining chain):")
    for r in sorted(data, key=lambda r: -num(r, "Warp Stall Sampling (All Samples)"))[: a.top]:
        off = int(r[0], 16) - base
        t, ch = ins.get(off, ("?", []))
        b = max(stalls, key=lambda s: num(r, s))
        print(f"{off:05x} {num(r, 'Warp Stall Sampling (All Samples)'):6d} {b[6:]:10s} {t[:44]:44s} "
              + " <- ".join(f"{f.split('.')[0]}:{line}" for f, line in ch))


if __name__ == "__main__":
    main()
