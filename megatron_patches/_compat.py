"""The megatron-core version this package is written against."""

from __future__ import annotations

import warnings

PINNED_MEGATRON_CORE = "0.16.1"
_checked = False


def check_megatron_core_version() -> str:
    """Imports megatron.core; warns once if it is not the pinned version."""
    global _checked
    try:
        import megatron.core as mcore
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "megatron_patches needs megatron-core: "
            f"pip install --no-deps megatron-core=={PINNED_MEGATRON_CORE} psutil") from exc
    found = getattr(mcore, "__version__", "unknown")
    if not _checked:
        _checked = True
        if found != PINNED_MEGATRON_CORE:
            warnings.warn(
                f"megatron_patches is pinned to megatron-core {PINNED_MEGATRON_CORE} but found {found}: "
                "the core-attention protocol, spec layout and CPU patches were checked against "
                f"{PINNED_MEGATRON_CORE} only (see docs/megatron.md, 'Patch surface')",
                RuntimeWarning, stacklevel=3)
    return found
