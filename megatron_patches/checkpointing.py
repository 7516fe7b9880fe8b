"""Guards for megatron-core's distributed checkpoints: the writer before a save, the kind of
optimizer a checkpoint was saved with at a load, Adam's step counts after a load (MoE checkpoints across EP 1 <-> EP > 1:
megatron_patches.moe_checkpoint; FSDP2's: megatron_patches.fsdp2_checkpoint).

The reported hang ("a dist-checkpoint save of a DDP-wrapped model after a training step
hung on CPU at CP 2 and PP 2 x CP 2, writing only common.pt") is megatron-core's writer
without psutil. dist_checkpointing.save writes common.pt from rank 0, then each rank
forks writer processes (FileSystemWriterAsync.write_preloaded_data_multiproc). Each
writer first calls _process_memory(), which raises when psutil is missing, *before* the
try block that reports a writer's error and marks its task done; the parent then waits
forever in count_queue.join(). Nothing about DDP, CP or PP: any save with tensors to
write hangs that way, and `pip install --no-deps megatron-core` does not bring psutil.
"""

from __future__ import annotations

from typing import List, Optional

__all__ = ["check_checkpoint_writer", "check_main_params", "check_optimizer_kind", "first_error_on_any_rank",
           "main_params", "optimizer_kind", "own_step_count_per_parameter", "sub_optimizers"]


def check_checkpoint_writer() -> None:
    """Raises ImportError (instead of a later hang) if megatron-core's checkpoint writer
    processes cannot run here."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        raise ImportError(
            "dist_checkpointing.save needs psutil (pip install psutil): without it megatron-core's "
            "writer processes die before reporting and the save hangs after writing common.pt")


def sub_optimizers(optimizer) -> list:
    """The optimizers megatron-core's get_megatron_optimizer chained (ChainedOptimizer: the dense
    and the expert one, ...), or [optimizer] where it made one."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_kind(optimizer) -> str:
    """"distributed" (--use-distributed-optimizer) or "plain": what a checkpoint records."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return "distributed" if any(isinstance(sub, DistributedOptimizer) for sub in sub_optimizers(optimizer)) else "plain"


def check_optimizer_kind(saved_kind, optimizer) -> None:
    """Raises Lasp2ConfigError where the checkpoint's optimizer state is the other kind's.

    The distributed optimizer's checkpoint ("fully_reshardable") holds fp32 main parameters
    under keys of its own, the plain optimizer's does not: loading one with the other raised a
    KeyError ("optimizer.state.param.<name> from model not in state dict") on every rank, whether
    the model was megatron-core's DDP or --use-torch-fsdp2. The decision needs only the
    checkpoint's common state and the command line, so every rank makes it alike. saved_kind is
    None for checkpoints written before it was recorded (not checked)."""
    from megatron_patches.options import Lasp2ConfigError

    kind = optimizer_kind(optimizer)
    if saved_kind is None or saved_kind == kind:
        return
    flag = "--use-distributed-optimizer"
    raise Lasp2ConfigError(
        f"--load: this checkpoint was saved {'with' if saved_kind == 'distributed' else 'without'} {flag}; "
        f"loading it {'with' if kind == 'distributed' else 'without'} {flag} is not supported (the distributed "
        f"optimizer keeps fp32 main parameters under keys of its own). Resume with the same {flag} setting")


def main_params(optimizer) -> str:
    """Where a checkpoint holds the fp32 main parameters: "optimizer" (megatron-core's bf16
    optimizer, DDP --bf16: bf16 weights, fp32 copies in the optimizer state) or "model" (the
    weights themselves: fp32 runs, and --use-torch-fsdp2 --bf16, whose fp32 shards are them)."""
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    subs = sub_optimizers(optimizer)
    return "optimizer" if any(isinstance(sub, Float16OptimizerWithFloat16Params) for sub in subs) else "model"


def check_main_params(saved: Optional[str], fsdp2_bf16: bool) -> None:
    """Raises Lasp2ConfigError where --use-torch-fsdp2 --bf16 (fp32 main parameters = its weights)
    would load a checkpoint of DDP --bf16, whose weights are the bf16 roundings of the fp32 main
    parameters kept in its optimizer state under keys FP32Optimizer does not read: the run would
    go on from rounded main parameters. saved is None for checkpoints written before it was
    recorded (not checked); other pairs are left to megatron-core."""
    from megatron_patches.options import Lasp2ConfigError

    if fsdp2_bf16 and saved == "optimizer":
        raise Lasp2ConfigError(
            "--load: this checkpoint was saved by DDP with --bf16 (bf16 weights, fp32 main parameters in its "
            "optimizer state); --use-torch-fsdp2 with --bf16 keeps the fp32 main parameters as its weights and "
            "would resume from their bf16 roundings. Resume it without --use-torch-fsdp2")


def first_error_on_any_rank(error: Optional[str]) -> Optional[str]:
    """The first rank's error message, on every rank (None where no rank has one): a collective,
    so that a check failing on some ranks raises on all of them and none waits in the next
    collective (the load's, or the first training step's)."""
    import torch.distributed as dist

    errors: List[Optional[str]] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return next((e for e in errors if e is not None), None)


def own_step_count_per_parameter(optimizer) -> None:
    """After optimizer.load_state_dict: every parameter's Adam "step" made a tensor of its own.
    megatron-core 0.16.1's DistributedOptimizer.load_state_dict (without Apex / Transformer
    Engine: torch's Adam) puts one and the same step tensor into every parameter's state, and
    torch's Adam adds 1 to each parameter's step in place, so the shared count grew by the number
    of parameters a step: a resume at step 2 took step 3 with a bias correction of step 15 (13
    parameters a rank), its weights 3.3e-3 off the uninterrupted run's while the loss, computed
    before the update, agreed. Harmless where the steps are already separate."""
    import torch

    for sub in sub_optimizers(optimizer):
        inner = getattr(sub, "optimizer", None)
        for state in getattr(inner, "state", {}).values():
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.clone()
