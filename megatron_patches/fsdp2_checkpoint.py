"""Checkpoints (--save / --load) of the launcher's --use-torch-fsdp2 model (megatron_patches.torch_fsdp).

megatron-core's own path, with three fixes. It saves a TorchFullyShardedDataParallel model as it
saves its DDP's: the model's sharded_state_dict (make_sharded_tensor_for_checkpoint and the TP
variant take an FSDP2 parameter's local shard, its DTensor's `_local_tensor`, as a ShardedTensor
placed along dim 0), the optimizer's state derived from it, written by dist_checkpointing. The
files hold whole tensors under DDP's keys, so an FSDP2 checkpoint loads under DDP, at another
layout, and the other way round (test_megatron_fsdp2_checkpoint.py). What it gets wrong
(megatron-core 0.16.1, torch 2.13, CPU / gloo):
  1. the optimizer's parameters are matched to the model's ShardedTensors by identity of the
     local shard, which the optimizer side takes as `to_local()`: in torch 2.13 a new view, so
     nothing matched ("Param id 0 does not match any model sharded param", every save);
  2. SequentialMLP marks every expert tensor a replica over the expert-data-parallel group, and
     at EP > 1 the launcher shards the experts over that group, not dp-cp, while megatron-core
     places every shard by dp-cp rank and size (place_fsdp2_shards);
  3. dist_checkpointing.load gives each rank its shards as plain tensors, which the FSDP2
     module's load_state_dict rejects (a local shape against the DTensor's whole shape) and
     with which Adam's step then mixes DTensors and tensors ("aten.lerp_ got mixed torch.Tensor
     and DTensor"): they are made DTensors like their parameters (shards_as_dtensors,
     optimizer_state_as_dtensors).
A parameter whose dim 0 is not a multiple of its mesh size (FSDP2's torch.chunk leaves the last
shards shorter, a ShardedTensor's shards are a regular grid) cannot be placed: refused on every
rank (Lasp2ConfigError naming the flags and the parameter) at the start of a run with --save and
at --load, not after training.
"""

from __future__ import annotations

import torch

__all__ = ["optimizer_state_as_dtensors", "place_fsdp2_shards", "shards_as_dtensors",
           "use_the_shard_itself_for_optimizer_state"]

_PATCHED = False


def use_the_shard_itself_for_optimizer_state() -> None:
    """megatron-core maps the optimizer's parameters to the model's ShardedTensors by identity:
    the model side holds the DTensor's `_local_tensor`, the optimizer side `to_local()`, which in
    torch 2.13 is a new view of it (not the same object), so no parameter matched ("Param id 0
    does not match any model sharded param"). Both sides take `_local_tensor` (idempotent)."""
    global _PATCHED
    if _PATCHED:
        return
    from megatron.core.dist_checkpointing import optimizer as dist_optimizer
    from torch.distributed.tensor import DTensor

    original = dist_optimizer.to_local_if_dtensor

    def to_local_if_dtensor(tensor):
        return tensor._local_tensor if isinstance(tensor, DTensor) else original(tensor)

    dist_optimizer.to_local_if_dtensor = to_local_if_dtensor
    _PATCHED = True


def _fsdp2_parameters(modules) -> dict:
    """id(local shard) -> (name, DTensor parameter), over `modules`."""
    from torch.distributed.tensor import DTensor

    return {id(p._local_tensor): (name, p) for module in modules for name, p in module.named_parameters()
            if isinstance(p, DTensor)}


def _uneven(name: str, param):
    """Why megatron-core's ShardedTensor cannot describe this FSDP2 shard (None where it can):
    FSDP2 cuts dim 0 like torch.chunk, so unless dim 0 is a multiple of the mesh size the last
    shards are shorter or empty, and a ShardedTensor's shards are a regular grid."""
    size = param.device_mesh.size()
    if param.dim() == 0 or param.shape[0] % size:
        return f"{name}: dim 0 of {tuple(param.shape)} is not a multiple of its FSDP2 mesh's {size} ranks"
    return None


def _tensor_parallel_blocks_of_dim_0(param) -> tuple:
    """(TP size, TP rank) of a parameter that tensor parallelism splits along dim 0 (a
    column-parallel weight, a head-sharded vector): its rows are block `TP rank` of `TP size` of
    the whole tensor's. (1, 0) for any other parameter. Experts (allreduce = False) are split
    over the expert-TP group, the rest over the TP group."""
    from megatron.core import parallel_state

    if not getattr(param, "tensor_model_parallel", False) or getattr(param, "partition_dim", None) != 0:
        return 1, 0
    group = (parallel_state.get_tensor_model_parallel_group() if getattr(param, "allreduce", True)
             else parallel_state.get_expert_tensor_parallel_group())
    return group.size(), group.rank()


def place_fsdp2_shards(model_state: dict, modules) -> None:
    """Makes each ShardedTensor of `model_state` (megatron-core's model sharded_state_dict, in
    place) that holds an FSDP2 parameter's local shard say where that shard lies in the whole
    tensor, before the optimizer's state is derived from it; raises Lasp2ConfigError on every rank
    where that cannot be said.

    megatron-core (make_sharded_tensor_for_checkpoint) places the shard at (dp-cp rank) of
    (dp-cp size) along dim 0, with DP replica 0. Two cases differ: MoE experts, which
    SequentialMLP.sharded_state_dict marks as replicas over the expert-dp group (replica id =
    that rank), though FSDP2 gave each of those ranks a different shard (the checkpoint's
    validation then found rows nobody writes: "Invalid access pattern", raised on rank 0 alone,
    the others waiting), and at EP > 1 experts sharded over the expert-dp group (the launcher's
    units), not dp-cp, so the offset and the count are that mesh's. Each such ShardedTensor is
    given its parameter's mesh rank and size along dim 0 and replica 0; where tensor parallelism
    splits dim 0 too (a column-parallel weight), the shard lies in this TP rank's block of rows:
    block (TP rank x mesh size + mesh rank) of (TP size x mesh size). The prepended axes (the
    expert index) and the other dims (a row-parallel weight's TP split of dim 1) are kept."""
    import dataclasses

    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_patches.checkpointing import first_error_on_any_rank
    from megatron_patches.options import Lasp2ConfigError

    params = _fsdp2_parameters(modules)
    error = next((e for e in (_uneven(name, p) for name, p in params.values()) if e), None)
    placed = set()
    if error is None:
        for sh in nested_values(model_state):
            found = params.get(id(sh.data)) if isinstance(sh, ShardedTensor) else None
            if found is None:
                continue
            name, param = found
            size, rank = param.device_mesh.size(), param.device_mesh.get_local_rank()
            tp_size, tp_rank = _tensor_parallel_blocks_of_dim_0(param)
            n = sh.prepend_axis_num
            rows = param.shape[0]  # this TP rank's rows, FSDP2's whole tensor
            # dim 0: this TP rank's block of rows, and this FSDP2 shard within it; the other dims
            # (a row-parallel weight's TP split of dim 1) as megatron-core placed them
            placed_sh = dataclasses.replace(
                sh, global_shape=(*sh.global_shape[:n], rows * tp_size, *sh.global_shape[n + 1:]),
                global_offset=(*sh.global_offset[:n], tp_rank * rows + rank * (rows // size),
                               *sh.global_offset[n + 1:]),
                axis_fragmentations=(*sh.axis_fragmentations[:n], tp_size * size, *sh.axis_fragmentations[n + 1:]),
                replica_id=(*sh.replica_id[:-1], 0) if isinstance(sh.replica_id, tuple) else 0)
            try:  # raised on this rank alone it would leave the others waiting: reported below
                placed_sh.validate_metadata_integrity()
            except Exception as exc:
                error = f"{name}: {exc}"
                break
            sh.global_shape, sh.global_offset = placed_sh.global_shape, placed_sh.global_offset
            sh.axis_fragmentations, sh.replica_id = placed_sh.axis_fragmentations, placed_sh.replica_id
            placed.add(id(sh.data))
        missing = [name for key, (name, _) in params.items() if key not in placed]
        if missing and error is None:  # saved from a copy (a full tensor, a clone): its place is not known here
            error = f"{missing[0]}: not in the model's sharded state dict as its FSDP2 shard"
    error = first_error_on_any_rank(error)
    if error is not None:
        raise Lasp2ConfigError(f"--use-torch-fsdp2 with --save / --load: megatron-core cannot place this "
                               f"model's shards in a checkpoint ({error})")


def shards_as_dtensors(loaded: dict, module) -> dict:
    """The model state dist_checkpointing.load returned (each FSDP2 parameter as this rank's
    local shard, a plain tensor) with those shards made DTensors like their parameters, so that
    the FSDP2 module's load_state_dict copies them shard to shard."""
    from torch.distributed.tensor import DTensor

    current = module.state_dict(keep_vars=True)
    out = dict(loaded)
    for key, value in loaded.items():
        param = current.get(key)
        if isinstance(param, DTensor) and not isinstance(value, DTensor):
            out[key] = DTensor.from_local(value.to(param.dtype), param.device_mesh, param.placements,
                                          shape=param.shape, stride=param.stride())
    return out


def optimizer_state_as_dtensors(optimizer) -> None:
    """After optimizer.load_state_dict: each FSDP2 parameter's per-parameter state (Adam's
    moments, SGD's momentum: loaded as this rank's local shard, a plain tensor) made a DTensor
    like the parameter, as the optimizer's own state is; scalars (Adam's step) stay as they are."""
    from torch.distributed.tensor import DTensor

    from megatron_patches.checkpointing import sub_optimizers

    for sub in sub_optimizers(optimizer):
        inner = sub.optimizer
        for param, state in inner.state.items():
            if not isinstance(param, DTensor):
                continue
            for name, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.dim() > 0:
                    state[name] = DTensor.from_local(value, param.device_mesh, param.placements,
                                                     shape=param.shape, stride=param.stride())
