"""A guard for megatron-core's distributed checkpoints: the writer before a save (MoE checkpoints
across EP 1 <-> EP > 1: megatron_patches.moe_checkpoint).

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

__all__ = ["check_checkpoint_writer"]


def check_checkpoint_writer() -> None:
    """Raises ImportError (instead of a later hang) if megatron-core's checkpoint writer
    processes cannot run here."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if not getattr(filesystem_async, "HAVE_PSUTIL", True):
        raise ImportError(
            "dist_checkpointing.save needs psutil (pip install psutil): without it megatron-core's "
            "writer processes die before reporting and the save hangs after writing common.pt")
