"""`--use-torch-fsdp2` of the launcher: megatron-core's TorchFullyShardedDataParallel
(PyTorch FSDP2, `fully_shard`) in place of its DistributedDataParallel.

FSDP2 shards every parameter over megatron-core's data-parallel group *with* context
parallelism (dp-cp), as DDP reduces over it: lasp2's CP ranks hold parts of the same
sequences, so a parameter's gradient is the sum of its CP ranks' gradients. The
launcher's loss (Megatron-LM's three-value protocol) is each rank's mean over its own
tokens; with as many tokens on every rank the global mean is the average of the dp x cp
local means, which is what FSDP's averaging reduce-scatter (like DDP's) computes.

With `--calculate-per-token-loss` a rank's loss is the *sum* over its tokens instead, and
megatron-core's DDP sums the gradients over dp-cp; finalize_model_grads then calls
`scale_gradients(1 / tokens of the global batch)`. FSDP2 is made to do the same: its
reduce-scatter sums (divide factor 1, see `_sum_gradients_over_the_mesh`), and
`scale_gradients`, a no-op in megatron-core's FSDP2 class (0.16.1 and 0.19), multiplies
this rank's gradient shards.

Two further megatron-core 0.16.1 details are handled here:
  * finalize_model_grads calls `finish_grad_sync(force_all_reduce=...)`, which
    TorchFullyShardedDataParallel (its base class) does not accept: a TypeError after the
    first backward. FSDP2 has already reduce-scattered the gradients in backward, so
    there is nothing to finish.
  * Only the transformer layers are wrapped as their own FSDP units; the embedding and
    the output layer stay in the root unit. With tied embeddings the output layer reads
    the embedding's weight: in a separate unit that weight is resharded (a DTensor) by
    the time the output layer runs ("got mixed torch.Tensor and DTensor"). Wrapping
    ColumnParallelLinear by class, megatron-core's default, would also wrap the layers'
    own projections a second time.
On CPU (gloo) the class builds its DeviceMesh on "cuda": megatron_patches.cpu's
`torch_fsdp_mesh` patch builds it on "cpu".
"""

from __future__ import annotations

import torch

__all__ = ["check_torch_fsdp2_args", "wrap_torch_fsdp2"]


def check_torch_fsdp2_args(args) -> None:
    """Refuses the combinations the FSDP2 path has not been run with (or gets wrong)."""
    untested = {"--use-distributed-optimizer": args.use_distributed_optimizer,
                "--pipeline-model-parallel-size > 1": args.pipeline_model_parallel_size > 1,
                "--tensor-model-parallel-size > 1": args.tensor_model_parallel_size > 1,
                "--bf16": args.bf16, "--save": args.save is not None, "--load": args.load is not None}
    bad = [flag for flag, on in untested.items() if on]
    if bad:
        raise SystemExit(f"--use-torch-fsdp2 is tested with TP 1, PP 1, fp32, the plain optimizer and no "
                         f"checkpoints; not with {', '.join(bad)}")


def wrap_torch_fsdp2(config, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """`module` (a GPTModel) sharded with FSDP2 over `process_group` (default: megatron-core's
    dp-cp group; the tests pass the dp group to show that CP must be in it), one unit per
    transformer layer."""
    from megatron.core.distributed import DistributedDataParallelConfig, TorchFullyShardedDataParallel
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class Lasp2TorchFullyShardedDataParallel(TorchFullyShardedDataParallel):
        def finish_grad_sync(self, *args, **kwargs):
            """FSDP2 reduced the gradients during backward (see the module docstring)."""

        def scale_gradients(self, scaling_factor) -> None:
            """finalize_model_grads' 1 / (tokens of the global batch) under --calculate-per-token-loss
            (a 0-dim tensor): applied to this rank's shard of every gradient."""
            _scale_local_gradients(self.module, scaling_factor)

    wrapped = Lasp2TorchFullyShardedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(),
                                                 module=module, sub_modules_to_wrap={TransformerLayer},
                                                 process_group=process_group)
    if config.calculate_per_token_loss:
        _sum_gradients_over_the_mesh(wrapped.module)
    return wrapped


def _sum_gradients_over_the_mesh(module: torch.nn.Module) -> None:
    """Every FSDP unit under `module` reduce-scatters gradients as a sum, not FSDP's default
    average: a per-token loss is each rank's sum over its tokens, and the division by the
    global token count comes afterwards through scale_gradients (as with megatron-core's DDP,
    which does not average under --calculate-per-token-loss). Forcing ReduceOp.SUM keeps
    FSDP2 off PREMUL_SUM(1 / factor), which gloo lacks; with a factor of 1 nothing is
    divided after the reduction either."""
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise SystemExit("--use-torch-fsdp2 with --calculate-per-token-loss needs FSDP2's "
                         "set_gradient_divide_factor and set_force_sum_reduction_for_comms (torch 2.13 has "
                         f"them); torch {torch.__version__} lacks them")
    for unit in module.modules():  # each call sets only that unit's own parameter groups
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def _scale_local_gradients(module: torch.nn.Module, factor) -> None:
    """Multiplies each parameter's gradient by `factor` in place. FSDP2's gradients are
    DTensors: the local shard is scaled (DTensor arithmetic with a plain 0-dim tensor would
    mix the two kinds; under no_grad to_local() is the shard itself)."""
    with torch.no_grad():
        for param in module.parameters():
            grad = param.grad
            if grad is None:
                continue
            (grad.to_local() if hasattr(grad, "to_local") else grad).mul_(factor)
