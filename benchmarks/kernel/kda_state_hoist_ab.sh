#!/bin/bash
# KDA's tensor-map state passes, tma against tmahoist (LASP2_DELTA_KDA_STATE_KERNEL; the
# token product's u / r values and diag(eL) of the state formed before the first product,
# GDN's fifteenth-round move; bit-identical outputs), plus the GDN state passes in their
# new (hoisted) order against w8, the part summary included (docs/delta_rule.md, "State
# passes, fifteenth round"). Under 60 s; BIN: a lasp2_core_tests built for the device
# (.carry/bin/lasp2_core_tests); prints the summary, writes $OUT/summary.txt, $OUT/log.txt.
set -u
B=${BIN:-.carry/bin/lasp2_core_tests}
O=${OUT:-/tmp/out}; mkdir -p "$O"
S="$O/summary.txt"; L="$O/log.txt"; : > "$S"; : > "$L"
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$S"; }
el() { echo $(( $(date +%s) - T0 )); }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$S"
# 1. timing, the GPU to itself: KDA at 64K (alternating, median of 5 after a warm-up; then
#    tma's and tmahoist's outputs against the tile kernels' bit for bit at 64K)
LASP2_DELTA_TIMING_T=65536 LASP2_STATE_TIMING_REPS=5 LASP2_KDA_STATE_TIMING_VARIANTS="tma tmahoist tma tmahoist" \
  timeout 22 $B --gtest_filter='DeltaCudaKdaStateTiming.*' > "$O/.t" 2>&1
say "KDA timing T=65536 rc=$? $(grep -cE '^\[  PASSED  \] 1 test' "$O/.t") passed"; cat "$O/.t" >> "$L"
grep "timing \]" "$O/.t" | sed 's/.*state kernel //' | tee -a "$S"
grep -E "vs tile|Failure" "$O/.t" | head -4 | tee -a "$S"
# GDN: the tma passes in the hoisted order (the summary too) against w8 at 64K
LASP2_DELTA_TIMING_T=65536 LASP2_STATE_TIMING_REPS=6 LASP2_STATE_TIMING_VARIANTS="tma w8 tma" \
  timeout 14 $B --gtest_filter='DeltaCudaStateTiming.*' > "$O/.t" 2>&1
say "GDN timing T=65536 rc=$?"; cat "$O/.t" >> "$L"
grep "timing \]" "$O/.t" | sed 's/.*bf16, //' | tee -a "$S"
if [ "$(el)" -lt 30 ]; then  # KDA at 16K while there is time
  LASP2_DELTA_TIMING_T=16384 LASP2_STATE_TIMING_REPS=5 LASP2_KDA_STATE_TIMING_VARIANTS="tma tmahoist tma tmahoist" \
    timeout 10 $B --gtest_filter='DeltaCudaKdaStateTiming.*' > "$O/.t" 2>&1
  say "KDA timing T=16384 rc=$?"; cat "$O/.t" >> "$L"
  grep "timing \]" "$O/.t" | sed 's/.*state kernel //' | tee -a "$S"
fi
rm -f "$O/.t"
# 2. correctness, two processes: KDA tma / tmahoist against the tile kernels through the
#    backend (bit for bit) with GDN's state-pass equalities (tma vs w8); the chunked KDA
#    cases with tmahoist as the state kernel against the recurrent kernels and the CPU
TL=$(( 56 - $(el) )); [ $TL -gt 25 ] && TL=25; [ $TL -lt 5 ] && TL=5
( timeout $TL $B --gtest_filter='*DeltaCudaKdaStateTma*:DeltaCudaStatePasses.*' > "$O/.g1" 2>&1; echo "rc $?" >> "$O/.g1" ) &
( LASP2_DELTA_KDA_STATE_KERNEL=tmahoist timeout $TL $B \
    --gtest_filter='*DeltaCudaKdaChunked*:*DeltaCudaKdaBackward*' > "$O/.g2" 2>&1; echo "rc $?" >> "$O/.g2" ) &
wait
cat "$O/.g1" "$O/.g2" >> "$L"
for f in "bit equality (KDA vs tile, GDN tma vs w8):.g1" "chunked KDA with tmahoist:.g2"; do
  g="$O/${f##*:}"
  say "${f%%:*}: $(grep -E '^\[  PASSED  \]|^\[  (FAILED  |SKIPPED )\] [0-9]+ test|^rc ' "$g" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]' "$g" | sort -u | head -6 | tee -a "$S"
done
rm -f "$O/.g1" "$O/.g2"
say "done"
