#!/usr/bin/env bash
# Session 16: the default tile copies (sm_90: tensor-map copies issued by one thread,
# counted on per-stage mbarriers; tc_fwd_kernel VAR 6, tc_dkdv_kernel kTma) against
# LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernels, every thread copying: tc_fwd_kernel
# VAR 2, tc_dkdv_kernel !kTma). Run from the repo root on the device with the tree's
# binaries in .carry/bin/. Prints a compact summary (< 80 s); the raw outputs go to
# $OUT/fwdtma.log (one file).
#   1. GoogleTests CudaFwdKernel.TmaCopySameBits, CudaDkdvKernel.TmaCopySameBits (default vs
#      cp_async: o, dq, q.dq, dk, dv, dg bit for bit)
#   2. ncu gpu__time_duration of both tc_fwd_kernel launches (MODE 0 = output, MODE 1 = dq) of
#      `bench_lasp2 T 16 128 1 bf16 MODE once`, default / cp_async alternating
#   3. `bench_lasp2 65536 16 128 1 bf16 fixed fb` default / cp_async twice (fwd+bwd (graph)
#      line: both passes' copies)
# Steps that would start past 68 s are skipped (printed as such).
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/ft
LOG=$OUT/fwdtma.log; : > "$LOG"
BIN=.carry/bin
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
late() { [ "$(el)" -gt 68 ] && { echo "[$(el)s] SKIPPED (time): $*"; return 0; }; return 1; }

echo "== equality tests (default vs cp_async, bitwise; and vs the CPU backend) =="
timeout 45 $BIN/lasp2_core_tests --gtest_filter='CudaFwdKernel.TmaCopySameBits:CudaDkdvKernel.TmaCopySameBits' \
  > /tmp/ft/test.log 2>&1
echo "[$(el)s] rc=$? $(grep -E '^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED  \]|^\[  SKIPPED' /tmp/ft/test.log | tr '\n' ' ')"
grep -E "differs|Failure" /tmp/ft/test.log | head -6
cat /tmp/ft/test.log >> "$LOG"

# one ncu run: knob T mode -> "M0/V2 us M1/V2 us" (M = mode, V = kernel variant; V6 = tma)
# (knob: the value of LASP2_CUDA_TILE_COPY; empty = the default)
kt() {
  LASP2_CUDA_TILE_COPY=$1 timeout 30 $NCU --clock-control none --print-units base --csv -k regex:tc_fwd_kernel -c 2 \
    --metrics gpu__time_duration.sum $BIN/bench_lasp2 $2 16 128 1 bf16 $3 once > /tmp/ft/ncu.csv 2>&1
  { echo "--- knob=$1 T=$2 $3 rc=$?"; grep tc_fwd_kernel /tmp/ft/ncu.csv; } >> "$LOG"
  python3 - /tmp/ft/ncu.csv <<'PY'
import csv, re, sys
r, col = {}, None
for row in csv.reader(open(sys.argv[1], errors="replace")):
    if "Metric Name" in row and "Kernel Name" in row:
        col = {k: i for i, k in enumerate(row)}
        continue
    if col is None or len(row) < len(col) or row[col["Metric Name"]] != "gpu__time_duration.sum":
        continue
    # e.g. tc_fwd_kernel<__nv_bfloat16, 128, 0, 2> or ...<..., (int)0, (int)6, lasp2::...::FwdTmaArgs>
    m = re.search(r"tc_fwd_kernel<([^>]*)>", row[col["Kernel Name"]])
    if not m:
        continue
    a = [x.strip().replace("(int)", "") for x in m.group(1).split(",")]
    if len(a) >= 4:  # ns (--print-units base) -> us
        r.setdefault("M%s/V%s" % (a[2], a[3]), float(row[col["Metric Value"]].replace(",", "")) / 1e3)
print(" ".join("%s %.1f" % (k, v) for k, v in sorted(r.items())) or "no kernels (see log)")
PY
}
echo "== ncu tc_fwd_kernel us (M0 = output, M1 = dq; V6 = tma copies (default), V2 = cp_async) =="
nrun() { late "T=$1 $2 knob $3" && return; echo "[$(el)s] T=$1 $2 knob=${3:-default}: $(kt "$3" $1 $2)"; }
fbrun() {
  late "fb knob $1" && return
  LASP2_CUDA_TILE_COPY=$1 timeout 30 $BIN/bench_lasp2 65536 16 128 1 bf16 fixed fb > /tmp/ft/fb.log 2>&1
  { echo "--- fb knob=$1"; cat /tmp/ft/fb.log; } >> "$LOG"
  echo "[$(el)s] fb knob=${1:-default}: $(grep -E '^lasp2_forward|^fwd\+bwd \(graph\)' /tmp/ft/fb.log | tr -s ' ' | tr '\n' '|')"
}
# priority order (the time guard drops the tail)
for k in "" cp_async "" cp_async; do nrun 65536 fixed "$k"; done
echo "== fwd+bwd (graph), bench_lasp2 65536 16 128 1 bf16 fixed fb =="
for k in "" cp_async "" cp_async; do fbrun "$k"; done
echo "== more ncu =="
for k in "" cp_async; do nrun 65536 gate "$k"; done
for k in "" cp_async; do nrun 16384 fixed "$k"; done
echo "[$(el)s] end"
