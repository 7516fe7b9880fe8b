"""`--use-torch-fsdp2` of the launcher: megatron-core's TorchFullyShardedDataParallel
(PyTorch FSDP2, `fully_shard`) in place of its DistributedDataParallel.

FSDP2 shards every parameter over megatron-core's data-parallel group *with* context
parallelism (dp-cp), as DDP reduces over it: lasp2's CP ranks hold parts of the same
sequences, so a parameter's gradient is the sum of its CP ranks' gradients. The
launcher's loss (Megatron-LM's three-value protocol) is each rank's mean over its own
tokens; with as many tokens on every rank the global mean is the average of the dp x cp
local means, which is what FSDP's averaging reduce-scatter (like DDP's) computes.

Two megatron-core 0.16.1 details are handled here:
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
                "--bf16": args.bf16, "--save": args.save is not None, "--load": args.load is not None,
                # finalize_model_grads divides by the token count through scale_gradients, a no-op in
                # megatron-core 0.16.1's FSDP2 class (and FSDP2 averages, DDP sums, per-token losses):
                # weights 175 off DDP's after one SGD step (session 19 audit)
                "--calculate-per-token-loss": args.calculate_per_token_loss}
    bad = [flag for flag, on in untested.items() if on]
    if bad:
        raise SystemExit(f"--use-torch-fsdp2 is tested with TP 1, PP 1, fp32, the plain optimizer and no "
                         f"checkpoints, the mean loss of each rank's tokens; not with {', '.join(bad)}")


def wrap_torch_fsdp2(config, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """`module` (a GPTModel) sharded with FSDP2 over `process_group` (default: megatron-core's
    dp-cp group; the tests pass the dp group to show that CP must be in it), one unit per
    transformer layer."""
    from megatron.core.distributed import DistributedDataParallelConfig, TorchFullyShardedDataParallel
    from megatron.core.transformer.transformer_layer import TransformerLayer

    class Lasp2TorchFullyShardedDataParallel(TorchFullyShardedDataParallel):
        def finish_grad_sync(self, *args, **kwargs):
            """FSDP2 reduced the gradients during backward (see the module docstring)."""

    return Lasp2TorchFullyShardedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(),
                                              module=module, sub_modules_to_wrap={TransformerLayer},
                                              process_group=process_group)
