"""The megatron-core version the package checks against."""

import pytest

pytest.importorskip("megatron.core")


def test_version_pin_matches_ci():
    import megatron.core

    from megatron_patches import PINNED_MEGATRON_CORE

    assert megatron.core.__version__ == PINNED_MEGATRON_CORE


def test_version_mismatch_warns(monkeypatch):
    import megatron.core

    from megatron_patches import _compat

    monkeypatch.setattr(megatron.core, "__version__", "0.0.1")
    monkeypatch.setattr(_compat, "_checked", False)
    with pytest.warns(RuntimeWarning, match="pinned to megatron-core 0.16.1 but found 0.0.1"):
        _compat.check_megatron_core_version()
