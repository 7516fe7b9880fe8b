"""Guards for megatron-core's distributed checkpoints: the writer before a save, the expert layout at a load.

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

from typing import Optional

from megatron_patches.options import Lasp2ConfigError

__all__ = ["check_checkpoint_writer", "check_expert_layout"]


def check_checkpoint_writer() -> None:
    """Raises ImportError (instead of a later hang) if megatron-core's checkpoint writer
    processes cannot run here."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        raise ImportError(
            "dist_checkpointing.save needs psutil (pip install psutil): without it megatron-core's "
            "writer processes die before reporting and the save hangs after writing common.pt")


def check_expert_layout(saved_ep: Optional[int], ep: int) -> None:
    """An MoE checkpoint's optimizer state loads only where the expert parameters sit in the
    same optimizer layout. megatron-core's get_megatron_optimizer puts expert parameters into a
    second, expert optimizer only at EP > 1 (there they are marked allreduce = False); its
    ChainedOptimizer then names their state "chained_0." / "chained_1.", a single optimizer
    (EP 1) names it without the prefix. Loading across that boundary raised a KeyError on some
    ranks only, and the others hung in the load's collectives (measured: CP 2 x EP 2 -> CP 1 x
    EP 1). Refused here, on every rank alike, from the checkpoint's common state. saved_ep is
    None for checkpoints written before it was recorded (not checked). Called only for a load
    with an optimizer: the model's expert weights reshard across any EP."""
    if saved_ep is None or (saved_ep > 1) == (ep > 1):
        return
    raise Lasp2ConfigError(
        f"--load: this MoE checkpoint was saved at --expert-model-parallel-size {saved_ep}, loading it at "
        f"--expert-model-parallel-size {ep} is not supported: megatron-core keeps expert parameters in a "
        "separate optimizer only at EP > 1, so the optimizer state does not match; resume at EP 1 from an "
        "EP 1 checkpoint and at any EP > 1 (dividing --num-experts) from an EP > 1 one")
