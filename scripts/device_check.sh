#!/usr/bin/env bash
# One call on a GPU machine: build the CUDA extension, run the GPU tests (and the
# multi-GPU ones when several GPUs are present), the single-GPU example and the
# kernel benchmark. Logs and results go to $OUT; a summary is printed last.
#   bash scripts/device_check.sh [build] [tests] [example] [bench]   (default: all)
# Optional wheels (e.g. flash-linear-attention's fla-core) are taken from .whl/.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lasp2_out}
mkdir -p "$OUT"
STAGES=" ${*:-build tests example bench} "
has() { [[ "$STAGES" == *" $1 "* ]]; }
T0=$(date +%s)
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} LASP2_CUDA_ARCHS=${LASP2_CUDA_ARCHS:-90} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl >/dev/null 2>&1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
NGPU=$(nvidia-smi -L | wc -l)

if has build; then
  python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  echo "build done after $(( $(date +%s) - T0 )) s"
fi
python3 -c "import lasp2; assert lasp2.has_cuda_kernels(); print('lasp2 CUDA build OK; NCCL communicator:', lasp2._extension._C.has_nccl_communicator())"

if has tests; then
  MARK="gpu"
  [ "$NGPU" -ge 2 ] && MARK="gpu or multigpu"
  timeout 400 python3 -m pytest tests/python -m "$MARK" -q -p no:cacheprovider -x > "$OUT/pytest_gpu.log" 2>&1
  echo "pytest ($MARK) exit $? after $(( $(date +%s) - T0 )) s: $(tail -n 1 "$OUT/pytest_gpu.log")"
fi

if has example; then
  timeout 120 torchrun --standalone --nproc_per_node "$NGPU" examples/sp_linear_attention.py --device cuda \
    --seq-len 65536 --hidden 1024 --heads 8 > "$OUT/example.log" 2>&1
  grep -E "lasp2 example|relative error|forward\+backward" "$OUT/example.log"
fi

if has bench; then
  timeout 300 python3 benchmarks/bench_linear_attention.py --out "$OUT" > "$OUT/bench.log" 2>&1
  echo "bench done after $(( $(date +%s) - T0 )) s"
  grep -vE "^\s*$" "$OUT/bench.log" | tail -n 40
fi
echo "== $(cat "$OUT/gpu.txt"); $(( $(date +%s) - T0 )) s"
