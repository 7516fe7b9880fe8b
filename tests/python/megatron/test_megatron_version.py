"""The megatron-core version the package checks against."""

import pytest

pytest.importorskip("megatron.core")


def test_installed_version_is_supported():
    import megatron.core

    from megatron_patches._compat import is_supported

    assert is_supported(megatron.core.__version__), megatron.core.__version__
    assert is_supported("0.16.1") and is_supported("0.19.2+535396a") and not is_supported("0.17.0")


def test_version_mismatch_warns(monkeypatch):
    import megatron.core

    from megatron_patches import _compat

    monkeypatch.setattr(megatron.core, "__version__", "0.0.1")
    monkeypatch.setattr(_compat, "_checked", False)
    with pytest.warns(RuntimeWarning, match="supports megatron-core 0.16.1 and 0.19 but found 0.0.1"):
        _compat.check_megatron_core_version()


def test_checkpoint_writer_without_psutil_raises_instead_of_hanging(monkeypatch):
    """The cause of the reported save hang: megatron-core's writer processes need psutil."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from megatron_patches.checkpointing import check_checkpoint_writer

    check_checkpoint_writer()  # psutil is installed here
    monkeypatch.setattr(filesystem_async, "HAVE_PSUTIL", False)
    with pytest.raises(RuntimeError, match="psutil"):
        filesystem_async._process_memory()  # what each writer process calls first, outside its try
    with pytest.raises(ImportError, match="hangs after writing common.pt"):
        check_checkpoint_writer()
