#!/usr/bin/env bash
# Session 16, fwdcopy: LASP2_CUDA_FWD_COPY=1 (tc_fwd_kernel VAR 3: the next chunk's tile copies
# spread over the chunk's body), =2 (VAR 4: VAR 3 + per-chunk advanced copy addresses) and =3
# (VAR 5: VAR 4 + output tile stored through shared memory) against the default (VAR 2). Run from the repo root on the
# device with the merged tree's binaries in .carry/bin/. Prints a compact summary (< 90 s);
# the raw outputs go to $OUT/fwdcopy.log (one file).
#   1. GoogleTest CudaFwdKernel.CopySpreadSameBits (knob off vs on: o, dq, q.dq bit for bit)
#   2. ncu gpu__time_duration of both tc_fwd_kernel launches (MODE 0 = output, MODE 1 = dq) of
#      `bench_lasp2 T 16 128 1 bf16 MODE once`, LASP2_CUDA_FWD_COPY = 0 / 1 / 2 / 3 alternating
#   3. `bench_lasp2 65536 16 128 1 bf16 fixed fb` 0 / 1 / 2 / 3 twice (fwd+bwd (graph) line)
# Steps that would start past 75 s are skipped (printed as such).
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/fc
LOG=$OUT/fwdcopy.log; : > "$LOG"
BIN=.carry/bin
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
late() { [ "$(el)" -gt 75 ] && { echo "[$(el)s] SKIPPED (time): $*"; return 0; }; return 1; }

echo "== equality tests (knob 0 vs 1, 2, 3, bitwise) =="
timeout 40 $BIN/lasp2_core_tests --gtest_filter='CudaFwdKernel.CopySpreadSameBits' \
  > /tmp/fc/test.log 2>&1
echo "rc=$? $(grep -E '^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED  \]' /tmp/fc/test.log | tr '\n' ' ')"
grep -E "differs|Failure" /tmp/fc/test.log | head -6
cat /tmp/fc/test.log >> "$LOG"

# one ncu run: knob T mode -> "MODE0_us MODE1_us"
kt() {
  LASP2_CUDA_FWD_COPY=$1 timeout 15 $NCU --clock-control none --print-units base --csv -k regex:tc_fwd_kernel -c 2 \
    --metrics gpu__time_duration.sum $BIN/bench_lasp2 $2 16 128 1 bf16 $3 once > /tmp/fc/ncu.csv 2>&1
  { echo "--- knob=$1 T=$2 $3"; grep tc_fwd_kernel /tmp/fc/ncu.csv; } >> "$LOG"
  python3 - /tmp/fc/ncu.csv <<'PY'
import csv, re, sys
r, col = {}, None
for row in csv.reader(open(sys.argv[1])):
    if "Metric Name" in row and "Kernel Name" in row:
        col = {k: i for i, k in enumerate(row)}
        continue
    if col is None or len(row) < len(col) or row[col["Metric Name"]] != "gpu__time_duration.sum":
        continue
    m = re.search(r"tc_fwd_kernel<[^,]+, \(int\)(\d+), \(int\)(\d+), \(int\)(\d+)>", row[col["Kernel Name"]])
    if m:  # ns (--print-units base) -> us
        r.setdefault("M%s/V%s" % (m.group(2), m.group(3)), float(row[col["Metric Value"]].replace(",", "")) / 1e3)
print(" ".join("%s %.1f" % (k, v) for k, v in sorted(r.items())) or "no kernels (see log)")
PY
}
echo "== ncu tc_fwd_kernel us (M = mode 0 output / 1 dq; V = 2 default (knob 0), 3 spread (knob 1), 4 spread + incremental addresses (knob 2), 5 = 4 + staged stores (knob 3)) =="
nrun() { late "T=$1 $2 knob $3" && return; echo "[$(el)s] T=$1 $2 knob=$3: $(kt $3 $1 $2)"; }
fbrun() {
  late "fb knob $1" && return
  LASP2_CUDA_FWD_COPY=$1 timeout 15 $BIN/bench_lasp2 65536 16 128 1 bf16 fixed fb > /tmp/fc/fb.log 2>&1
  { echo "--- fb knob=$1"; cat /tmp/fc/fb.log; } >> "$LOG"
  echo "[$(el)s] fb knob=$1: $(grep -E '^lasp2_forward|^lasp2_backward|^fwd\+bwd \(graph\)' /tmp/fc/fb.log | awk '{printf "%s %s | ", $1, $(NF-4)}')"
}
# priority order (the time guard drops the tail): 64K fixed 0 1 2 3 0 1 2 3, fwd+bwd
# 0 1 2 3 0 1 2 3, 64K gate 0 1 2 3, 16K fixed 0 1 2 3, 16K gate 0 1 2 3, 64K gate again
for k in 0 1 2 3 0 1 2 3; do nrun 65536 fixed $k; done
echo "== fwd+bwd (graph) ms, bench_lasp2 65536 16 128 1 bf16 fixed fb =="
for k in 0 1 2 3 0 1 2 3; do fbrun $k; done
echo "== more ncu =="
for k in 0 1 2 3; do nrun 65536 gate $k; done
for k in 0 1 2 3; do nrun 16384 fixed $k; done
for k in 0 1 2 3; do nrun 16384 gate $k; done
for k in 0 1 2 3; do nrun 65536 gate $k; done
echo "[$(el)s] end"
