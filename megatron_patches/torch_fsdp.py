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

With MoE at `--expert-model-parallel-size` > 1 ranks of different EP ranks hold different
experts under the same parameter names, so the experts cannot be sharded over dp-cp with the
rest (megatron-core's class does that: its all-gather mixed the EP ranks' experts, step-1
loss 4.308 instead of 4.295, no error). Each MoE layer's `experts` module (the parameters
megatron-core marks `allreduce = False`, which its DDP reduces over the expert-data-parallel
group) becomes an FSDP2 unit of its own over that group, made before the per-layer units,
which then leave its parameters to it. The gradient math is DDP's: it scales every gradient
by 1 / dp-cp size and sums, the dense ones over dp-cp, the expert ones over the smaller
expert-dp group (an expert's gradient already holds the tokens that every EP rank
dispatched to it). So the expert units sum (divide factor 1, ReduceOp.SUM), and
`finish_grad_sync`, which finalize_model_grads calls after the last micro-batch, multiplies
their shards by 1 / dp-cp size (not FSDP2's divide factor: a factor other than the mesh
size is a PREMUL_SUM, which gloo lacks, and forced to a sum torch 2.13 divides by it twice
on a 1-rank mesh, the expert-dp group at EP = dp x cp: measured, weights 0.058 off). Under
`--calculate-per-token-loss` every unit sums and `scale_gradients` divides by the tokens,
as above. FSDP2 drops parameters' attributes; megatron-core's class restores those it saw,
which for the expert units were already gone, so `allreduce = False` is put back here: by it
get_megatron_optimizer steps the experts in its expert optimizer, whose gradient norm is
summed over the EP ranks (without it megatron-core's norm asserts on DTensor gradients of
two meshes in one optimizer). At EP 1 megatron-core marks no parameter and nothing changes.

Several models in one process (a training and an evaluation model, a rebuild, the tests' several
launcher runs): torch's DTensor sharding-propagation cache (2.13: a Python lru_cache and the C++
dispatch fast path's) is keyed by DeviceMesh equality, which compares rank layouts, not process
groups, so fully_shard's `nn.Parameter(dtensor)` (an aten.detach) of a shape an earlier model had
came out with that model's mesh: equal, but naming the earlier group. megatron-core's gradient
norm then asserted on two groups in one optimizer; after the world is destroyed and initialized
again (the launcher's main() twice) the old mesh's group name resolves to whichever new group has
that name (measured with plain fully_shard on 2 ranks: a 1-rank group, a sum over it 1 instead
of 2 on rank 0, silently). So
wrap_torch_fsdp2 clears the cache before sharding and refuses a parameter whose mesh is not its
FSDP2 unit's (`_check_parameter_meshes`). Not covered: a model still used after the next one is
built can get the newer, equal mesh on its ops' outputs (both groups alive, over the same ranks).

Two further megatron-core 0.16.1 details are handled here:
  * finalize_model_grads calls `finish_grad_sync(force_all_reduce=...)`, which
    TorchFullyShardedDataParallel (its base class) does not accept: a TypeError after the
    first backward. FSDP2 has already reduce-scattered the gradients in backward, so
    there is nothing to finish but the expert scaling above.
  * Only the transformer layers are wrapped as their own FSDP units; the embedding and
    the output layer stay in the root unit. With tied embeddings the output layer reads
    the embedding's weight: in a separate unit that weight is resharded (a DTensor) by
    the time the output layer runs ("got mixed torch.Tensor and DTensor"). Wrapping
    ColumnParallelLinear by class, megatron-core's default, would also wrap the layers'
    own projections a second time.
On CPU (gloo) the class builds its DeviceMesh on "cuda": megatron_patches.cpu's
`torch_fsdp_mesh` patch builds it on "cpu" (the experts' mesh is made by the same
constructor, so it follows).
--save / --load: megatron-core's dist_checkpointing of the model's FSDP2 shards, with the fixes
in megatron_patches.fsdp2_checkpoint; the files are DDP's, so either loads the other's.
With TP > 1 each TP rank's parameters (its parts of the tensor-parallel weights) are sharded
over its own dp-cp group, as megatron-core's class does; PP (and VPP) wraps each model chunk
as an FSDP2 root of its own, and finalize_model_grads sums the tied embedding's gradient over
the first and last stage (it unshards DTensor gradients for that). One thing TP needs here:
lasp2's mixers sum the gradient of a parameter that heads split over TP share (a norm scale)
over TP with a hook on the parameter (megatron_patches.common.sum_grad_over_tp); fully_shard
replaces the parameter, so the hook never runs, and finish_grad_sync sums those gradient
shards over TP instead (they shard alike on every TP rank).
--bf16 (wrap_torch_fsdp2 with config.bf16): FSDP2 trains as megatron-core's DDP with --bf16 does.
That one (the launcher builds the model in bf16, params_dtype; Megatron-LM's Float16Module does the
same) computes with bf16 parameters, accumulates each micro-batch's bf16 gradient in an fp32
main_grad and all-reduces it in fp32 (grad_reduce_in_fp32), and Float16OptimizerWithFloat16Params
steps fp32 copies of the bf16 parameters, rounding them back to bf16 after each step; the parameters
the model builds in fp32 (torch's RMSNorm weights of the local spec, lasp2's fixed decays) stay fp32
throughout. megatron-core's FSDP2 class (0.16.1, 0.19) gives fully_shard no MixedPrecisionPolicy:
Megatron-LM shards the bf16 parameters themselves, so FSDP2 reduce-scatters the gradients in bf16
and keeps them in bf16 across micro-batches (FSDP2 casts a reduced gradient back to its shard's
dtype), and the fp32 main parameters are copies of the shards; on this model fully_shard also
refuses the mix of bf16 and fp32 gradients in one unit. Here the fp32 shards *are* the main
parameters: each bf16 parameter becomes fp32 (exactly the DDP optimizer's first main copy) before
sharding, and every unit gets MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): the forward
and backward see bf16 parameters as under DDP (the all-gather casts, rounding as DDP's copy back
does), each micro-batch's bf16 gradient is cast to fp32 before the reduce-scatter and accumulated in
the fp32 shard, and megatron-core's FP32Optimizer steps the fp32 shards (pretrain_gpt.build_optimizer;
bf16 has no loss scale in either). cast_forward_inputs is off: DDP casts no input (RoPE's fp32
frequencies reach the layers as they are). The parameters built in fp32 keep fp32: a frozen one
(the fixed decays) is left out of FSDP2 (ignored_params: replicated, no gradient, as under DDP); a
module holding a trained one (an RMSNorm) becomes a unit of its own without a cast, made before the
unit it lies in. A module holding a trained fp32 parameter beside bf16 ones cannot get both (one
policy a unit) and is refused, naming both (lasp2's linear attention with
--linear-attention-learnable-decay and its output norm). Measured on the CPU
(test_megatron_fsdp2_bf16.py): with one micro-batch a step, or a 1-rank mesh, losses and fp32
weights equal DDP --bf16's exactly; accumulating micro-batches, FSDP2 adds reduced gradients where
DDP reduces the sum, an fp32 rounding apart, which bf16 rounding of the weights then spreads (on
the CPU's gloo: equal too; with gradient clipping the norm of shards and of whole tensors differ
in the last bit, spread the same way). At TP > 1 the head-shared scales summed over TP (above)
are summed in fp32 here, where DDP's hook sums their bf16 gradient in bf16.
Refused (check_torch_fsdp2_args): the distributed optimizer, which shards DDP's gradient buffers
(FSDP2 has none, and already shards the optimizer state).
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["check_torch_fsdp2_args", "is_torch_fsdp2", "wrap_torch_fsdp2"]


def check_torch_fsdp2_args(args) -> None:
    """Refuses what cannot go with --use-torch-fsdp2 (the distributed optimizer); TP, PP (with VPP),
    CP, EP, checkpoints and --bf16 (wrap_torch_fsdp2's mixed precision) are tested."""
    if args.use_distributed_optimizer:
        # megatron-core's DistributedOptimizer partitions DDP's contiguous gradient buffers
        # (model_chunk.buffers), which FSDP2 does not have; Megatron-LM refuses the pair too
        raise SystemExit("--use-torch-fsdp2 and --use-distributed-optimizer exclude each other: megatron-core's "
                         "distributed optimizer shards DDP's gradient buffers, which FSDP2 has none of, and FSDP2 "
                         "already shards the parameters, gradients and optimizer state over dp-cp (drop "
                         "--use-distributed-optimizer)")


def is_torch_fsdp2(chunk) -> bool:
    """Whether a model chunk is wrapped by wrap_torch_fsdp2 (megatron-core's FSDP2 class)."""
    from megatron.core.distributed import TorchFullyShardedDataParallel

    return isinstance(chunk, TorchFullyShardedDataParallel)


def wrap_torch_fsdp2(config, module: torch.nn.Module, process_group=None) -> torch.nn.Module:
    """`module` (a GPTModel) sharded with FSDP2 over `process_group` (default: megatron-core's
    dp-cp group; the tests pass the dp group to show that CP must be in it), one unit per
    transformer layer and, at EP > 1, one per MoE layer's experts over the expert-data-parallel
    group. With config.bf16 (the model built in bf16) the units get DDP --bf16's mixed precision:
    fp32 shards, bf16 compute, fp32 reduction (_Bf16MixedPrecisionSharding, module docstring)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallelConfig, TorchFullyShardedDataParallel
    from megatron.core.transformer.transformer_layer import TransformerLayer
    from torch.distributed.fsdp import fully_shard

    class Lasp2TorchFullyShardedDataParallel(TorchFullyShardedDataParallel):
        expert_units: tuple = ()  # set below
        expert_gradient_scale = 1.0

        def finish_grad_sync(self, *args, **kwargs):
            """FSDP2 reduced the gradients during backward (see the module docstring); the expert
            units summed theirs, which DDP scales by 1 / dp-cp size (mean loss): done here, once
            per step, after the last micro-batch's backward."""
            if self.expert_gradient_scale != 1.0:
                for unit in self.expert_units:
                    _scale_local_gradients(unit, self.expert_gradient_scale)
            _sum_head_shared_gradients_over_tp(self.module)

        def scale_gradients(self, scaling_factor) -> None:
            """finalize_model_grads' 1 / (tokens of the global batch) under --calculate-per-token-loss
            (a 0-dim tensor): applied to this rank's shard of every gradient."""
            _scale_local_gradients(self.module, scaling_factor)

    if process_group is None:
        process_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    attributes = {name: dict(vars(param)) for name, param in module.named_parameters()}
    _forget_cached_meshes()  # an earlier model's, of the same ranks (see the module docstring)
    shard = _Bf16MixedPrecisionSharding(module) if config.bf16 else fully_shard  # fp32: no mixed-precision policy
    expert_units = _shard_experts_over_expert_data_parallel(module, shard)  # before the layers' units contain them
    with _megatron_core_sharding_with(shard):
        wrapped = Lasp2TorchFullyShardedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(),
                                                     module=module, sub_modules_to_wrap={TransformerLayer},
                                                     process_group=process_group)
    # megatron-core's class puts back the attributes FSDP2 drops (allreduce = False, by which
    # get_megatron_optimizer puts the experts in its expert optimizer, whose gradient norm is
    # summed over the EP ranks), but it saved them after the expert units had dropped theirs
    for name, param in wrapped.module.named_parameters():
        for attribute, value in attributes[name].items():
            setattr(param, attribute, value)
    _check_parameter_meshes(wrapped.module)
    wrapped.expert_units = tuple(expert_units)
    if config.calculate_per_token_loss:
        _sum_gradients_over_the_mesh(wrapped.module, "--use-torch-fsdp2 with --calculate-per-token-loss")
    elif expert_units:
        # an expert gradient summed over the expert-dp ranks already holds every dp x cp rank's
        # tokens (the dispatcher's backward brought them), so DDP's 1 / dp-cp size is its mean;
        # FSDP2's own average would divide by the smaller expert-dp size
        for unit in expert_units:
            _sum_gradients_over_the_mesh(unit, "--use-torch-fsdp2 with --expert-model-parallel-size > 1")
        wrapped.expert_gradient_scale = 1.0 / parallel_state.get_data_parallel_group(with_context_parallel=True).size()
    return wrapped


def _is_expert_parallel(param) -> bool:
    """megatron-core's mark of a parameter held by one expert-parallel rank only (set at EP > 1;
    at EP 1 its experts are ordinary data-parallel parameters, as for its DDP)."""
    return not getattr(param, "allreduce", True)


def _shard_experts_over_expert_data_parallel(module: torch.nn.Module, shard) -> list:
    """Each MoE layer's expert module (SequentialMLP) as an FSDP2 unit over megatron-core's
    expert-data-parallel group, the ranks holding the same experts; the per-layer units made
    afterwards leave the parameters of these units to them. None at EP 1. Returns the units.
    `shard`: fully_shard, or _Bf16MixedPrecisionSharding's (under --bf16)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import torch_fully_sharded_data_parallel
    from megatron.core.transformer.moe.moe_layer import MoELayer

    units = [layer.experts for layer in module.modules() if isinstance(layer, MoELayer)
             and any(_is_expert_parallel(param) for param in layer.experts.parameters())]
    if not units:
        return []
    in_units = {id(param) for unit in units for param in unit.parameters()}
    stray = [name for name, param in module.named_parameters()
             if _is_expert_parallel(param) != (id(param) in in_units)]
    if stray:  # an expert parameter outside MoELayer.experts, or a data-parallel one inside it
        raise SystemExit(f"--use-torch-fsdp2: {stray[0]} is not sharded over its data-parallel group (an "
                         "expert-parallel parameter outside an MoE layer's experts, or the other way round)")
    # megatron-core's own mesh constructor, which enable_cpu_execution puts on the CPU
    mesh = torch_fully_sharded_data_parallel.DeviceMesh.from_group(
        parallel_state.get_expert_data_parallel_group(), "cuda")
    for unit in units:
        shard(unit, mesh=mesh, reshard_after_forward=True)
    return units


@contextlib.contextmanager
def _megatron_core_sharding_with(shard):
    """megatron-core's class (0.16.1 and 0.19) calls its module's `fully_shard(sub_module, mesh=...,
    reshard_after_forward=...)` and takes no mixed-precision policy of its own: while it builds
    the units, that name is `shard`."""
    from megatron.core.distributed import torch_fully_sharded_data_parallel as core_fsdp

    original = core_fsdp.fully_shard
    core_fsdp.fully_shard = shard
    try:
        yield
    finally:
        core_fsdp.fully_shard = original


class _Bf16MixedPrecisionSharding:
    """fully_shard for a model that --bf16 built (megatron-core's params_dtype bf16), with DDP
    --bf16's arithmetic (see the module docstring): its bf16 parameters become fp32 (exactly: the
    DDP optimizer's first main parameters) and are sharded with param_dtype bf16, reduce_dtype
    fp32; the parameters the model built in fp32 stay fp32 in the forward, as under DDP: a frozen
    one (lasp2's fixed decays) is left out of FSDP2, replicated as DDP leaves it, and the module
    that holds a trained one (torch's RMSNorm of the local spec) becomes a unit of its own
    without a cast, made before the unit it lies in. cast_forward_inputs off: DDP casts no
    input (RoPE's fp32 frequencies reach the layers as they are)."""

    def __init__(self, model: torch.nn.Module):
        from torch.distributed.fsdp import MixedPrecisionPolicy

        names = {id(param): name for name, param in model.named_parameters()}
        params = list(model.parameters())  # each once (a tied embedding is one parameter)
        self.ignored = {p for p in params if p.dtype == torch.float32 and not p.requires_grad}
        trained_fp32 = {id(p) for p in params if p.dtype == torch.float32 and p.requires_grad}
        self.fp32_units = []
        for owner_name, owner in model.named_modules():
            own = [p for p in owner.parameters(recurse=False) if p not in self.ignored]
            if not any(id(p) in trained_fp32 for p in own):
                continue
            mixed = [p for p in own if id(p) not in trained_fp32]
            if mixed:  # one policy a unit: one of the two would be computed in the other's dtype
                fp32 = next(p for p in own if id(p) in trained_fp32)
                raise SystemExit(
                    f"--use-torch-fsdp2 with --bf16: {owner_name or 'the model'} holds the trained fp32 parameter "
                    f"{names[id(fp32)]} next to the {mixed[0].dtype} {names[id(mixed[0])]}; FSDP2's mixed "
                    "precision is one policy per module, so one of them would not be computed in the dtype DDP "
                    "--bf16 computes it in (drop --use-torch-fsdp2, or the flag that trains that parameter)")
            self.fp32_units.append(owner)
        with torch.no_grad():
            for param in params:
                if param.dtype == torch.bfloat16:
                    param.data = param.data.float()  # the same Parameter: its attributes stay
        self.bf16_compute = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                                                 cast_forward_inputs=False)
        self.fp32_compute = MixedPrecisionPolicy(cast_forward_inputs=False)
        self._sharded = set()

    def __call__(self, module: torch.nn.Module, **kwargs):
        from torch.distributed.fsdp import fully_shard

        inside = {id(m) for m in module.modules()}
        for unit in self.fp32_units:
            if id(unit) in inside and id(unit) not in self._sharded:
                if unit is module:
                    raise SystemExit(f"--use-torch-fsdp2 with --bf16: {type(module).__name__} holds trained fp32 "
                                     "parameters directly and is an FSDP2 unit of bf16 parameters too")
                fully_shard(unit, mp_policy=self.fp32_compute, ignored_params=self.ignored, **kwargs)
                self._sharded.add(id(unit))
        return fully_shard(module, mp_policy=self.bf16_compute, ignored_params=self.ignored, **kwargs)


def _sum_gradients_over_the_mesh(module: torch.nn.Module, flags: str) -> None:
    """Every FSDP unit under `module` (itself included) reduce-scatters gradients as a sum, not
    FSDP's default average; the division comes afterwards (scale_gradients, finish_grad_sync).
    Forcing ReduceOp.SUM keeps FSDP2 off PREMUL_SUM(1 / factor), which gloo lacks; with a
    factor of 1 nothing is divided after the reduction either (not even on a 1-rank mesh,
    where torch 2.13 divides by a factor twice)."""
    from torch.distributed.fsdp import FSDPModule

    if not hasattr(FSDPModule, "set_force_sum_reduction_for_comms"):
        raise SystemExit(f"{flags} needs FSDP2's set_gradient_divide_factor and set_force_sum_reduction_for_comms "
                         f"(torch 2.13 has them); torch {torch.__version__} lacks them")
    for unit in module.modules():  # each call sets only that unit's own parameter groups
        if isinstance(unit, FSDPModule):
            unit.set_gradient_divide_factor(1.0)
            unit.set_force_sum_reduction_for_comms(True)


def _sum_head_shared_gradients_over_tp(module: torch.nn.Module) -> None:
    """The gradients of the parameters that lasp2's mixers share between heads split over TP
    (megatron_patches.common.sum_grad_over_tp: a norm scale for every head) summed over their TP
    group. Under DDP a hook on the parameter does it; FSDP2 made a new (sharded) parameter, so
    the hook never runs. The TP ranks' FSDP2 meshes shard alike (rank i of each dp-cp group holds
    the same rows), so the local shards are summed, after FSDP2's reduction over dp-cp: the two
    sums commute, as do finalize_model_grads' later scalings."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    from megatron_patches.common import GRAD_SUMMED_OVER_TP

    by_group = {}
    for param in module.parameters():
        group = getattr(param, GRAD_SUMMED_OVER_TP, None)
        if group is not None and param.grad is not None:
            by_group.setdefault(group, []).append(param)
    with torch.no_grad():
        for group, params in by_group.items():  # the same parameters, in the same order, on every TP rank
            shards = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
            summed = _flatten_dense_tensors(shards)
            torch.distributed.all_reduce(summed, group=group)
            for shard, value in zip(shards, _unflatten_dense_tensors(summed, shards)):
                shard.copy_(value)


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


def _forget_cached_meshes() -> None:
    """Clears torch's DTensor sharding-propagation caches, whose cached output specs hold the
    DeviceMesh of the first tensor that produced them: an equal mesh (same ranks) of an earlier
    model would otherwise be handed to this model's parameters. torch 2.13 exposes the clearing
    in torch.distributed.tensor.debug (private); without it _check_parameter_meshes still stops
    a stale mesh."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:
        return
    _clear_sharding_prop_cache()


def _param_groups(state) -> list:
    """An FSDP2 unit's parameter groups: torch 2.13 keeps a list (`_fsdp_param_groups`), torch
    2.11 (the GPU machine's) one group or None (`_fsdp_param_group`)."""
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is not None:
        return list(groups)
    group = getattr(state, "_fsdp_param_group", None)
    return [] if group is None else [group]


def _check_parameter_meshes(module: torch.nn.Module) -> None:
    """Every FSDP2 parameter's DTensor mesh is the very mesh of its unit (the one fully_shard was
    given, whose group FSDP2 reduces over); an equal mesh of an earlier model would send
    megatron-core's gradient norm and checkpoints to that model's process group."""
    from torch.distributed.fsdp import FSDPModule

    names = {id(param): name for name, param in module.named_parameters()}
    for unit in module.modules():
        if not isinstance(unit, FSDPModule):
            continue
        for group in _param_groups(unit._get_fsdp_state()):
            for fsdp_param in group.fsdp_params:
                if fsdp_param.sharded_param.device_mesh is not group.mesh_info.mesh:
                    name = names.get(id(fsdp_param.sharded_param), "a parameter")
                    raise SystemExit(f"--use-torch-fsdp2: {name} came out of fully_shard with another model's "
                                     "DeviceMesh (torch's DTensor sharding-propagation cache, keyed by mesh "
                                     "equality, was not cleared: megatron_patches/torch_fsdp.py)")
