#!/usr/bin/env bash
# Builds, on the development machine, a small sm_90a test binary of the fused L2 norm
# alone (tests/cpp/test_qk_l2norm.cpp + tests/cpp/cuda/test_cuda_l2norm.cpp over the
# core's L2 norm sources; cudart and GoogleTest linked statically), so a device call can
# run its CUDA cases and timing without the whole core build:
#   bash benchmarks/kernel/build_l2norm_carry.sh      -> .carry/l2norm/l2norm_tests
#   on the device: ./l2norm_tests; LASP2_L2NORM_BENCH=1 ./l2norm_tests --gtest_filter='*Timing*'
set -euo pipefail
cd "$(dirname "$0")/../.."
CUDA=${CUDA_HOME:-/usr/local/cuda}
OUTDIR=.carry/l2norm
TMP=$(mktemp -d)
INC="-DLASP2_WITH_CUDA -Icsrc/core/include -Icsrc/core -I$CUDA/include"
for src in tests/cpp/cuda/test_cuda_l2norm.cpp tests/cpp/test_qk_l2norm.cpp csrc/core/qk_l2norm.cpp csrc/core/types.cpp; do
  g++ -std=c++17 -O2 $INC -c "$src" -o "$TMP/$(basename "$src" .cpp).o"
done
for src in csrc/core/cuda/l2norm_kernels.cu csrc/core/cuda/misc_kernels.cu; do  # misc: check_launch
  nvcc -std=c++17 -O3 --expt-relaxed-constexpr $INC -gencode=arch=compute_90a,code=sm_90a -c "$src" \
    -o "$TMP/$(basename "$src" .cu).o"
done
mkdir -p "$OUTDIR"
nvcc -gencode=arch=compute_90a,code=sm_90a "$TMP"/*.o -lgtest -lgtest_main -lpthread -o "$OUTDIR/l2norm_tests"
rm -rf "$TMP"
echo "$OUTDIR/l2norm_tests"
