#!/usr/bin/env bash
# Session 21: programmatic dependent launch of the scalar family's kernels
# (LASP2_CUDA_PDL=1, csrc/core/cuda/pdl.cuh) against the default launches. Run from the repo
# root on the device with the tree's binaries in .carry/bin/ (benchmarks/kernel/build_carry.sh).
# Prints a compact summary (< 100 s); the raw outputs go to $OUT/pdl.log (one file).
#   1. GoogleTests CudaLasp2Pdl.* (knob on vs unset: every output and gradient bit for bit,
#      eagerly, from a graph, on 2 ranks; on sm_90 the knob must have set the attribute)
#   2. `bench_lasp2 T 16 128 B bf16 MODE fb` knob unset / 1 alternating, twice each: the
#      lasp2_forward, lasp2_backward (eager) and fwd+bwd (graph) lines, at 64K gate and fixed
#      and at 4K x B = 8 gate (short kernels: the gaps weigh most there)
# Steps that would start past 88 s are skipped (printed as such).
set -u
T0=$(date +%s)
el() { echo $(( $(date +%s) - T0 )); }
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT" /tmp/pdl_ab
LOG=$OUT/pdl.log; : > "$LOG"
BIN=.carry/bin
late() { [ "$(el)" -gt 88 ] && { echo "[$(el)s] SKIPPED (time): $*"; return 0; }; return 1; }

echo "== equality tests (LASP2_CUDA_PDL=1 vs unset, bitwise; and vs the recurrence) =="
timeout 60 $BIN/lasp2_core_tests --gtest_filter='CudaLasp2Pdl.*' > /tmp/pdl_ab/test.log 2>&1
echo "[$(el)s] rc=$? $(grep -E '^\[  (PASSED|FAILED) |^\[       OK|^\[  FAILED  \]|^\[  SKIPPED' /tmp/pdl_ab/test.log | tr '\n' ' ')"
grep -E "Failure|Expected|Which is" /tmp/pdl_ab/test.log | head -8
cat /tmp/pdl_ab/test.log >> "$LOG"

# one fb run: knob T B mode (knob: the value of LASP2_CUDA_PDL; empty = unset, the default)
fbrun() {
  late "fb T=$2 B=$3 $4 knob $1" && return
  LASP2_CUDA_PDL=$1 timeout 30 $BIN/bench_lasp2 "$2" 16 128 "$3" bf16 "$4" fb > /tmp/pdl_ab/fb.log 2>&1
  { echo "--- fb knob=$1 T=$2 B=$3 $4 rc=$?"; cat /tmp/pdl_ab/fb.log; } >> "$LOG"
  echo "[$(el)s] T=$2 B=$3 $4 pdl=${1:-unset}: $(grep -E '^lasp2_(forward|backward)|^fwd\+bwd \(graph\)' /tmp/pdl_ab/fb.log | tr -s ' ' | tr '\n' '|')"
}
echo "== bench_lasp2 ... bf16 MODE fb (knob unset / 1 alternating) =="
for k in "" 1 "" 1; do fbrun "$k" 65536 1 gate; done
for k in "" 1 "" 1; do fbrun "$k" 4096 8 gate; done
for k in "" 1 "" 1; do fbrun "$k" 65536 1 fixed; done
echo "[$(el)s] end"
