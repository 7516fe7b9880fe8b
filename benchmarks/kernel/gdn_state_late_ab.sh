#!/bin/bash
# The GDN state passes' A/B on one GPU (docs/delta_rule.md, "State passes, fifteenth round"):
# tma (the default on sm_90) against the same kernels with their instructions in other
# orders, bit-identical outputs: tmalate (the ring's refill and the 16-bit state / dh
# stores after the first product's mma.sync instead of before it), tmahoist (the
# epilogue's decays and loads before the product), tmaboth; plus ncu counters of tma and
# tmaboth at T = 16K, which also decide the lookahead reformulation (shared-memory
# wavefronts and the stall reasons a chunk).
# Under 90 s; BIN: a lasp2_core_tests built for the device (.carry/bin/lasp2_core_tests);
# prints the summary and writes $OUT/summary.txt and $OUT/log.txt.
set -u
B=${BIN:-.carry/bin/lasp2_core_tests}
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
O=${OUT:-/tmp/out}; mkdir -p "$O"
S="$O/summary.txt"; L="$O/log.txt"; : > "$S"; : > "$L"
T0=$(date +%s); say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$S"; }
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader 2>&1 | tee -a "$S"
# 1. correctness: the bit-equality tests (the three orders against w8 / tma: state passes
#    alone, then forward + summary + backward through the backend with documents and -inf
#    gates), and the chunked GDN cases with tmaboth as the state kernel (against recurrent / CPU)
( timeout 22 $B --gtest_filter='DeltaCudaStatePasses.*' > "$O/.g1" 2>&1; echo "rc $?" >> "$O/.g1" ) &
( LASP2_DELTA_STATE_KERNEL=tmaboth timeout 22 $B \
    --gtest_filter='*DeltaCudaChunked*:*DeltaCudaDocStates*:-*Timing*' > "$O/.g2" 2>&1; echo "rc $?" >> "$O/.g2" ) &
wait
cat "$O/.g1" "$O/.g2" >> "$L"
for f in "StatePasses (bit equality):.g1" "chunked GDN with tmaboth:.g2"; do
  g="$O/${f##*:}"
  say "${f%%:*}: $(grep -E '^\[  PASSED  \]|^\[  (FAILED  |SKIPPED )\] [0-9]+ test|^rc ' "$g" | tr '\n' ' ')"
  grep -E '^\[  FAILED  \] [A-Za-z]' "$g" | sort -u | head -6 | tee -a "$S"
done
rm -f "$O/.g1" "$O/.g2"
# 2. A/B, alternating, one process each size (median of 5 launches after an untimed one)
for T in 65536 16384; do
  [ $T = 65536 ] && TL=20 || TL=10
  LASP2_DELTA_TIMING_T=$T LASP2_STATE_TIMING_REPS=6 LASP2_STATE_TIMING_VARIANTS="tma tmalate tmahoist tmaboth tma tmalate tmahoist tmaboth" \
    timeout $TL $B --gtest_filter='DeltaCudaStateTiming.*' > "$O/.t" 2>&1
  say "timing T=$T rc=$?"; cat "$O/.t" >> "$L"
  grep "timing \]" "$O/.t" | sed 's/.*bf16, //' | tee -a "$S"
done
rm -f "$O/.t"
# 3. ncu at T = 16K: tma's and tmaboth's forward and reverse passes (2 launches each), the
#    shared-memory wavefronts, instructions and stall reasons a warp (per issued instruction)
M=sm__cycles_elapsed.avg,smsp__inst_executed.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum
M=$M,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed
M=$M,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,smsp__average_warp_latency_per_inst_issued.ratio
for r in barrier short_scoreboard mio_throttle long_scoreboard wait math_pipe_throttle not_selected selected \
         dispatch_stall branch_resolving no_instruction lg_throttle membar sleeping; do
  M=$M,smsp__average_warps_issue_stalled_${r}_per_issue_active.ratio
done
LASP2_DELTA_TIMING_T=16384 LASP2_STATE_TIMING_REPS=2 LASP2_STATE_TIMING_VARIANTS="tma tmaboth" timeout 25 \
  $NCU --clock-control none --kernel-name-base mangled --print-kernel-base mangled \
  -k regex:'fwd_state_kernel_tmaI13__nv_bfloat16Li4ELi16ELb0E|rev_state_kernel_tma' -c 8 --metrics "$M" \
  $B --gtest_filter='DeltaCudaStateTiming.*' > "$O/.n" 2>&1
say "ncu rc=$?"; cat "$O/.n" >> "$L"
if ! grep -q "Metric Value" "$O/.n" && [ $(( $(date +%s) - T0 )) -lt 62 ]; then  # a metric name refused: the sections
  LASP2_DELTA_TIMING_T=16384 LASP2_STATE_TIMING_REPS=2 LASP2_STATE_TIMING_VARIANTS="tma tmaboth" timeout 22 \
    $NCU --clock-control none --kernel-name-base mangled --print-kernel-base mangled -k regex:'fwd_state_kernel_tmaI13__nv_bfloat16Li4ELi16ELb0E' \
    -c 4 --section WarpStateStats --section MemoryWorkloadAnalysis $B --gtest_filter='DeltaCudaStateTiming.*' > "$O/.n2" 2>&1
  say "ncu sections rc=$?"; cat "$O/.n2" >> "$L"
  grep -E "state_kernel_tma|Warp Cycles Per Issued|Mem Busy|Max Bandwidth|Duration" "$O/.n2" | cut -c1-110 | head -24 | tee -a "$S"
  rm -f "$O/.n2"
fi
python3 - "$O/.n" <<'PY' | tee -a "$S"
import re, sys
rows, cur = [], None
for line in open(sys.argv[1], errors="replace"):
    m = re.match(r"\s+(\S*(fwd|rev)_state_kernel_tma\S*)", line)
    if m and "(" in line:
        order = re.search(r"Lb0ELi(\d)E", line) or re.search(r"rev_state_kernel_tmaI(?:13__nv_bfloat16|6__half)Li(\d)E", line)
        cur = {"k": m.group(2) + ("" if order is None or order.group(1) == "0" else " order " + order.group(1))}
        rows.append(cur)
        continue
    m = re.match(r"\s+([a-z_0-9]+__\S+)\s+(?:\S+\s+)?([\d.,]+)\s*$", line)
    if cur is not None and m:
        cur[m.group(1)] = float(m.group(2).replace(",", ""))
keep = [("sm__cycles_elapsed.avg", "cycles"), ("smsp__inst_executed.sum", "inst"),
        ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum", "smem wavefronts"),
        ("l1tex__data_pipe_lsu_wavefronts_mem_shared.sum.pct_of_peak_sustained_elapsed", "smem %peak"),
        ("l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum", "bank conflicts"),
        ("smsp__average_warp_latency_per_inst_issued.ratio", "cycles/inst")]
pre, post = "smsp__average_warps_issue_stalled_", "_per_issue_active.ratio"
for r in rows:
    line = r["k"] + ": " + ", ".join("%s %.4g" % (n, r[k]) for k, n in keep if k in r)
    stalls = sorted(((v, k[len(pre):-len(post)]) for k, v in r.items() if k.startswith(pre)), reverse=True)[:7]
    print(line + " | stalls/inst: " + ", ".join("%s %.2f" % (k, v) for v, k in stalls))
if not rows:
    print("ncu: no kernel rows parsed (see log.txt)")
PY
rm -f "$O/.n"
say "done"
