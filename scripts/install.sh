#!/usr/bin/env bash
# Installs lasp2 from this source tree into the current Python environment.
# torch is taken as installed if present (CPU or CUDA); otherwise torch==2.13.0 is
# installed (on the project machines that is the CPU build from local disk).
# The extension is built against that torch (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q "torch==${LASP2_TORCH_VERSION:-2.13.0}"
fi
"$PY" -m pip install -q numpy pybind11 ninja "setuptools>=64" wheel
MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PY" -m pip install -q --no-build-isolation -e .
"$PY" -c "import lasp2; print('lasp2', lasp2.__version__, 'installed; CUDA kernels:', lasp2.has_cuda_kernels())"
