#!/usr/bin/env bash
# Prints a directory holding nccl.h, fetching NCCL's headers from PyPI's
# nvidia-nccl-cu13 wheel when the CUDA toolkit has none (only headers are kept:
# the CI build compiles the NCCL communicator but never runs it).
set -euo pipefail
for dir in "${NCCL_INCLUDE_DIR:-}" /usr/local/cuda/include /usr/include; do
  if [ -n "$dir" ] && [ -f "$dir/nccl.h" ]; then echo "$dir"; exit 0; fi
done
dest=${LASP2_NCCL_CACHE:-$HOME/.cache/lasp2/nccl}
if [ ! -f "$dest/include/nccl.h" ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$tmp" "nvidia-nccl-cu13" >&2
  mkdir -p "$dest"
  python3 - "$tmp" "$dest" <<'PY'
import glob, os, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "*.whl"))[0]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("nvidia/nccl/include/"):
            target = os.path.join(sys.argv[2], "include", name[len("nvidia/nccl/include/"):])
            if name.endswith("/"):
                continue
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with open(target, "wb") as f:
                f.write(z.read(name))
PY
  rm -rf "$tmp"
fi
echo "$dest/include"
