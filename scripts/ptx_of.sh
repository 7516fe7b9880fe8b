#!/usr/bin/env bash
# PTX of CUDA sources as the core's CMake build compiles them (Release flags, sm_90a and
# compute_80), for scripts/ptx_same.py: the check, without a GPU, that a refactor of
# device code leaves the code the GPU runs unchanged.
#   bash scripts/ptx_of.sh SRC_ROOT OUT_DIR FILE.cu...
# writes OUT_DIR/<name>.90.ptx and OUT_DIR/<name>.80.ptx for each FILE (paths relative to
# SRC_ROOT, a checkout: e.g. a `git worktree` of the commit before the change). Compare
# one file's PTX, or, for kernels that moved between files, the concatenations:
#   bash scripts/ptx_of.sh /tmp/before /tmp/ptx_a csrc/core/cuda/tc_dkdv.cu
#   bash scripts/ptx_of.sh .            /tmp/ptx_b csrc/core/cuda/tc_dkdv.cu
#   python3 scripts/ptx_same.py /tmp/ptx_a/tc_dkdv.90.ptx /tmp/ptx_b/tc_dkdv.90.ptx
set -euo pipefail
[ $# -ge 3 ] || { sed -n '2,11p' "$0" >&2; exit 2; }
ROOT=$(cd "$1" && pwd); OUT=$(mkdir -p "$2" && cd "$2" && pwd); shift 2
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
NCCL_INC=$(bash "$(dirname "$0")/fetch_nccl_headers.sh")
FLAGS=(-DLASP2_WITH_CUDA -DLASP2_WITH_NCCL -I"$ROOT/csrc/core/include" -I"$ROOT/csrc/core" -I"$NCCL_INC"
       -O3 -DNDEBUG -Xcompiler=-fPIC --expt-relaxed-constexpr -std=c++17 -x cu)
cd "$ROOT"
for f in "$@"; do
  n=$(basename "$f" .cu)
  "$NVCC" "${FLAGS[@]}" -arch=sm_90a -ptx "$f" -o "$OUT/$n.90.ptx" &
  "$NVCC" "${FLAGS[@]}" -arch=compute_80 -ptx "$f" -o "$OUT/$n.80.ptx" &
  wait
done
