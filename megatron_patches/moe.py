"""The launcher's mixture-of-experts flags (megatron_patches.pretrain_gpt): Megatron-LM's names
and defaults, the checks every rank runs on them before any process group or model exists,
what they set in megatron-core's TransformerConfig, and the load-balancing loss line of the log.

The MoE layer itself is megatron-core's (MoELayer: TopKRouter, token dispatcher, SequentialMLP
of local experts, and with --moe-shared-expert-intermediate-size its SharedExpertMLP, which the
local and TE layer specs of megatron-core already carry as MoESubmodules.shared_experts and
MoELayer builds only when the config has the size; --moe-shared-expert-gate gives it its sigmoid
gate_weight); expert parameters are reduced over the expert-data-parallel group by
megatron-core's DDP and stepped by get_megatron_optimizer's expert optimizer, both of which
find them by their `allreduce = False` attribute. Nothing here changes that machinery; under
--use-torch-fsdp2 megatron_patches.torch_fsdp shards them over the same group."""

from __future__ import annotations

import argparse
from typing import Dict, Optional

from megatron_patches.options import Lasp2ConfigError

__all__ = ["DISPATCHERS", "LOAD_BALANCING", "add_moe_args", "check_moe_args", "check_moe_world",
           "moe_config_kwargs", "moe_spec_kwargs", "moe_aux_losses", "reset_moe_aux_losses"]

# megatron-core 0.16's dispatchers; "flex" (MoEFlexTokenDispatcher) runs only on GPUs with DeepEP
# installed (_check_flex_dispatcher)
DISPATCHERS = ("allgather", "alltoall", "flex")
# megatron-core's load-balancing types (TopKRouter)
LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none")


def add_moe_args(parser: argparse.ArgumentParser) -> None:
    """Megatron-LM's MoE flags, with its defaults."""
    g = parser.add_argument_group("mixture of experts (megatron-core's MoELayer in every layer)")
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (default: dense MLP)")
    g.add_argument("--moe-router-topk", type=int, default=2, help="experts each token is routed to")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert FFN size (default --ffn-hidden-size)")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="softmax before the top-k (megatron-core needs it for --moe-router-topk 1)")
    g.add_argument("--moe-token-dispatcher-type", choices=DISPATCHERS, default="allgather",
                   help="megatron-core's dispatchers (on CPU alltoall runs through megatron_patches.cpu; "
                        "flex needs --device cuda and DeepEP)")
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING, default="aux_loss")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="scale of the load-balancing loss added to the gradient (Megatron-LM suggests 1e-2)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="FFN size of the shared experts every token passes through besides its routed ones "
                        "(DeepSeek / Qwen-MoE; several shared experts: their sizes summed; default: none)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared experts' output per token by a learned sigmoid gate "
                        "(Qwen-MoE's; megatron-core's SharedExpertMLP gate_weight)")
    g.add_argument("--moe-shared-expert-overlap", action="store_true",
                   help="run the shared experts on a side CUDA stream during the alltoall dispatch "
                        "(the alltoall dispatcher only; on CPU the same steps run in order)")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="ranks the experts of a layer are spread over (within the data x context parallel ranks)")


def _flag(dest: str) -> str:
    return "--" + dest.replace("_", "-")


def check_moe_args(args) -> None:
    """The checks that need only the command line (parse time, the same on every rank)."""
    if args.num_experts is None:
        moe_only = [d for d, default in (("moe_ffn_hidden_size", None), ("moe_router_pre_softmax", False),
                                         ("moe_shared_expert_intermediate_size", None),
                                         ("moe_shared_expert_gate", False), ("moe_shared_expert_overlap", False))
                    if getattr(args, d) != default]
        if args.expert_model_parallel_size != 1:
            moe_only.insert(0, "expert_model_parallel_size")
        if moe_only:
            raise Lasp2ConfigError(f"{_flag(moe_only[0])} needs --num-experts (no MoE layer without it)")
        return
    experts, topk, ep = args.num_experts, args.moe_router_topk, args.expert_model_parallel_size
    if experts < 1:
        raise Lasp2ConfigError(f"--num-experts must be >= 1, got {experts}")
    if not 1 <= topk <= experts:
        raise Lasp2ConfigError(f"--moe-router-topk {topk} must be between 1 and --num-experts {experts}")
    if ep < 1 or experts % ep:
        raise Lasp2ConfigError(f"--num-experts {experts} must be divisible by --expert-model-parallel-size {ep} "
                               "(each expert-parallel rank holds the same number of experts)")
    if args.moe_ffn_hidden_size is not None and args.moe_ffn_hidden_size < 1:
        raise Lasp2ConfigError(f"--moe-ffn-hidden-size must be >= 1, got {args.moe_ffn_hidden_size}")
    _check_shared_experts(args)
    if args.moe_token_dispatcher_type == "flex":
        _check_flex_dispatcher(args)
    if args.moe_aux_loss_coeff < 0:
        raise Lasp2ConfigError(f"--moe-aux-loss-coeff must be >= 0, got {args.moe_aux_loss_coeff}")
    if (topk == 1 and not args.moe_router_pre_softmax
            and args.moe_router_load_balancing_type != "sinkhorn"):  # megatron-core's config refuses it
        raise Lasp2ConfigError("--moe-router-topk 1 needs --moe-router-pre-softmax (a softmax over one "
                               "selected expert has a zero gradient)")
    if not args.disable_bias_linear and args.transformer_impl == "local":
        # megatron-core 0.16.1's expert MLP adds its fc2 bias in place to the output of the
        # row-parallel reduce, which autograd refuses ("a view ... modified inplace")
        raise Lasp2ConfigError("--num-experts with the local spec needs --disable-bias-linear (megatron-core's "
                               "expert MLP cannot add a linear bias there; Megatron-LM's MoE models run "
                               "without biases)")
    if args.tensor_model_parallel_size > 1 and not args.sequence_parallel:
        # megatron-core's MoELayer raises at the first training step otherwise, naming no flag
        raise Lasp2ConfigError(f"--tensor-model-parallel-size {args.tensor_model_parallel_size} with --num-experts "
                               "needs --sequence-parallel (megatron-core's MoE layer trains at TP > 1 only with "
                               "Megatron's sequence parallelism)")


def _check_shared_experts(args) -> None:
    size = args.moe_shared_expert_intermediate_size
    if size is not None and size < 1:
        raise Lasp2ConfigError(f"--moe-shared-expert-intermediate-size must be >= 1, got {size}")
    if args.moe_shared_expert_gate and size is None:  # megatron-core would ignore it silently
        raise Lasp2ConfigError("--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size "
                               "(there is no shared expert to gate)")
    if not args.moe_shared_expert_overlap:
        return
    if size is None:
        raise Lasp2ConfigError("--moe-shared-expert-overlap needs --moe-shared-expert-intermediate-size "
                               "(there is no shared expert to overlap)")
    if args.moe_token_dispatcher_type != "alltoall":  # megatron-core's config refuses it, naming no flag
        raise Lasp2ConfigError("--moe-shared-expert-overlap needs --moe-token-dispatcher-type alltoall "
                               f"(megatron-core overlaps only that dispatcher), got {args.moe_token_dispatcher_type}")


def _check_flex_dispatcher(args) -> None:
    """megatron-core's flex dispatcher, refused up front where it cannot run: megatron-core itself
    fails only when the first MoE layer is built (ImportError, or an assertion naming no flag), on
    the pipeline stages that build one, while the others wait in their first receive."""
    flag = "--moe-token-dispatcher-type flex"
    if args.device != "cuda":
        # its dispatch and combine are DeepEP's (or HybridEP's) fused CUDA kernels, with no CPU path
        raise Lasp2ConfigError(f"{flag} needs --device cuda: megatron-core's MoEFlexTokenDispatcher dispatches "
                               "through DeepEP's fused CUDA kernels, which have no CPU path; on CPU use "
                               "--moe-token-dispatcher-type alltoall (megatron-core's all-to-all, the same routing)")
    from megatron.core.transformer.moe import fused_a2a

    if not getattr(fused_a2a, "HAVE_DEEP_EP", False):  # megatron-core's default flex backend, "deepep"
        raise Lasp2ConfigError(f"{flag} needs DeepEP (the deep_ep package, github.com/deepseek-ai/DeepEP), which "
                               "does not import here; without it use --moe-token-dispatcher-type alltoall")
    if args.tensor_model_parallel_size * args.expert_model_parallel_size == 1:
        raise Lasp2ConfigError(f"{flag} needs --tensor-model-parallel-size x --expert-model-parallel-size > 1 "
                               "(megatron-core's flex dispatcher exchanges tokens over that group; at 1 use allgather)")


def check_moe_world(args, world: int) -> None:
    """megatron-core's expert layout: the expert groups are cut from the world in blocks of
    expert-TP (= TP here) x EP x PP ranks, so that product must divide the world size. Checked
    from the world size, which every rank knows, before initialize_model_parallel."""
    ep = args.expert_model_parallel_size
    if ep == 1:
        return
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world % (tp * ep * pp):
        raise Lasp2ConfigError(
            f"--expert-model-parallel-size {ep} x --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp} = {tp * ep * pp} must divide the world size {world} "
            "(megatron-core's expert-parallel groups)")


def moe_config_kwargs(args) -> Dict[str, object]:
    """TransformerConfig fields of the MoE flags (empty for a dense model)."""
    if args.num_experts is None:
        return {}
    return dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        expert_model_parallel_size=args.expert_model_parallel_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=args.moe_shared_expert_gate,
        moe_shared_expert_overlap=args.moe_shared_expert_overlap,
        moe_grouped_gemm=False,  # SequentialMLP: the local experts one after another (no grouped GEMM)
    )


def moe_spec_kwargs(args) -> Dict[str, object]:
    """The layer-spec arguments of the MoE MLP (get_gpt_layer_local_spec / the TE spec)."""
    return {} if args.num_experts is None else {"num_experts": args.num_experts, "moe_grouped_gemm": False}


def reset_moe_aux_losses() -> None:
    """Empties megatron-core's process-wide load-balancing-loss tracker: an earlier run in this
    process (tests run several) leaves its entries, holding that run's process groups."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    get_moe_layer_wise_logging_tracker().clear()


def moe_aux_losses(args) -> Optional[Dict[str, float]]:
    """The step's load-balancing losses as Megatron-LM logs them (training_log via megatron-core's
    track_moe_metrics): per layer, summed over the tensor x context parallel ranks (each holds a
    part of a micro-batch's tokens), averaged over micro-batches and data-parallel ranks, then
    averaged over the MoE layers; without the coefficient. A collective over the pipeline, data
    and context parallel groups: every rank calls it after each step. The tracker is cleared.
    None for a dense model or when no load-balancing loss is computed (coefficient 0)."""
    if args.num_experts is None:
        return None
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker, track_moe_metrics

    if not get_moe_layer_wise_logging_tracker():
        return None
    totals: Dict[str, object] = {}
    track_moe_metrics(loss_scale=1.0 / args.num_microbatches, iteration=0, total_loss_dict=totals,
                      num_layers=args.num_layers)
    return {name: float(value) for name, value in totals.items()}
