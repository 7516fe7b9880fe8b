#!/bin/bash
# The GDN chunk backward's A/B on one GPU (docs/history/delta-rule-log.md, "Chunk backward, twelfth
# round", "..., fourteenth round" and session 17): ordered (the default: early with the
# gate gradients' sums in per-lane slots, no atomics, and h read once) against early
# (its reference, LASP2_DELTA_CHUNK_BWD_KERNEL=early; lean, early's reference, runs in the
# correctness part), in one call of under 200 s. BIN:
# a lasp2_core_tests built for the device (benchmarks/kernel/build_carry.sh:
# .carry/bin/lasp2_core_tests); results under $OUT (summary.txt). Order: the 64K timing
# alone on the GPU (one process, the two alternating through
# LASP2_DELTA_TIMING_BWD_KERNELS), ncu at 16K of each, then the correctness runs in
# parallel: the delta GoogleTests with the default and the CUDA ones with early and with
# lean as the chunk backward (5 shards each), memcheck and racecheck (the chunk backward
# kernels) on EarlyEqualsLean (lean against ordered and early).
set -u
B=${BIN:-.carry/bin/lasp2_core_tests}
CS=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
O=${OUT:-/tmp/out}; mkdir -p "$O"
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$O/summary.txt"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader >> "$O/summary.txt" 2>&1
# 1. A/B at T = 64K in one process: early, ordered, three times (the chunk backward launch
#    alone and the one-device backward with the forward kept), plus the test's usual lines
LASP2_DELTA_TIMING_T=65536 LASP2_DELTA_TIMING_BWD_KERNELS="early ordered early ordered early ordered" timeout 70 \
  $B --gtest_filter='DeltaCudaTiming.GdnOneDevice' > "$O/timing64k.txt" 2>&1
say "timing 64K rc=$?"; grep "timing \]" "$O/timing64k.txt" >> "$O/summary.txt"
# 2. ncu at T = 16K, the first two chunk backward launches, early then ordered
for k in early ordered; do
  LASP2_DELTA_CHUNK_BWD_KERNEL=$k LASP2_DELTA_TIMING_T=16384 timeout 32 $NCU --clock-control none --section SpeedOfLight \
    --section WarpStateStats --section MemoryWorkloadAnalysis -k regex:chunk_bwd_kernel -c 2 \
    $B --gtest_filter='DeltaCudaTiming.GdnOneDevice' > "$O/ncu_$k.txt" 2>&1
  say "ncu $k rc=$?"
  grep -E "Duration|DRAM Throughput|Memory Throughput|Compute \(SM\)|L2 Cache Throughput|Warp Cycles Per Issued|Mem Busy|Max Bandwidth" "$O/ncu_$k.txt" | head -20 >> "$O/summary.txt"
done
# 3. correctness: the regression (default ordered) and the CUDA delta tests again with early
#    and with lean as the chunk backward (the float64 / CPU checks on them), 5 shards
#    each; memcheck and racecheck (the chunk backward kernels only) on EarlyEqualsLean
for i in 0 1 2 3 4; do
  ( GTEST_TOTAL_SHARDS=5 GTEST_SHARD_INDEX=$i timeout 55 $B --gtest_filter='*Delta*:-*Timing*' > "$O/gtest_default_$i.txt" 2>&1; echo "rc $?" >> "$O/gtest_default_$i.txt" ) &
  for k in early lean; do
    ( LASP2_DELTA_CHUNK_BWD_KERNEL=$k GTEST_TOTAL_SHARDS=5 GTEST_SHARD_INDEX=$i timeout 55 $B --gtest_filter='*DeltaCuda*:-*Timing*' > "$O/gtest_${k}_$i.txt" 2>&1; echo "rc $?" >> "$O/gtest_${k}_$i.txt" ) &
  done
done
( timeout 52 $CS --tool memcheck --kernel-name kns=chunk_bwd_kernel $B --gtest_filter='DeltaCudaChunkBackward.EarlyEqualsLean' > "$O/memcheck.txt" 2>&1; echo "rc $?" >> "$O/memcheck.txt" ) &
( timeout 52 $CS --tool racecheck --kernel-name kns=chunk_bwd_kernel $B \
    --gtest_filter='DeltaCudaChunkBackward.EarlyEqualsLean' > "$O/racecheck.txt" 2>&1; echo "rc $?" >> "$O/racecheck.txt" ) &
wait
for f in gtest_default gtest_early gtest_lean; do
  say "$f: passed $(cat "$O"/${f}_*.txt | grep -E '^\[  PASSED' | grep -oE '[0-9]+ test' | awk '{s+=$1} END {print s}'), failed lines $(cat "$O"/${f}_*.txt | grep -cE '^\[  FAILED  \]'), rcs $(grep -h '^rc ' "$O"/${f}_*.txt | tr '\n' ' ')"
  grep -hE "^\[  FAILED  \]" "$O"/${f}_*.txt | head -10 >> "$O/summary.txt"
done
say "memcheck: $(grep -E 'ERROR SUMMARY|PASSED|FAILED|^rc ' "$O/memcheck.txt" | tr '\n' ' ')"
say "racecheck: $(grep -hE 'RACECHECK SUMMARY|ERROR SUMMARY|PASSED|FAILED|^rc |rror' "$O"/racecheck.txt | head -5 | tr '\n' ' ')"
