"""The megatron-core versions this package is written against, and fixes for their bugs."""

from __future__ import annotations

import copy
import warnings

# megatron-core releases the patches are checked against: 0.16.1 (the last release for
# CPython 3.11) and 0.19.x (the current release; its wheels need CPython >= 3.12).
SUPPORTED_MEGATRON_CORE = ("0.16.1", "0.19")
PINNED_MEGATRON_CORE = SUPPORTED_MEGATRON_CORE[0]
_checked = False


def is_supported(version: str) -> bool:
    base = version.split("+", 1)[0]
    return any(base == v or base.startswith(v + ".") for v in SUPPORTED_MEGATRON_CORE)


def check_megatron_core_version() -> str:
    """Imports megatron.core; warns once if it is not a supported version."""
    global _checked
    try:
        import megatron.core as mcore
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "megatron_patches needs megatron-core: "
            f"pip install --no-deps megatron-core=={PINNED_MEGATRON_CORE} psutil "
            "(Python 3.11) or 'megatron-core==0.19.*' triton psutil (Python >= 3.12)") from exc
    found = getattr(mcore, "__version__", "unknown")
    if not _checked:
        _checked = True
        if not is_supported(found):
            warnings.warn(
                f"megatron_patches supports megatron-core {' and '.join(SUPPORTED_MEGATRON_CORE)} but found "
                f"{found}: the core-attention protocol, spec layout and CPU patches were checked against "
                "those only (see docs/megatron.md, 'Patch surface')",
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

    MoE without Transformer Engine (megatron-core 0.16.1): moe_utils imports its TE functions in
    a try block that leaves the names undefined when TE is missing, while the router's gating
    linear tests `te_general_gemm is not None` (NameError at the first MoE forward). The
    missing names are defined as None, the value the module's own checks expect.

    Megatron's sequence parallelism without Apex / TE (megatron-core 0.16.1; every CPU run):
    the local spec's norm (WrappedTorchNorm) asserts that config.sequence_parallel is off, so
    --sequence-parallel, which MoE at TP > 1 needs, could not build a model. A torch norm over a
    sequence shard computes what it computes over the whole sequence; what sequence parallelism
    needs is its weight's gradient summed over TP, which finalize_model_grads does for
    parameters marked sequence_parallel, as Apex's and TE's norms mark theirs. The norm is
    built as without sequence parallelism and its parameters are marked.
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
    _define_missing_moe_te_functions()
    _let_torch_norms_take_sequence_parallel()
    _FIXES_APPLIED = True


# the TE functions megatron-core's moe_utils imports in its try block
_MOE_TE_FUNCTIONS = ("fused_compute_score_for_moe_aux_loss", "fused_moe_aux_loss", "fused_permute",
                     "fused_permute_with_probs", "fused_sort_chunks_by_index",
                     "fused_sort_chunks_by_index_with_probs", "fused_topk_with_score_function",
                     "fused_unpermute", "te_general_gemm")


def _define_missing_moe_te_functions() -> None:
    from megatron.core.transformer.moe import moe_utils

    for name in _MOE_TE_FUNCTIONS:
        if not hasattr(moe_utils, name):
            setattr(moe_utils, name, None)


def _let_torch_norms_take_sequence_parallel() -> None:
    try:
        from megatron.core.transformer.torch_norm import WrappedTorchNorm
    except ImportError:  # a release without the wrapper has no such assertion to get past
        return
    original = WrappedTorchNorm.__new__

    def __new__(cls, *args, **kwargs):
        config = kwargs["config"] if "config" in kwargs else args[0]
        if not getattr(config, "sequence_parallel", False):
            return original(cls, *args, **kwargs)
        plain = copy.copy(config)  # the same config, but for the assertion's field
        plain.sequence_parallel = False
        if "config" in kwargs:
            kwargs["config"] = plain
        else:
            args = (plain, *args[1:])
        norm = original(cls, *args, **kwargs)
        for param in norm.parameters():
            param.sequence_parallel = True  # its gradient summed over TP (finalize_model_grads)
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)
