"""Pretrain a hybrid GPT with lasp2 on megatron-core's own training machinery.

    torchrun --nproc_per_node 2 -m megatron_patches.pretrain_gpt --context-parallel-size 2 \\
        --hybrid-layer-pattern LLLN --sp-provider lasp2 --train-iters 20 --save ckpt
    lasp2-pretrain-gpt ...                                  # the same, as a console script

Nothing here is a training loop of its own making: the steps run through
megatron-core's `get_forward_backward_func` (no pipelining, 1F1B, interleaved
virtual stages), gradients through Megatron's `DistributedDataParallel` (or its FSDP2
wrapper, `--use-torch-fsdp2`) and `finalize_model_grads`, the update through
`get_megatron_optimizer` (Adam / SGD, `--use-distributed-optimizer`, bf16 master
weights), checkpoints through
`dist_checkpointing` (loadable at another TP x PP x CP x DP layout), data through
megatron-core's GPT dataset (`MockGPTDataset` unless `--data-path` names an
indexed dataset). Arguments use Megatron-LM's names. `--sp-provider
lasp2|lasp1|ulysses|none` is the one lasp2 flag; the rest of the lasp2 group
(megatron_patches.arguments) has defaults. megatron-core's own gated DeltaNet hybrid
(Qwen3-Next's layout) takes megatron-core's flags instead of `--hybrid-layer-pattern`:
`--experimental-attention-variant gated_delta_net --linear-attention-freq N` (its
GatedDeltaNet layers as megatron_patches.core_gdn.Lasp2CoreGatedDeltaNet). `--num-experts` and
Megatron-LM's other MoE flags (megatron_patches.moe) put megatron-core's MoELayer in every
layer, its experts spread over `--expert-model-parallel-size` ranks.

Each step logs one line: iteration, loss, learning rate, grad norm, tokens/s and,
on GPUs, model TFLOP/s per GPU. The command line and its checks: megatron_patches.launcher_args.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from functools import partial
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_patches.launcher_args import CORE_GDN_SIZES, build_parser, lasp2_options, parse_args
from megatron_patches.moe import (check_moe_world, moe_aux_losses, moe_config_kwargs, moe_spec_kwargs,
                                  reset_moe_aux_losses)
from megatron_patches.options import SOFTMAX, Lasp2ConfigError, Lasp2Options

__all__ = ["build_parser", "main", "parse_args", "pretrain"]


# -- set-up -----------------------------------------------------------------------------------


def _log(text: str):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(text, flush=True)


def initialize(args) -> None:
    """Process group, Megatron's parallel state (TP, PP, virtual PP, CP, EP), seeds."""
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    if not dist.is_initialized():
        if args.device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(args.distributed_backend)
    if args.device == "cpu":
        from megatron_patches.cpu import enable_cpu_execution

        enable_cpu_execution()
    world = dist.get_world_size()
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world % (tp * pp * cp):
        raise SystemExit(f"world size {world} is not divisible by TP x PP x CP = {tp * pp * cp}")
    check_moe_world(args, world)
    args.data_parallel_size = world // (tp * pp * cp)
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % per_step:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} is not divisible by micro batch x DP "
                         f"= {per_step}")
    args.num_microbatches = args.global_batch_size // per_step
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        per_stage = args.num_layers_per_virtual_pipeline_stage * pp
        if pp < 2 or args.num_layers % per_stage:
            raise SystemExit(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage} "
                             f"needs --pipeline-model-parallel-size > 1 and --num-layers {args.num_layers} "
                             f"divisible by it x {pp}")
        args.virtual_pipeline_model_parallel_size = args.num_layers // per_stage
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
                                 context_parallel_size=cp,
                                 expert_model_parallel_size=args.expert_model_parallel_size,
                                 # gloo copies of the groups only where the main backend is not gloo
                                 create_gloo_process_groups=args.distributed_backend != "gloo")
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)


def transformer_config(args):
    from megatron.core.transformer.transformer_config import TransformerConfig

    dtype = torch.bfloat16 if args.bf16 else torch.float32
    kwargs = dict(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        sequence_parallel=args.sequence_parallel and args.tensor_model_parallel_size > 1,
        normalization=args.normalization, init_method_std=args.init_method_std,
        add_bias_linear=not args.disable_bias_linear,
        params_dtype=dtype, bf16=args.bf16, pipeline_dtype=dtype, autocast_dtype=dtype,
        hidden_dropout=0.0, attention_dropout=0.0,
        use_cpu_initialization=True,  # the same weights for every layout: checkpoints and tests compare
        calculate_per_token_loss=args.calculate_per_token_loss,
        recompute_granularity=args.recompute_granularity,
        gradient_accumulation_fusion=False, masked_softmax_fusion=False, bias_activation_fusion=False,
        apply_rope_fusion=False, bias_dropout_fusion=False,
    )
    core_gdn = {k: getattr(args, k) for k in CORE_GDN_SIZES if getattr(args, k) is not None}
    kwargs.update(core_gdn)
    kwargs.update(moe_config_kwargs(args))
    if args.recompute_granularity == "full":
        kwargs.update(recompute_method="uniform", recompute_num_layers=1)
    if args.virtual_pipeline_model_parallel_size and args.distributed_backend == "gloo":
        # Interleaved stages over 2 pipeline ranks send to "next" and "prev", the same rank, in
        # one step: batched into one batch_isend_irecv, gloo matches the two messages between
        # the pair in posting order, and the sender posts (grad to prev, activation to next)
        # while the receiver posts (activation from prev, grad from next): the tensors swap
        # silently. Megatron's unbatched p2p path sends the two directions over two groups.
        kwargs["batch_p2p_comm"] = False
    if args.experimental_attention_variant:
        # megatron-core's config check of this variant refuses CP > 1; Lasp2CoreGatedDeltaNet
        # runs these layers, so its own check stands in for that one (core_gdn_config)
        from megatron_patches.core_gdn_config import allow_core_gdn_context_parallel

        allow_core_gdn_context_parallel()
        kwargs.update(experimental_attention_variant=args.experimental_attention_variant,
                      linear_attention_freq=args.linear_attention_freq)
    return TransformerConfig(**kwargs)


def build_model(args, config, options: Lasp2Options) -> List[torch.nn.Module]:
    """One GPTModel per virtual stage of this pipeline rank, each wrapped in Megatron's DDP
    (or, with --use-torch-fsdp2, its TorchFullyShardedDataParallel)."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel

    from megatron_patches.specs import get_lasp2_core_gdn_block_spec, get_lasp2_hybrid_block_spec

    backend = "te" if args.transformer_impl == "transformer_engine" else "local"
    vpp = args.virtual_pipeline_model_parallel_size or 1
    chunks = []
    for vp_stage in range(vpp):
        stage = vp_stage if args.virtual_pipeline_model_parallel_size else None
        pre = ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage)
        post = ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage)
        if config.experimental_attention_variant:
            spec = get_lasp2_core_gdn_block_spec(config, options, vp_stage=stage, backend=backend,
                                                 **moe_spec_kwargs(args))
        else:
            spec = get_lasp2_hybrid_block_spec(config, options, backend, vp_stage=stage, **moe_spec_kwargs(args))
        model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab_size,
                         max_sequence_length=args.max_position_embeddings, pre_process=pre, post_process=post,
                         position_embedding_type=args.position_embedding_type,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                         vp_stage=stage)
        if args.device == "cuda":
            model.cuda(torch.cuda.current_device())
        chunks.append(model)
    if args.use_torch_fsdp2:
        from megatron_patches.torch_fsdp import wrap_torch_fsdp2

        return [wrap_torch_fsdp2(config, chunk) for chunk in chunks]
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16, overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                    disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)]


def build_optimizer(args, chunks):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    # Under --use-torch-fsdp2 the optimizer's parameters are FSDP2's fp32 shards, with --bf16 too
    # (megatron_patches.torch_fsdp: bf16 in the forward only): they are the main parameters that
    # DDP's bf16 optimizer (Float16OptimizerWithFloat16Params) keeps besides its bf16 ones, so
    # megatron-core's FP32Optimizer steps them (neither loss-scales bf16)
    bf16_params = args.bf16 and not args.use_torch_fsdp2
    config = OptimizerConfig(
        optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, sgd_momentum=args.sgd_momentum, clip_grad=args.clip_grad,
        bf16=bf16_params, params_dtype=torch.bfloat16 if bf16_params else torch.float32,
        use_distributed_optimizer=args.use_distributed_optimizer)
    return get_megatron_optimizer(config, chunks, use_gloo_process_groups=args.distributed_backend != "gloo")


# -- data ---------------------------------------------------------------------------------------


class _MockTokenizer:
    """What megatron-core's GPT dataset reads of a tokenizer (vocab size and end-of-document)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eod = vocab_size - 1
        self.pad = -1
        self.unique_identifiers = {"class": "lasp2-mock", "vocab_size": vocab_size}  # dataset cache key


def build_dataset(args):
    """megatron-core's GPTDataset: MockGPTDataset, or the indexed dataset at --data-path."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset

    mock = not args.data_path
    config = GPTDatasetConfig(
        random_seed=args.seed, sequence_length=args.seq_length, blend=None if mock else (args.data_path, None),
        split=None if mock else args.split, tokenizer=_MockTokenizer(args.vocab_size), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False,
        path_to_cache=None)
    samples = args.train_iters * args.global_batch_size
    cls = MockGPTDataset if mock else GPTDataset
    train, _, _ = BlendedMegatronDatasetBuilder(cls, [samples, None, None], lambda: True, config).build()
    return train


def data_iterator(args, dataset, start_iteration: int):
    """Micro-batches of this data-parallel rank, from the global sample index of each step
    (the same samples whatever the layout: DP rank r takes the r-th slice of each batch)."""
    from megatron.core import parallel_state as ps

    dp_rank = ps.get_data_parallel_rank()
    mb, gbs = args.micro_batch_size, args.global_batch_size
    per_rank = gbs // args.data_parallel_size
    for iteration in range(start_iteration, args.train_iters):
        base = iteration * gbs + dp_rank * per_rank
        for m in range(args.num_microbatches):
            samples = [dataset[base + m * mb + i] for i in range(mb)]
            yield {k: torch.stack([torch.as_tensor(s[k]) for s in samples])
                   for k in ("tokens", "labels", "loss_mask", "position_ids")}


# -- the step -----------------------------------------------------------------------------------


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Megatron-LM's GPT loss protocol: (sum of this rank's token losses, its token count,
    a [sum, count] report that the schedule averages over micro-batches)."""
    losses = output_tensor.float().reshape(-1)
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(losses * mask)
    tokens = mask.sum().to(torch.int)
    return loss, tokens, {"lm loss": torch.stack([loss.detach().clone(), mask.sum()])}


def make_forward_step(options: Lasp2Options, device):
    from megatron_patches.batch import get_batch_on_this_sp_rank

    def forward_step(data_iterator, model):
        batch = next(data_iterator) if data_iterator is not None else None
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        local = get_batch_on_this_sp_rank(batch, split=options.split)  # this CP rank's tokens
        output = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
        return output, partial(loss_func, local["loss_mask"])

    return forward_step


def _reduce_lm_loss(reports: List[Dict[str, torch.Tensor]], device) -> float:
    """The global token-mean loss of the step (last pipeline stage: sum over micro-batches and
    the dp x cp group; then broadcast over the pipeline)."""
    from megatron.core import parallel_state as ps

    total = torch.zeros(2, dtype=torch.float64, device=device)
    for report in reports:
        total += report["lm loss"].to(device=device, dtype=torch.float64)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        dist.all_reduce(total, group=ps.get_data_parallel_group(with_context_parallel=True))
    dist.all_reduce(total, group=ps.get_pipeline_model_parallel_group())  # only the last stage is nonzero
    return (total[0] / total[1]).item()


def _flops_per_step(args) -> float:
    """Model FLOPs of one step: 6 x (parameters touched per token) x tokens, plus the quadratic
    attention term of the softmax layers (6 x 2 x s x h per token and layer, causal: halved)."""
    h, l, v, s = args.hidden_size, args.num_layers, args.vocab_size, args.seq_length
    ffn = args.ffn_hidden_size
    if args.num_experts is not None:  # each token passes topk experts, the router and the shared experts
        ffn = args.moe_router_topk * (args.moe_ffn_hidden_size or ffn) + args.num_experts / 2
        ffn += args.moe_shared_expert_intermediate_size or 0
        ffn += 0.5 if args.moe_shared_expert_gate else 0  # its gate: one h-vector, as the router's E
    dense = l * (4 * h * h + 2 * h * ffn) + v * h
    options = lasp2_options(args)
    softmax_layers = options.pattern_for(l).count(SOFTMAX)
    tokens = args.global_batch_size * s
    return 6.0 * dense * tokens + 6.0 * softmax_layers * s * h * tokens


# -- checkpoints --------------------------------------------------------------------------------


def _tracker(path: str) -> str:
    return os.path.join(path, "latest_checkpointed_iteration.txt")


def _is_fsdp2(chunks) -> bool:
    """Whether the chunks are --use-torch-fsdp2's (megatron_patches.torch_fsdp)."""
    from megatron_patches.torch_fsdp import is_torch_fsdp2

    return any(is_torch_fsdp2(chunk) for chunk in chunks)


def _sharded_state(chunks, optimizer, iteration: int, is_loading: bool):
    from megatron.core import parallel_state as ps

    fsdp2 = _is_fsdp2(chunks)
    if fsdp2:
        from megatron_patches.fsdp2_checkpoint import use_the_shard_itself_for_optimizer_state

        use_the_shard_itself_for_optimizer_state()

    # the expert-parallel size the optimizer state was laid out for (moe_checkpoint.optimizer_layout_changes)
    state = {"iteration": iteration, "expert_model_parallel_size": ps.get_expert_model_parallel_world_size()}
    if optimizer is not None:  # checked at --load (checkpointing.check_optimizer_kind)
        from megatron_patches.checkpointing import main_params, optimizer_kind

        state["optimizer_kind"] = optimizer_kind(optimizer)
        state["main_params"] = main_params(optimizer)  # checked at --load (checkpointing.check_main_params)
    if len(chunks) == 1:
        state["model"] = chunks[0].module.sharded_state_dict()
        model_state = state["model"]
    else:
        # nested, not merged: the chunks' state dicts share their local keys (each chunk's layers
        # are numbered from 0; the ShardedTensors inside carry the global names), so a merge kept
        # the last chunk's entries only and the optimizer found no ShardedTensor for the others'
        # parameters ("Param id 3 does not match any model sharded param" at every VPP save)
        for i, chunk in enumerate(chunks):
            state[f"model{i}"] = chunk.module.sharded_state_dict()
        model_state = {f"model{i}": state[f"model{i}"] for i in range(len(chunks))}
    if fsdp2:  # before the optimizer's state takes the model's offsets
        from megatron_patches.fsdp2_checkpoint import place_fsdp2_shards

        place_fsdp2_shards(model_state, [chunk.module for chunk in chunks])
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading,
            metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    return state


def save_checkpoint(path: str, iteration: int, chunks, optimizer) -> str:
    """A dist_checkpointing checkpoint of model and optimizer at <path>/iter_<N>, loadable at
    another TP x PP x CP x DP layout; <path>/latest_checkpointed_iteration.txt names it."""
    from megatron.core import dist_checkpointing

    from megatron_patches.checkpointing import check_checkpoint_writer

    check_checkpoint_writer()
    directory = os.path.join(path, f"iter_{iteration:07d}")
    if dist.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    dist.barrier()
    dist_checkpointing.save(_sharded_state(chunks, optimizer, iteration, False), directory)
    dist.barrier()
    if dist.get_rank() == 0:
        with open(_tracker(path), "w") as f:
            f.write(str(iteration))
    dist.barrier()
    return directory


def _sgd_state(optimizer, config=None) -> None:
    """SGD's state as a checkpoint holds it: a momentum buffer per parameter where momentum
    is on, nothing otherwise (megatron-core gives SGD no init_state_fn, and its optimizer's
    sharded_state_dict calls one when loading: "'NoneType' object is not callable")."""
    for group in optimizer.param_groups:
        if group.get("momentum", 0):
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p.data))


def _init_optimizer_state(optimizer) -> None:
    """Gives a fresh optimizer the state entries a loaded checkpoint fills in (the
    distributed optimizer's state dict reads Adam's "step" of every parameter; SGD gets
    the init_state_fn megatron-core leaves None)."""
    from megatron_patches.checkpointing import sub_optimizers

    for opt in sub_optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, torch.optim.SGD) and getattr(opt, "init_state_fn", None) is None:
            opt.init_state_fn = _sgd_state
            continue
        if not isinstance(inner, torch.optim.Adam) and not isinstance(inner, torch.optim.AdamW):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                if not inner.state[p]:
                    inner.state[p] = {"step": torch.zeros((), dtype=torch.float32),
                                      "exp_avg": torch.zeros_like(p.data), "exp_avg_sq": torch.zeros_like(p.data)}


def load_checkpoint(path: str, chunks, optimizer, iteration: Optional[int] = None) -> int:
    """Loads the checkpoint of `iteration` (default: the latest) under path; returns its
    iteration (0 if there is none)."""
    from megatron.core import dist_checkpointing

    if iteration is None:
        if not os.path.exists(_tracker(path)):
            _log(f"no checkpoint under {path}: starting from scratch")
            return 0
        with open(_tracker(path)) as f:
            iteration = int(f.read().strip())
    directory = os.path.join(path, f"iter_{iteration:07d}")
    remap = False  # the optimizer state crosses EP 1 | EP > 1 (megatron_patches.moe_checkpoint)
    if optimizer is not None:
        from megatron.core import parallel_state as ps

        from megatron_patches.moe_checkpoint import optimizer_layout_changes

        saved = dist_checkpointing.load_common_state_dict(directory)
        remap = optimizer_layout_changes(saved.get("expert_model_parallel_size"),
                                         ps.get_expert_model_parallel_world_size(), optimizer)
        from megatron_patches.checkpointing import check_main_params, check_optimizer_kind

        check_optimizer_kind(saved.get("optimizer_kind"), optimizer)  # after the EP check: its message is more specific
        check_main_params(saved.get("main_params"), _is_fsdp2(chunks) and chunks[0].config.bf16)
        _init_optimizer_state(optimizer)
    sharded = _sharded_state(chunks, optimizer, iteration, True)
    if remap:
        from megatron_patches.moe_checkpoint import rekey_optimizer_state

        rekey_optimizer_state(sharded["optimizer"], directory)
    state = dist_checkpointing.load(sharded, directory)
    fsdp2 = _is_fsdp2(chunks)
    if fsdp2:  # FSDP2's parameters are DTensors; the checkpoint gave this rank's shards
        from megatron_patches.fsdp2_checkpoint import optimizer_state_as_dtensors, shards_as_dtensors
    for i, chunk in enumerate(chunks):
        model_state = state["model"] if len(chunks) == 1 else state[f"model{i}"]
        chunk.module.load_state_dict(shards_as_dtensors(model_state, chunk.module) if fsdp2 else model_state)
    if optimizer is not None:
        if remap:
            from megatron_patches.moe_checkpoint import state_in_current_layout

            state["optimizer"] = state_in_current_layout(state["optimizer"], saved["optimizer"], optimizer)
        optimizer.load_state_dict(state["optimizer"])
        from megatron_patches.checkpointing import own_step_count_per_parameter

        own_step_count_per_parameter(optimizer)  # the distributed optimizer shares one step tensor
        if fsdp2:
            optimizer_state_as_dtensors(optimizer)
    _log(f"loaded {directory} (iteration {iteration})")
    return iteration


# -- training -----------------------------------------------------------------------------------


def pretrain(args, after_model_build=None) -> Dict[str, object]:
    """Builds everything and trains; returns the per-step losses, the per-step MoE
    load-balancing losses (aux_losses: a dict per step, None where there is none), the last
    iteration, the model chunks and the optimizer. after_model_build(chunks), if given, runs before the
    optimizer is built (tests set weights there)."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_patches._compat import apply_megatron_core_fixes

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    apply_megatron_core_fixes()
    reset_moe_aux_losses()
    initialize(args)
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else torch.device("cpu")
    options = lasp2_options(args)
    if options.split == "contiguous" and args.position_embedding_type == "rope":
        from megatron_patches.rope import use_lasp2_rope

        use_lasp2_rope("contiguous")  # Megatron slices RoPE for its zig-zag (= balanced) layout
    config = transformer_config(args)
    chunks = build_model(args, config, options)
    if after_model_build is not None:
        after_model_build(chunks)
    optimizer = build_optimizer(args, chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [c.no_sync for c in chunks] if len(chunks) > 1 else chunks[0].no_sync
    config.grad_scale_func = optimizer.scale_loss
    if args.save:  # fail now, not after training, if the checkpoint writer cannot run here
        from megatron_patches.checkpointing import check_checkpoint_writer

        check_checkpoint_writer()
        if _is_fsdp2(chunks):  # megatron-core's offsets of the FSDP2 shards (refused before training)
            _sharded_state(chunks, None, 0, False)
    iteration = load_checkpoint(args.load, chunks, optimizer, args.ckpt_step) if args.load else 0
    dataset = build_dataset(args)
    iterators = [data_iterator(args, dataset, iteration) for _ in chunks]
    forward_step = make_forward_step(options, device)
    forward_backward = get_forward_backward_func()
    # under FSDP2 a parameter is a DTensor: this rank holds its local shard
    n_params = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for c in chunks for p in c.parameters())
    _log(f"lasp2-pretrain-gpt: world {dist.get_world_size()} = TP {args.tensor_model_parallel_size} x PP "
         f"{args.pipeline_model_parallel_size}{' (virtual ' + str(args.virtual_pipeline_model_parallel_size) + ')' if args.virtual_pipeline_model_parallel_size else ''}"
         f" x CP {args.context_parallel_size} x DP {args.data_parallel_size}; pattern "
         f"{options.pattern_for(args.num_layers)}, sp-provider {options.provider}, split {options.split}; "
         f"{args.transformer_impl} spec, {'bf16' if args.bf16 else 'fp32'}, "
         f"{'distributed ' if args.use_distributed_optimizer else ''}{args.optimizer}"
         f"{', FSDP2 over dp-cp' if args.use_torch_fsdp2 else ''}"
         f"{_moe_summary(args)}; "
         f"rank 0 holds {n_params / 1e6:.2f} M parameters")
    losses, aux_losses = [], []
    flops = _flops_per_step(args)
    while iteration < args.train_iters:
        start = time.perf_counter()
        for chunk in chunks:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        reports = forward_backward(
            forward_step_func=forward_step, data_iterator=iterators if len(chunks) > 1 else iterators[0],
            model=chunks, num_microbatches=args.num_microbatches, seq_length=args.seq_length,  # Megatron divides by CP
            micro_batch_size=args.micro_batch_size, forward_only=False)
        ok, grad_norm, _ = optimizer.step()
        if not ok:
            raise RuntimeError(f"iteration {iteration + 1}: the optimizer step was skipped (inf/nan gradients)")
        if device.type == "cuda":
            torch.cuda.synchronize()
        loss = _reduce_lm_loss(reports, device)
        aux = moe_aux_losses(args)  # a collective: every rank, every step
        elapsed = time.perf_counter() - start
        iteration += 1
        losses.append(loss)
        aux_losses.append(aux)
        if iteration % args.log_interval == 0:
            tokens_per_s = args.global_batch_size * args.seq_length / elapsed
            line = (f"iteration {iteration:6d}/{args.train_iters} | lm loss {loss:.6f} | lr {args.lr:.3g} | "
                    f"grad norm {grad_norm:.4f} | {elapsed * 1000:.1f} ms | tokens/s {tokens_per_s:,.0f}")
            line += "".join(f" | {name} {value:.6f}" for name, value in (aux or {}).items())
            if device.type == "cuda":
                line += f" | TFLOP/s per GPU {flops / elapsed / dist.get_world_size() / 1e12:.1f}"
            _log(line)
        if args.save and args.save_interval and iteration % args.save_interval == 0 \
                and iteration < args.train_iters:
            _log(f"saved {save_checkpoint(args.save, iteration, chunks, optimizer)}")
    if args.save:
        _log(f"saved {save_checkpoint(args.save, iteration, chunks, optimizer)}")
    return {"losses": losses, "aux_losses": aux_losses, "iteration": iteration, "chunks": chunks,
            "optimizer": optimizer}


def _moe_summary(args) -> str:
    if args.num_experts is None:
        return ""
    return (f", MoE {args.num_experts} experts top-{args.moe_router_topk} over EP "
            f"{args.expert_model_parallel_size} ({args.moe_token_dispatcher_type}, "
            f"{args.moe_router_load_balancing_type} x {args.moe_aux_loss_coeff:g})"
            + (f" + shared experts of {args.moe_shared_expert_intermediate_size}"
               + (" (gated)" if args.moe_shared_expert_gate else "")
               if args.moe_shared_expert_intermediate_size else ""))


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    try:
        pretrain(args)
    except Lasp2ConfigError as exc:
        print(f"lasp2-pretrain-gpt: {exc}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
