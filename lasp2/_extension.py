"""Loads the compiled extension lasp2._C with an actionable message when absent."""

import torch  # noqa: F401  (loads libtorch/libc10, which lasp2._C links against)

try:
    from lasp2 import _C  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    raise ImportError(
        "lasp2's compiled extension (lasp2._C) is missing or does not match the installed "
        "torch. Rebuild it against your torch with `pip install --no-build-isolation .` "
        f"from the lasp2 source tree. Original error: {exc}"
    ) from exc

Lasp2Error = _C.Lasp2Error


_HAS_CUDA_KERNELS = bool(_C.has_cuda_kernels())  # a constant: torch.compile traces a bool, not pybind


def has_cuda_kernels() -> bool:
    """True when this build carries the CUDA kernels."""
    return _HAS_CUDA_KERNELS
