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


_FIXES_APPLIED = False


def apply_megatron_core_fixes() -> None:
    """Work-arounds for megatron-core bugs the launcher meets (idempotent).

    distributed optimizer, no Apex / TE (torch's Adam; every CPU run): loading a
    'fully_reshardable' checkpoint first gives each parameter's state the common "step"
    (distrib_optimizer.py, load_state_dict), then copies the checkpoint's per-parameter
    tensors over every state key, "step" included, which the checkpoint does not hold
    (_set_main_param_and_optimizer_states: KeyError 'step'). The step is kept as loaded.
    """
    global _FIXES_APPLIED
    if _FIXES_APPLIED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set_main_param_and_optimizer_states(self, model_param, tensors):
        if "step" not in tensors and not self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            group_index, group_order = self.model_param_group_index_map[model_param]
            main_param = self.optimizer.param_groups[group_index]["params"][group_order]
            step = self.optimizer.state.get(main_param, {}).get("step")
            if step is not None:
                tensors = {**tensors, "step": step}
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_main_param_and_optimizer_states
    _FIXES_APPLIED = True
