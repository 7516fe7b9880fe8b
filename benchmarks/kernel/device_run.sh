#!/usr/bin/env bash
# One call on the GPU machine: the CUDA GoogleTest cases (8 shards in parallel),
# compute-sanitizer memcheck and racecheck on a small subset (alongside), then the
# kernel benchmark and, when a flash-linear-attention wheel was carried in .whl/,
# fla's chunk kernels at the same size. Logs go to $OUT; a summary is printed last.
#   benchmarks/kernel/device_run.sh [all|tests|bench|base|ab|kprof|prof ...]   (several stages allowed)
# AB_BASE_ENV="NAME=value ...": the base of `ab` and `kprof` is this build run with
# that environment (an A/B of a run-time knob on one binary) instead of
# .carry/base/bench_lasp2.
# SAN_FILTER / SAN_TIMEOUT: the GoogleTest filter and time limit of the sanitizer runs;
# PROF_KERNELS / PROF_COUNT / PROF_T: kernel-name regex, launches and T of `prof`.
# TEST_FILTER: the GoogleTest filter of `tests` (default 'Cuda*:*/Cuda*');
# KPROF_METRICS: ncu metrics of `kprof` (default gpu__time_duration.sum; e.g. add
# smsp__inst_executed.sum for executed instructions).
# The device tool returns at most 8 files from $OUT: a call running several stages
# should point OUT at one folder per stage or keep only the summaries.
# (BENCH_SHAPES="T,H,D,B,dtype,mode ..." overrides the shapes of bench and base; ab:
# new and base alternating, twice per shape (AB_SHAPES, default the same), with the
# graph-replayed fwd+bwd; kprof: each kernel's duration through ncu, new and base build)
# base: the same benchmark with .carry/base/bench_lasp2 (an earlier version, built by
# build_carry.sh from BASE_REF), on the same machine, for a before/after table.
# The binaries come from benchmarks/kernel/build_carry.sh (run on the dev machine,
# carried in .carry/); if they do not start here they are rebuilt from source.
set -u
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/lasp2_out}
mkdir -p "$OUT"
STAGES=" ${*:-all} "
has() { [[ "$STAGES" == *" all "* || "$STAGES" == *" $1 "* ]]; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PATH=$PATH:/usr/local/cuda/bin
BIN=.carry/bin
T0=$(date +%s)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
if ! $BIN/lasp2_core_tests --gtest_list_tests >/dev/null 2>&1; then
  echo "carried binaries do not run here; rebuilding" | tee -a "$OUT/gpu.txt"
  (cmake -S .carry/googletest -B /tmp/gtb -G Ninja -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX=/tmp/gt >/dev/null &&
   cmake --build /tmp/gtb -j16 >/dev/null && cmake --install /tmp/gtb >/dev/null &&
   cmake -S . -B /tmp/b -G Ninja -DLASP2_WITH_CUDA=ON -DLASP2_CUDA_ARCHS=90a -DCMAKE_PREFIX_PATH=/tmp/gt >/dev/null &&
   cmake --build /tmp/b -j16 >/dev/null &&
   g++ -O2 -std=c++17 -DLASP2_WITH_CUDA -Icsrc/core/include -I/usr/local/cuda/include benchmarks/kernel/bench_lasp2.cpp \
     /tmp/b/liblasp2_core.a -L/usr/local/cuda/lib64 -lcudart -lpthread -o /tmp/b/bench_lasp2) > "$OUT/rebuild.log" 2>&1
  BIN=/tmp/b
fi

# A sanitizer stopped by `timeout` may leave its instrumented test process on the GPU, which
# then slows every timing after it 2-4x (session 17's invalid 256K row): before timing, stop
# any lasp2 test process still running and wait until no compute process is left.
gpu_idle() {
  pkill -f 'lasp2_core_tests' 2>/dev/null
  for _ in $(seq 30); do
    [ -z "$(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null)" ] && return 0
    sleep 1
  done
  echo "GPU still busy before timing: $(nvidia-smi --query-compute-apps=pid,process_name --format=csv,noheader | tr '\n' ' ')" |
    tee -a "$OUT/gpu.txt"
}

if has tests; then
  SUB=${SAN_FILTER:-'*CudaOps*T77_part13*:*CudaOps*dk40*:*CudaOps*dk33*:*CudaOps*dk96*:*CudaOps*seg5*:*bf16_gate_D64_T1000_docs_forget*'}
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool memcheck --leak-check no $BIN/lasp2_core_tests \
    --gtest_filter="$SUB:CudaCombine.*" > /tmp/memcheck.log 2>&1 &
  MC=$!
  timeout ${SAN_TIMEOUT:-150} compute-sanitizer --tool racecheck $BIN/lasp2_core_tests --gtest_filter="$SUB" > /tmp/racecheck.log 2>&1 &
  RC=$!
  for i in 0 1 2 3 4 5 6 7; do
    GTEST_TOTAL_SHARDS=8 GTEST_SHARD_INDEX=$i timeout 300 $BIN/lasp2_core_tests \
      --gtest_filter="${TEST_FILTER:-Cuda*:*/Cuda*}" > /tmp/shard$i.log 2>&1 &
  done
  wait
  cat /tmp/shard*.log > "$OUT/tests.log"
  { echo "== memcheck"; cat /tmp/memcheck.log; echo "== racecheck"; cat /tmp/racecheck.log; } > "$OUT/sanitizer.log"
  echo "tests+sanitizers done after $(( $(date +%s) - T0 )) s"
  gpu_idle
fi

# bench / base: the same shapes (T H D B dtype mode), one bench_lasp2 call each
SHAPES=${BENCH_SHAPES:-"65536,16,128,1,bf16,gate 65536,16,128,1,bf16,fixed 65536,16,64,1,bf16,gate \
4096,16,128,1,bf16,gate 4096,16,128,8,bf16,gate 16384,16,128,1,bf16,fixed 262144,16,128,1,bf16,gate"}
if has bench; then
  : > "$OUT/bench.log"
  for s in $SHAPES; do $BIN/bench_lasp2 ${s//,/ } >> "$OUT/bench.log" 2>&1; done
  echo "bench done after $(( $(date +%s) - T0 )) s"
fi
if has base && [ -x .carry/base/bench_lasp2 ]; then
  : > "$OUT/base.log"
  for s in $SHAPES; do .carry/base/bench_lasp2 ${s//,/ } >> "$OUT/base.log" 2>&1; done
  echo "base done after $(( $(date +%s) - T0 )) s"
fi
BASE_RUN=".carry/base/bench_lasp2"
[ -n "${AB_BASE_ENV:-}" ] && BASE_RUN="env $AB_BASE_ENV $BIN/bench_lasp2"
if has ab && { [ -x .carry/base/bench_lasp2 ] || [ -n "${AB_BASE_ENV:-}" ]; }; then
  # before/after with less noise: new and base alternate, twice per shape, in `fb` mode
  # (lasp2_forward, lasp2_backward, fwd+bwd, fwd+bwd replayed from a CUDA graph)
  : > "$OUT/ab.log"
  for s in ${AB_SHAPES:-$SHAPES}; do
    for r in $(seq "${AB_RUNS:-2}"); do
      for b in new base; do
        bin=$BIN/bench_lasp2
        [ "$b" = base ] && bin=$BASE_RUN
        echo "== $b" >> "$OUT/ab.log"
        $bin ${s//,/ } fb >> "$OUT/ab.log" 2>&1
      done
    done
  done
  echo "ab done after $(( $(date +%s) - T0 )) s"
fi
if has kprof; then
  # each kernel's duration (ncu, one launch per backend function), new and base build,
  # at T = 64K and T = 4K (gates, D = 128, B = 1)
  for b in "$BIN/bench_lasp2" "$BASE_RUN"; do
    [ -x "${b##* }" ] || continue
    for TB in ${KPROF_SHAPES:-65536,1 4096,1}; do
      echo "== $b T,B=$TB" >> "$OUT/kprof.log"
      timeout 120 ncu --clock-control none --metrics ${KPROF_METRICS:-gpu__time_duration.sum} $b ${TB%,*} 16 128 ${TB#*,} bf16 gate once 2>&1 |
        awk '/Context [0-9]+, Stream/ { k = "?"; if (match($0, /[a-z_0-9]+_kernel(<[^>]*>)?/)) k = substr($0, RSTART, RLENGTH) }
             /^ +[a-z_]+__[a-z_.]+ / { printf "%s %s %s %s\n", k, $1, $(NF-1), $NF }' \
        >> "$OUT/kprof.log"
    done
  done
  echo "kprof done after $(( $(date +%s) - T0 )) s"
fi
if has fla && ls .whl/fla_core-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > /dev/null 2>&1
  PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 timeout 240 python3 benchmarks/kernel/bench_fla.py 65536 16 128 1 \
    --unsafe-gate-timing > "$OUT/fla.log" 2>&1
  echo "fla done after $(( $(date +%s) - T0 )) s"
fi
if has prof; then
  # one launch of each tensor-core kernel (T = 16K), with the stall reasons per issued
  # instruction (smsp__average_warps_issue_stalled_*), then the SASS of the D = 128 kernels
  timeout 150 ncu --kernel-name regex:${PROF_KERNELS:-tc_} --launch-count ${PROF_COUNT:-8} --section SpeedOfLight --section Occupancy \
    --section LaunchStats --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis \
    --section ComputeWorkloadAnalysis --section InstructionStats --metrics regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio \
    $BIN/bench_lasp2 ${PROF_T:-16384} 16 128 1 bf16 gate once > "$OUT/ncu.txt" 2>&1
  cuobjdump -sass $BIN/bench_lasp2 2>/dev/null | awk '/Function : .*tc_(fwd|dkdv|state)_kernel.*13__nv_bfloat16Li128E/{f=1; print; next} /Function : /{f=0} f' > "$OUT/sass.txt"
  echo "prof done after $(( $(date +%s) - T0 )) s"
fi

echo "================ summary ($(( $(date +%s) - T0 )) s) ================"
cat "$OUT/gpu.txt"
if [ -f "$OUT/tests.log" ]; then
  echo "-- gtest shards:"; grep -hE "^\[  (PASSED|FAILED)  \]|tests? ran|SKIPPED \] [0-9]" /tmp/shard*.log | sort | uniq -c
  echo "-- failing tests:"; grep -h "^\[  FAILED  \] [A-Z]" "$OUT/tests.log" | sort -u | head -30
  echo "-- max rel err by dtype and op (vs float64 CPU on the same inputs):"
  grep -h "^\[cuda-op\]" "$OUT/tests.log" | awk '{split($2,a,"_"); k=a[1]" "$3; sub("rel_err=","",$4); sub("tol=","",$5); if ($4+0 > m[k]+0) m[k]=$4; t[k]=$5} END {for (k in m) print k, m[k], "tol", t[k]}' | sort
  echo "-- FAIL lines:"; grep -h "FAIL$" "$OUT/tests.log" | head -25
  grep -h "^\[cuda-e2e\]" "$OUT/tests.log" | sort
  echo "-- sanitizer:"; grep -hE "ERROR SUMMARY|RACECHECK SUMMARY|PASSED|FAILED  \]" "$OUT/sanitizer.log" | sort | uniq -c
  grep -hm5 -E "Invalid|Race|hazard" "$OUT/sanitizer.log"
fi
[ -f "$OUT/bench.log" ] && grep -E "^(B=|fwd\+bwd|lasp2_|copy)" "$OUT/bench.log"
[ -f "$OUT/kprof.log" ] && cat "$OUT/kprof.log"
if [ -f "$OUT/base.log" ] && [ -f "$OUT/bench.log" ]; then
  echo "-- before/after, gate, same machine (ms; base = .carry/base build, new = this build):"
  awk '/^B=[0-9]+ T=/ { sh = $1 " " $2 " " $4 " " $6; f = (FILENAME ~ /base/) }
       /^(part_|chunk_|lasp2_|fwd\+bwd)/ {
         k = sprintf("%-32s %-28s", sh, substr($0, 1, 28)); v = substr($0, 29, 10) + 0
         if (f) b[k] = v; else if (!(k in a)) a[k] = v }
       END { printf "%-61s %8s %8s %7s\n", "shape / op", "base", "new", "speedup"
             for (k in b) if (k in a) printf "%-61s %8.3f %8.3f %6.2fx\n", k, b[k], a[k], b[k] / a[k] }' \
      "$OUT/base.log" "$OUT/bench.log" | sort
fi
if [ -f "$OUT/ab.log" ]; then
  echo "-- before/after, alternating runs (ms, the lower of two runs each; base = .carry/base build):"
  awk '/^== / { f = ($2 == "base") } /^B=[0-9]+ T=/ { sh = $1 " " $2 " " $4 " " $6 }
       /^(lasp2_|fwd\+bwd)/ { k = sprintf("%-32s %-24s", sh, substr($0, 1, 24)); v = substr($0, 29, 10) + 0
         if (f) { if (!(k in b) || v < b[k]) b[k] = v } else { if (!(k in a) || v < a[k]) a[k] = v } }
       END { printf "%-57s %8s %8s %7s\n", "shape / op", "base", "new", "speedup"
             for (k in b) if (k in a) printf "%-57s %8.3f %8.3f %6.2fx\n", k, b[k], a[k], b[k] / a[k] }' \
      "$OUT/ab.log" | sort
fi
[ -f "$OUT/fla.log" ] && grep -E "^fla" "$OUT/fla.log"
if [ -f "$OUT/ncu.txt" ]; then
  echo "-- ncu stalls (cycles per issued instruction, > 0.2):"
  awk '/tc_[a-z_0-9]+_kernel</ { k = $0; sub(/^ *void [^:]*::/, "", k); sub(/>\(.*/, ">", k); print "  " k }
       /smsp__average_warps_issue_stalled_/ && $NF + 0 > 0.2 { m = $1; sub(/smsp__average_warps_issue_stalled_/, "", m);
         sub(/_per_issue_active.ratio/, "", m); printf "    %-22s %s\n", m, $NF }' "$OUT/ncu.txt" | head -80
  echo "-- ncu (kernel, duration, SM/DRAM throughput, warps, top stalls):"
  grep -E "tc_[a-z_0-9]+_kernel|^    Duration|Compute \(SM\) Throughput|DRAM Throughput|Achieved Active Warps|Registers Per|No Eligible|Issued Warp|spends|Warp Cycles Per Issued|Executed Instructions  |Executed Ipc Active|SM Busy|Issue Slots Busy" "$OUT/ncu.txt" | sed -E 's/void lasp2::cuda::\(anonymous namespace\)::/  /; s/\(lasp2::cuda::[A-Za-z]+\).*//; s/  +/ /g' | head -${PROF_LINES:-90}
fi
