#!/usr/bin/env bash
# One call on a GPU machine (1 or more GPUs): build the CUDA extension, run the GPU
# tests (and the multi-GPU ones when several GPUs are present), the CUDA GoogleTests
# with compute-sanitizer (from binaries carried in .carry/bin by
# benchmarks/kernel/build_carry.sh, else built here), the examples, the kernel
# benchmark (lasp2 beside fla's chunk_simple_gla), the longest sequence, and the
# sequence-parallel benchmarks. Everything is logged under /tmp/lasp2_logs (packed
# into $OUT/logs.tgz); the plots and a summary go to $OUT; a short table is printed last.
#   bash scripts/device_check.sh [build] [tests] [gtest] [examples] [bench] [maxlen] [sp] [check] [profile] [delta]
# (default: all but profile and delta; about 8 minutes on one H200). delta: the delta-rule
# CUDA GoogleTests (*DeltaCuda*), its gpu pytest, megatron-core's GatedDeltaNet on fla beside ours
# and benchmarks/bench_delta_rule.py. Optional wheels (e.g.
# flash-linear-attention's fla-core) are taken from .whl/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lasp2_out}
LOGS=/tmp/lasp2_logs
RES=/tmp/lasp2_results
mkdir -p "$OUT" "$LOGS" "$RES"
STAGES=" ${*:-build tests gtest examples bench maxlen sp} "
has() { [[ "$STAGES" == *" $1 "* ]]; }
T0=$(date +%s)
say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/summary.txt"; }
keep() { tee -a "$OUT/summary.txt"; }
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-$(nproc)} LASP2_CUDA_ARCHS=${LASP2_CUDA_ARCHS:-90a}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} NCCL_NVLS_ENABLE=0
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
NGPU=$(nvidia-smi -L | wc -l)
FLA_GDN_TEST=tests/python/megatron/test_megatron_delta_gpu.py::test_core_gdn_on_cuda_matches_megatron_core_gdn_with_fla
say "$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sort | uniq -c | tr -s ' ')"

if has build; then
  LASP2_BUILD_BENCH=1 python3 setup.py build_ext --inplace > "$LOGS/build.log" 2>&1 &
  BUILD_PID=$!
fi
if has gtest && [ ! -x .carry/bin/lasp2_core_tests ] && [ ! -d .carry/googletest ]; then
  say "CUDA GoogleTests skipped: carry .carry/bin (benchmarks/kernel/build_carry.sh) or .carry/googletest (a copy of /usr/src/googletest, built here)"
elif has gtest; then
  # the CUDA GoogleTests (8 shards) and compute-sanitizer on a subset, while the extension builds
  OUT=$LOGS/gtest bash benchmarks/kernel/device_run.sh tests > "$LOGS/gtest_summary.log" 2>&1
  say "CUDA GoogleTests: $(grep -hcE '^\[       OK \]' "$LOGS"/gtest/tests.log 2>/dev/null) OK, \
$(grep -h '^\[  FAILED  \] [A-Z]' "$LOGS"/gtest/tests.log 2>/dev/null | sort -u | wc -l) failed"
  grep -h '^\[  FAILED  \] [A-Z]' "$LOGS"/gtest/tests.log 2>/dev/null | sort -u | head | keep
  grep -hE "ERROR SUMMARY|RACECHECK SUMMARY" "$LOGS"/gtest/sanitizer.log 2>/dev/null | sort | uniq -c | keep
fi
if has build; then
  wait "$BUILD_PID" || { tail -40 "$LOGS/build.log"; exit 1; }
  say "built the CUDA extension"
fi
python3 -c "import lasp2; assert lasp2.has_cuda_kernels(); print('lasp2 CUDA build; NCCL communicator:', lasp2._extension._C.has_nccl_communicator())" 2>&1 | keep

if has delta; then
  # the delta-rule CUDA backend: GoogleTests against the CPU backend (carried binary or
  # built here from .carry/googletest), the gpu pytest, the GDN benchmark beside fla
  DBIN=.carry/bin/lasp2_core_tests
  if ! $DBIN --gtest_list_tests >/dev/null 2>&1 && [ -d .carry/googletest ]; then
    (cmake -S .carry/googletest -B /tmp/gtb -G Ninja -DBUILD_GMOCK=OFF -DCMAKE_INSTALL_PREFIX=/tmp/gt &&
     cmake --build /tmp/gtb -j"$MAX_JOBS" && cmake --install /tmp/gtb &&
     cmake -S . -B /tmp/delta_build -G Ninja -DLASP2_WITH_CUDA=ON -DLASP2_CUDA_ARCHS=90 -DCMAKE_PREFIX_PATH=/tmp/gt &&
     cmake --build /tmp/delta_build -j"$MAX_JOBS") > "$LOGS/delta_gtest_build.log" 2>&1
    DBIN=/tmp/delta_build/lasp2_core_tests
  fi
  timeout 300 $DBIN --gtest_filter='*DeltaCuda*' > "$LOGS/delta_gtest.log" 2>&1
  say "delta CUDA GoogleTests (exit $?): $(grep -cE '^\[       OK \]' "$LOGS/delta_gtest.log") OK, \
$(grep '^\[  FAILED  \] [A-Z]' "$LOGS/delta_gtest.log" | sort -u | wc -l) failed"
  grep -E '^\[  FAILED  \] [A-Z]|Failure|rel|Expected|Which is' "$LOGS/delta_gtest.log" | head -30 | keep
  grep -F '[ timing ]' "$LOGS/delta_gtest.log" | keep  # the one-device calls and each chunked kernel at 64K
  timeout 300 python3 -m pytest tests/python/ops/test_delta_rule_gpu.py -m gpu -q -p no:cacheprovider \
    > "$LOGS/delta_pytest.log" 2>&1
  say "delta gpu pytest (exit $?): $(tail -n 1 "$LOGS/delta_pytest.log")"
  grep -E "^(FAILED|ERROR)|^E  " "$LOGS/delta_pytest.log" | head -20 | keep
  timeout 300 python3 -m pytest "$FLA_GDN_TEST" -q -p no:cacheprovider -rs > "$LOGS/fla_gdn_pytest.log" 2>&1
  say "megatron-core GatedDeltaNet on fla beside ours (exit $?): $(tail -n 1 "$LOGS/fla_gdn_pytest.log")"
  grep -E "^(FAILED|ERROR|SKIPPED)|^E  " "$LOGS/fla_gdn_pytest.log" | cut -c1-300 | head -10 | keep
  timeout 420 python3 benchmarks/bench_delta_rule.py --out "$RES" ${DELTA_BENCH_ARGS:-} > "$LOGS/bench_delta.log" 2>&1
  say "delta benchmark (exit $?)"
  grep -vE "^\s*$" "$LOGS/bench_delta.log" | grep -E "^#|^GDN|^ +T |^ *[0-9]+ \|" | keep
  cp "$RES/bench_delta_rule.png" "$RES/bench_delta_rule.json" "$OUT/" 2>/dev/null
fi

if has tests; then
  MARK="gpu"
  [ "$NGPU" -ge 2 ] && MARK="gpu or multigpu"
  # megatron-core's GatedDeltaNet on fla beside ours runs in the delta stage: fla's Triton
  # kernels compile and tune there first (202 s on one H200, session 20; the rest is ~100 s)
  timeout 300 python3 -m pytest tests/python -m "$MARK" -q -p no:cacheprovider --deselect "$FLA_GDN_TEST" \
    > "$LOGS/pytest_gpu.log" 2>&1
  say "pytest -m '$MARK' (exit $?): $(tail -n 1 "$LOGS/pytest_gpu.log")"
  grep -E "^(FAILED|ERROR)" "$LOGS/pytest_gpu.log" | head -20 | keep
fi

if has check; then
  # the per-call cross-rank consistency check beside a 4K-token layer (docs/reliability.md)
  if [ "$NGPU" -ge 2 ]; then
    timeout 180 torchrun --standalone --nproc_per_node 2 benchmarks/bench_consistency_check.py --device cuda \
      > "$LOGS/check.log" 2>&1
  else
    timeout 180 python3 benchmarks/bench_consistency_check.py --device cuda --world 1 > "$LOGS/check.log" 2>&1
  fi
  say "consistency check (exit $?): $(grep '^{' "$LOGS/check.log" | tail -n 1)"
  # the default check on an NCCL group of one (no wait for the op stream), CUDA-graph capture of a group-of-one call
  timeout 120 python3 -m pytest tests/python/reliability/test_consistency_gpu.py -q > "$LOGS/check_gpu_test.log" 2>&1
  say "consistency check GPU test (exit $?): $(tail -n 1 "$LOGS/check_gpu_test.log")"
fi

if has examples; then
  timeout 120 torchrun --standalone --nproc_per_node "$NGPU" examples/sp_linear_attention.py --device cuda \
    --seq-len 65536 --hidden 1024 --heads 8 --split balanced > "$LOGS/example.log" 2>&1
  grep -E "lasp2 example|relative error|forward\+backward" "$LOGS/example.log" | keep
  timeout 120 torchrun --standalone --nproc_per_node "$NGPU" examples/hybrid_block.py --device cuda \
    --dtype bfloat16 --seq-len 8192 --hidden 512 --heads 8 > "$LOGS/hybrid.log" 2>&1
  say "hybrid example (exit $?): $(grep -iE "error|ok|mismatch" "$LOGS/hybrid.log" | tail -n 3 | tr '\n' ' ')"
fi

if has bench; then
  # BENCH_ARGS: extra arguments, e.g. "--decays fixed gate --dims 128" for a shorter run
  timeout 300 python3 benchmarks/bench_linear_attention.py --out "$RES" ${BENCH_ARGS:-} > "$LOGS/bench.log" 2>&1
  say "kernel benchmark (exit $?)"
  grep -E "^# " "$LOGS/bench.log" | grep -v "^# plot" | keep
  cp "$RES/bench_linear_attention.png" "$RES/bench_linear_attention.json" "$OUT/" 2>/dev/null
fi

if has profile; then
  timeout 120 python3 benchmarks/kernel/profile_op.py > "$LOGS/profile.log" 2>&1
  say "profile (exit $?)"
  keep < "$LOGS/profile.log"
fi

if has maxlen; then
  # one layer fwd + bwd at up to 4M tokens (H = 16, D = 128, bf16, gates); dO = v
  # (random, no extra 16 GiB); the second run is timed. At 4M: q, k, v, o, dq, dk, dv
  # are 7 x 16 GiB, about 114 GiB with the gates (measured at 1M: 28.4 GiB peak)
  timeout 150 python3 - <<'PY' 2>&1 | tee "$LOGS/maxlen.log" | keep
import time, torch, torch.nn.functional as F, lasp2
H, D = 16, 128
for T in (1048576, 2097152, 4194304):
    try:
        torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
        q, k, v = (torch.randn(1, T, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = (F.logsigmoid(torch.randn(1, T, H, device="cuda")) / 16).requires_grad_()
        for _ in range(2):
            torch.cuda.synchronize(); t0 = time.perf_counter()
            o = lasp2.linear_attention(q, k, v, g=g)
            grads = torch.autograd.grad(o, (q, k, v, g), v.detach())
            torch.cuda.synchronize(); ms = (time.perf_counter() - t0) * 1e3
            # a NaN or inf anywhere makes the fp32 sum non-finite; isfinite(x) would upcast
            # x and allocate 2.5x its bytes (the 4M run ran out of memory on that)
            ok = all(bool(torch.isfinite(x.sum(dtype=torch.float32))) for x in (o,) + grads)
            del o, grads
        inputs = 3 * T * H * D * 2 + T * H * 4
        print(f"maxlen: T={T} fwd+bwd {ms:.1f} ms, finite {ok}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB "
              f"({torch.cuda.max_memory_allocated() / inputs:.2f}x the q,k,v,g bytes)")
        del q, k, v, g
    except torch.cuda.OutOfMemoryError:
        print(f"maxlen: T={T} out of memory"); break
PY
fi

if has sp && [ "$NGPU" -ge 2 ]; then
  rm -f "$RES/sp_scaling.json"
  for P in $(seq 1 "$NGPU"); do
    [ "$P" -eq 1 ] || [ "$P" -eq 2 ] || [ "$P" -eq 4 ] || [ "$P" -eq 8 ] || continue
    for MODE in weak strong; do
      timeout 90 torchrun --standalone --nproc_per_node "$P" benchmarks/bench_sp_scaling.py --device cuda \
        --mode "$MODE" --tokens-per-rank 65536 --global-tokens 262144 --results "$RES/sp_scaling.json" \
        >> "$LOGS/sp_scaling.log" 2>&1
    done
    timeout 150 torchrun --standalone --nproc_per_node "$P" benchmarks/sp_providers.py --device cuda \
      --tokens 4096,16384,65536 --iters 5 --out-dir "$RES/providers" >> "$LOGS/sp_providers.log" 2>&1
  done
  python3 benchmarks/bench_sp_scaling.py --report --results "$RES/sp_scaling.json" 2>&1 | keep
  cp "$RES/sp_scaling.png" "$OUT/" 2>/dev/null
  python3 benchmarks/sp_providers.py --report --out-dir "$RES/providers" 2>&1 | tail -n 30 | keep
  cp "$RES/providers/sp_providers.png" "$OUT/" 2>/dev/null
  timeout 150 python3 benchmarks/sp_softmax_attention.py --device cuda --seq-len 32768 --heads 32 --kv-heads 8 \
    --head-dim 128 --dtype bfloat16 --worlds "1,$NGPU" --out-dir "$RES/lasp2h" > "$LOGS/lasp2h_bench.log" 2>&1
  say "LASP-2H benchmark (exit $?)"
  tail -n 12 "$LOGS/lasp2h_bench.log" | keep
  cp "$RES/lasp2h/lasp2h_bench.png" "$OUT/" 2>/dev/null
fi
tar czf "$OUT/logs.tgz" -C /tmp lasp2_logs lasp2_results 2>/dev/null
say "done"
if [ -f "$LOGS/bench.log" ]; then  # the short table last
  echo "== one layer, H=16, bf16 (ms; xfl = x memory floor; graph = fwd+bwd replayed from a CUDA graph; fla/us = fla fwd+bwd / lasp2)"
  sed -n '/^decay /,$p' "$LOGS/bench.log"
fi
