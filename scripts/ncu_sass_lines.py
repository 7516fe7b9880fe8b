"""Warp-stall samples of an ncu source page by source line (with the inlining chain).

    nvcc <the CMake flags> -arch=sm_90a -cubin -lineinfo FILE.cu -o k.cubin
    nvdisasm -gi -c k.cubin > k.sass          # line info with "inlined at" chains
    ncu -i REPORT --page source --csv --print-source sass > k.src.csv
    python3 scripts/ncu_sass_lines.py k.sass KERNEL_SUBSTRING k.src.csv [INDEX] [lines|dump] [N]

The profile's addresses minus the kernel's first address are offsets into the local cubin
when it was built from the same source with the same compiler and flags; the script checks
that the opcodes agree (prints the mismatch count: 0 = aligned). INDEX picks the kernel in
a file holding several ("Kernel Name" blocks, from 0). `lines` (default): the N (40) source
chains with the most samples and their top stall reasons; `dump`: every instruction with
offset, samples, text, chain and its two largest stall reasons. (Session 16: the output /
dq passes' copy stalls, .carry/fwdcopy/AB.md.)
"""
import collections
import csv
import re
import sys


def sass_lines(path, kernel):
    """offset -> (instruction text, [(file, line), ...] innermost first) for one kernel."""
    out, cur, chain, pending = {}, False, [], []
    for ln in open(path):
        if ln.startswith("_Z") and ln.rstrip().endswith(":"):
            cur, chain, pending = kernel in ln, [], []
            continue
        if not cur:
            continue
        if ln.startswith("\t.section"):
            cur = False
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', ln)
        if m:
            pending.append((m.group(1).split("/")[-1], int(m.group(2))))
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", ln)
        if m:
            if pending:
                chain, pending = pending, []
            out[int(m.group(1), 16)] = (m.group(2), chain)
    return out


def profile_blocks(path):
    blocks, hdr = [], None
    for r in csv.reader(open(path)):
        if r and r[0] == "Kernel Name":
            blocks.append([])
        elif r and r[0] == "Address":
            hdr = r
        elif blocks and r:
            blocks[-1].append(r)
    return hdr, blocks


def opcode(text):
    t = text.split()
    if t and t[0].startswith("@"):
        t = t[1:]
    return t[0].split(".")[0] if t else ""


def main(sass, kernel, src, index=0, mode="lines", n=40):
    ins = sass_lines(sass, kernel)
    hdr, blocks = profile_blocks(src)
    idx = {k: i for i, k in enumerate(hdr)}
    stalls = [k for k in hdr if k.startswith("stall_") and "Not Issued" not in k]
    samples = "Warp Stall Sampling (All Samples)"
    rows = blocks[index]
    base = int(rows[0][0], 16)
    total, bad, agg, dump = 0, 0, collections.defaultdict(collections.Counter), []
    for r in rows:
        off = int(r[0], 16) - base
        text, chain = ins.get(off, ("?", []))
        bad += opcode(r[1]) != opcode(text)
        cnt = int(r[idx[samples]] or 0)
        total += cnt
        key = " < ".join("%s:%d" % fl for fl in chain)
        st = {s[6:]: int(r[idx[s]] or 0) for s in stalls}
        agg[key]["n"] += cnt
        agg[key].update(st)
        dump.append((off, cnt, r[1].strip(), key, st))
    print("kernel %d: %d profiled instructions, %d local, %d opcode mismatches, %d samples"
          % (index, len(rows), len(ins), bad, total))
    if mode == "dump":
        for off, cnt, text, key, st in dump:
            top = sorted(((v, s) for s, v in st.items() if v), reverse=True)[:2]
            print("%05x %5d %-58s %-60s %s" % (off, cnt, text[:58], key[-60:], " ".join("%s=%d" % (s, v) for v, s in top)))
        return
    for key, c in sorted(agg.items(), key=lambda kv: -kv[1]["n"])[:n]:
        top = sorted(((v, s) for s, v in c.items() if s != "n" and v), reverse=True)[:3]
        print("%6d %5.1f%%  %s  %s" % (c["n"], 100.0 * c["n"] / max(total, 1), key[:110],
                                        " ".join("%s=%d" % (s, v) for v, s in top)))


if __name__ == "__main__":
    a = sys.argv[1:]
    if len(a) < 3:
        sys.exit(__doc__)
    main(a[0], a[1], a[2], int(a[3]) if len(a) > 3 else 0, a[4] if len(a) > 4 else "lines",
         int(a[5]) if len(a) > 5 else 40)
