#!/usr/bin/env bash
# The whole test suite, as CI runs it on a fresh machine (no GPU needed):
#   1. install lasp2 (scripts/install.sh) and the test tools;
#   2. build the C++ core with CMake and run its GoogleTest suite (ctest): with nvcc
#      present, ONE build that also compiles the CUDA sources (sm_90a machine code and
#      sm_80 PTX: both architectures' code paths go through the compiler, and the
#      machine-code pass, a quarter of the CUDA compile time, runs once; the CPU tests
#      run, the CUDA tests skip where no GPU is present); without nvcc, a
#      CPU-only build (the CPU-only configuration of the core is also what the Python
#      extension compiles in step 1 on a CPU torch);
#   3. run pytest (GPU-marked tests skip where no GPU is present).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
JOBS=${MAX_JOBS:-$(nproc)}
trap 'echo "run_tests.sh: failed at line $LINENO: $BASH_COMMAND" >&2' ERR
LOGS=build-logs
mkdir -p "$LOGS"
# Runs a quiet step with its output in build-logs/NAME.log, shown if it fails.
quiet() {
  local name=$1; shift
  if ! "$@" > "$LOGS/$name.log" 2>&1; then
    echo "step '$name' failed; its log:" >&2
    tail -n 60 "$LOGS/$name.log" >&2
    return 1
  fi
}

# lasp2._bench (benchmark communicators) is built too: the provider tests use it.
LASP2_BUILD_BENCH=1 bash scripts/install.sh
# megatron-core: the newest release, 0.19.x, where the Python allows it (its wheels need
# CPython >= 3.12; its pipeline schedules import triton, which CPU-only torch does not bring),
# else 0.16.1, the last release for 3.11. --no-deps keeps the installed torch (megatron-core's
# import needs only torch, numpy, packaging); psutil is needed by its checkpoint writer.
"$PY" -m pip install -q pytest psutil
if "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 12))'; then
  "$PY" -m pip install -q --no-deps "megatron-core==${LASP2_MEGATRON_CORE_VERSION:-0.19.*}" triton
else
  "$PY" -m pip install -q --no-deps "megatron-core==${LASP2_MEGATRON_CORE_VERSION:-0.16.1}"
fi

if [ ! -f /usr/include/gtest/gtest.h ]; then
  (apt-get install -y -q libgtest-dev >/dev/null 2>&1) ||
    (apt-get update -q >/dev/null && apt-get install -y -q libgtest-dev >/dev/null)
fi

NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
SECONDS=0
if [ -x "$NVCC" ]; then
  echo "== C++ core, CPU + CUDA ($("$NVCC" --version | tail -n 1)) =="
  NCCL_INC=$(bash scripts/fetch_nccl_headers.sh)
  quiet configure cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release -DLASP2_WITH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$NVCC" -DLASP2_CUDA_ARCHS="80-virtual;90a-real" -DNCCL_INCLUDE_DIR="$NCCL_INC"
  quiet build cmake --build build-cmake -j "$JOBS"
  echo "core, tests and CUDA sources (sm_80 PTX, sm_90a) compiled in ${SECONDS} s"
else
  echo "== C++ core (CPU; no nvcc, CUDA sources not compiled) =="
  quiet configure cmake -S . -B build-cmake -G Ninja -DCMAKE_BUILD_TYPE=Release
  quiet build cmake --build build-cmake -j "$JOBS"
  echo "core and tests compiled in ${SECONDS} s"
fi
# ctest lists the skipped (CUDA, no GPU) cases after its summary: print the summary
if ! ctest --test-dir build-cmake --output-on-failure -j "$JOBS" > "$LOGS/ctest.log" 2>&1; then
  tail -n 80 "$LOGS/ctest.log" >&2
  exit 1
fi
grep -E "tests passed|tests failed" "$LOGS/ctest.log"
echo "($(grep -c '(Skipped)' "$LOGS/ctest.log") of them skipped at run time: CUDA cases, no GPU here)"

echo "== Python =="
"$PY" -m pytest tests/python -q -p no:cacheprovider "$@"
