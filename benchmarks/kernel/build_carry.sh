#!/usr/bin/env bash
# Builds, on the development machine, what benchmarks/kernel/device_run.sh runs on
# the device machine (sm_90 only), into .carry/ (git-ignored, sent with `carry`):
#   .carry/bin/lasp2_core_tests  .carry/bin/bench_lasp2  .carry/googletest (sources,
#   for a rebuild on the device if the carried binaries cannot run there).
set -euo pipefail
cd "$(dirname "$0")/../.."
BUILD=${BUILD:-build/sm90}
CUDA=${CUDA_HOME:-/usr/local/cuda}
cmake -S . -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLASP2_WITH_CUDA=ON -DLASP2_CUDA_ARCHS=90a >/dev/null
cmake --build "$BUILD" -j "${JOBS:-1}"
g++ -O2 -std=c++17 -DLASP2_WITH_CUDA -Icsrc/core/include -I"$CUDA/include" benchmarks/kernel/bench_lasp2.cpp \
  "$BUILD/liblasp2_core.a" -L"$CUDA/lib64" -lcudart -lpthread -o "$BUILD/bench_lasp2"
mkdir -p .carry/bin
cp "$BUILD/lasp2_core_tests" "$BUILD/bench_lasp2" .carry/bin/
[ -d .carry/googletest ] || cp -r /usr/src/googletest .carry/googletest
# BASE_REF=<commit>: also build that version's benchmark into .carry/base/ (for the
# same-machine before/after table of `device_run.sh bench base`).
if [ -n "${BASE_REF:-}" ]; then
  BASE_DIR=/tmp/lasp2_base_$(git rev-parse --short "$BASE_REF")
  [ -d "$BASE_DIR" ] || git worktree add --detach "$BASE_DIR" "$BASE_REF" >/dev/null
  (cd "$BASE_DIR" &&
   cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLASP2_WITH_CUDA=ON -DLASP2_CUDA_ARCHS=90 \
     -DLASP2_BUILD_TESTS=OFF >/dev/null && cmake --build build &&
   g++ -O2 -std=c++17 -DLASP2_WITH_CUDA -Icsrc/core/include -I"$CUDA/include" benchmarks/kernel/bench_lasp2.cpp \
     build/liblasp2_core.a -L"$CUDA/lib64" -lcudart -lpthread -o build/bench_lasp2)
  mkdir -p .carry/base
  cp "$BASE_DIR/build/bench_lasp2" .carry/base/
fi
du -sh .carry
