"""MoE checkpoints resumed across EP 1 <-> EP > 1 (the launcher's --load, plain fp32 optimizer).

megatron-core 0.16.1's get_megatron_optimizer puts the expert parameters into a second, expert
optimizer only at EP > 1 (there they are marked allreduce = False). Its ChainedOptimizer then
saves optimizer i's state under "chained_i.optimizer.state.<name>.<parameter key>" and nests its
state dict as {i: optimizer i's}; at EP 1 the one optimizer's state is saved as
"optimizer.state.<name>.<parameter key>" and the state dict is that optimizer's own. The parameter
keys do not depend on EP (a layer's experts are one tensor over the global expert index, which
is how the model's weights already reshard from EP 2 to EP 4), so the tensors map one to one; what
differs is the "chained_i." prefix and the nesting of the rest (the step, the param groups).
Unmapped, the load raised a KeyError on some ranks and the others hung in its collectives.

Across that boundary the launcher's load
1. renames the loading optimizer's sharded tensors to the checkpoint's keys, found in the
   checkpoint's metadata by the key without the prefix (rekey_optimizer_state); every rank learns
   whether any rank lacks one before anything is read, and then all of them raise;
2. after dist_checkpointing.load, builds the state dict in the loading optimizer's nesting
   (state_in_current_layout): each sub-optimizer's loaded per-parameter state, the saved step
   (one for all: megatron-core keeps the chained optimizers' steps equal) and each param group's
   saved hyperparameters, found by (wd_mult, lr_mult, is_decoupled_lr); is_expert_parallel is
   the loading layout's.
Only megatron-core's FP32Optimizer is mapped. The distributed optimizer and the mixed-precision
ones keep more per-layout state (fp32 main parameters, the shard layout): across the boundary
they are refused, on every rank alike (the decision needs only the checkpoint's common state and
the command line).
"""

from __future__ import annotations

import copy
import re
from typing import Dict, List, Optional

import torch

from megatron_patches.checkpointing import first_error_on_any_rank, sub_optimizers
from megatron_patches.options import Lasp2ConfigError

__all__ = ["optimizer_layout_changes", "rekey_optimizer_state", "state_in_current_layout"]

_CHAINED = re.compile(r"^chained_\d+\.")
# what identifies a param group apart from is_expert_parallel (megatron-core's _get_param_groups)
_GROUP_KEYS = ("wd_mult", "lr_mult", "is_decoupled_lr")


def optimizer_layout_changes(saved_ep: Optional[int], ep: int, optimizer) -> bool:
    """Whether the checkpoint's optimizer state was laid out for the other side of EP 1 | EP > 1
    (then the load maps it); raises Lasp2ConfigError where it cannot be mapped. saved_ep is None
    for checkpoints written before it was recorded (not checked)."""
    if saved_ep is None or (saved_ep > 1) == (ep > 1):
        return False
    from megatron.core.optimizer.optimizer import FP32Optimizer

    unmapped = sorted({type(opt).__name__ for opt in sub_optimizers(optimizer) if not isinstance(opt, FP32Optimizer)})
    if unmapped:
        raise Lasp2ConfigError(
            f"--load: this MoE checkpoint was saved at --expert-model-parallel-size {saved_ep}; loading it at "
            f"--expert-model-parallel-size {ep} maps the optimizer state only for the plain fp32 optimizer, not "
            f"{', '.join(unmapped)} (--use-distributed-optimizer, --bf16 / --fp16): megatron-core keeps expert "
            "parameters in a separate optimizer only at EP > 1. Resume on the same side of EP 1 | EP > 1")
    return True


def _on_every_rank(what: str, fn, *args):
    """fn(*args) on this rank, as a collective: where it fails on any rank, every rank raises
    Lasp2ConfigError with the first failing rank's error (so that none goes on and waits in
    the next collective: the load's, or the first training step's)."""
    result, error = None, None
    try:
        result = fn(*args)
    except Exception as exc:  # reported on every rank below
        error = f"{type(exc).__name__}: {exc}"
    error = first_error_on_any_rank(error)
    if error is not None:
        raise Lasp2ConfigError(f"--load: cannot {what} this MoE checkpoint's optimizer state across "
                               f"--expert-model-parallel-size 1 | > 1 ({error})")
    return result


def rekey_optimizer_state(optimizer_sharded: Dict, directory: str) -> int:
    """Renames the sharded tensors of the loading optimizer's state dict (in place) to the keys
    the checkpoint at `directory` holds them under; returns how many. A collective: where any
    rank's tensor is missing from the checkpoint, every rank raises Lasp2ConfigError."""
    return _on_every_rank("map", _rekey, optimizer_sharded, directory)


def _rekey(optimizer_sharded: Dict, directory: str) -> int:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    saved: Dict[str, str] = {}
    for key in dist_checkpointing.load_tensors_metadata(directory):
        bare = _CHAINED.sub("", key)
        if bare in saved:
            raise ValueError(f"two tensors of the checkpoint map to {bare!r}: {saved[bare]!r}, {key!r}")
        saved[bare] = key
    renamed = 0
    for value in nested_values(optimizer_sharded):
        if isinstance(value, ShardedBase):
            bare = _CHAINED.sub("", value.key)
            if bare not in saved:
                raise KeyError(f"the checkpoint has no optimizer tensor {bare!r} (with or without a "
                               "chained_<i>. prefix)")
            value.key = saved[bare]
            renamed += 1
    return renamed


def _parts(state: Dict) -> List[Dict]:
    """A ChainedOptimizer state dict's per-optimizer parts: {0: .., 1: ..} nested, or one."""
    indices = sorted(k for k in state if isinstance(k, int))
    return [state[i] for i in indices] if indices else [state]


def state_in_current_layout(loaded: Dict, saved_common: Dict, optimizer) -> Dict:
    """The optimizer state dict, in `optimizer`'s nesting, from what dist_checkpointing.load
    returned for the renamed sharded state dict (`loaded`: the checkpoint's common part, nested
    as saved, merged with this optimizer's tensors and param lists, nested as here) and the
    checkpoint's common optimizer state (`saved_common`). A collective: where it fails on any
    rank (steps that differ, a param group the checkpoint lacks), every rank raises
    Lasp2ConfigError, so that none goes on to train and waits in the first step's collectives."""
    return _on_every_rank("rebuild", _state_in_current_layout, loaded, saved_common, optimizer)


def _state_in_current_layout(loaded: Dict, saved_common: Dict, optimizer) -> Dict:
    subs = sub_optimizers(optimizer)
    here = [loaded[i] for i in range(len(subs))] if len(subs) > 1 else [loaded]
    saved = _parts(saved_common)
    steps = [part["state"]["common_step"] for part in saved if "common_step" in part.get("state", {})]
    if any(not torch.equal(torch.as_tensor(s), torch.as_tensor(steps[0])) for s in steps):
        raise ValueError(f"the checkpoint's optimizers are at different steps: {steps}")
    saved_groups = [group for part in saved for group in part["param_groups"]]
    out = []
    for sub, part in zip(subs, here):
        state = {pid: value for pid, value in part.get("state", {}).items() if pid != "common_step"}
        if steps:
            state["common_step"] = copy.deepcopy(steps[0])
        groups = []
        for group, params in zip(sub.optimizer.param_groups, part["param_groups"]):
            match = [g for g in saved_groups if all(g.get(k) == group.get(k) for k in _GROUP_KEYS)]
            if not match:
                raise ValueError(f"the checkpoint has no param group with {[(k, group.get(k)) for k in _GROUP_KEYS]}")
            groups.append({**match[0], "is_expert_parallel": group["is_expert_parallel"], "params": params["params"]})
        out.append({"state": state, "param_groups": groups})
    return out[0] if len(out) == 1 else dict(enumerate(out))
