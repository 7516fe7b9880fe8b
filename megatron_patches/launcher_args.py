"""The launcher's command line (megatron_patches.pretrain_gpt): Megatron-LM's argument names,
the lasp2 group, megatron-core's gated DeltaNet flags, and the checks every rank runs on them
before anything is built (lasp2_options), so that a bad setting raises on every rank instead
of on the pipeline stages that happen to build the layer it concerns."""

from __future__ import annotations

import argparse
from typing import List, Optional

import torch

from megatron_patches.arguments import add_lasp2_args
from megatron_patches.moe import add_moe_args, check_moe_args
from megatron_patches.options import (GATED_DELTANET, GDN_PROVIDERS, KDA, LINEAR, Lasp2ConfigError, Lasp2Options,
                                      options_from_args)

__all__ = ["CORE_GDN_SIZES", "build_parser", "core_gdn_args", "lasp2_options", "parse_args"]


def build_parser() -> argparse.ArgumentParser:
    """Megatron-LM's names for what this launcher uses, plus the lasp2 group."""
    p = argparse.ArgumentParser(prog="lasp2-pretrain-gpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    m = p.add_argument_group("model")
    m.add_argument("--num-layers", type=_positive_int, default=4)
    m.add_argument("--hidden-size", type=_positive_int, default=64)
    m.add_argument("--ffn-hidden-size", type=_positive_int, default=None, help="default 4 x hidden size")
    m.add_argument("--num-attention-heads", type=_positive_int, default=4)
    m.add_argument("--group-query-attention", action="store_true")
    m.add_argument("--num-query-groups", type=_positive_int, default=None)
    m.add_argument("--seq-length", type=_positive_int, default=64)
    m.add_argument("--max-position-embeddings", type=_positive_int, default=None, help="default --seq-length")
    m.add_argument("--vocab-size", type=_positive_int, default=128, help="vocabulary of the mock data / the model")
    m.add_argument("--position-embedding-type", choices=["rope", "learned_absolute", "none"], default="rope")
    m.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="RMSNorm")
    m.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    m.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="layer spec: local or transformer_engine (default: TE where it imports on GPU)")
    m.add_argument("--init-method-std", type=float, default=0.02)
    m.add_argument("--disable-bias-linear", action="store_true", help="no biases in the linear layers")
    g = p.add_argument_group("gated DeltaNet hybrid (megatron-core's Qwen3-Next layout; its GDN layers under LASP-2)")
    g.add_argument("--experimental-attention-variant", choices=["gated_delta_net"], default=None,
                   help="megatron-core's GatedDeltaNet where --linear-attention-freq says 1, softmax attention "
                        "(LASP-2H) elsewhere; instead of --hybrid-layer-pattern")
    g.add_argument("--linear-attention-freq", type=_linear_attention_freq, default=None,
                   help="N: softmax attention every N-th layer, else GDN; or a list of 1 (GDN) / 0 per layer, "
                        "e.g. '([1]*3+[0])*2'")
    for flag in ("conv-kernel-dim", "key-head-dim", "value-head-dim", "num-key-heads", "num-value-heads"):
        g.add_argument(f"--linear-{flag}", type=_positive_int, default=None, help="default: megatron-core's")
    par = p.add_argument_group("parallelism")
    par.add_argument("--tensor-model-parallel-size", type=_positive_int, default=1)
    par.add_argument("--pipeline-model-parallel-size", type=_positive_int, default=1)
    par.add_argument("--num-layers-per-virtual-pipeline-stage", type=_positive_int, default=None)
    par.add_argument("--context-parallel-size", type=_positive_int, default=1)
    par.add_argument("--sequence-parallel", action="store_true")
    par.add_argument("--use-distributed-optimizer", action="store_true")
    par.add_argument("--use-torch-fsdp2", action="store_true",
                     help="PyTorch FSDP2 over dp-cp (megatron-core's TorchFullyShardedDataParallel) instead of DDP")
    t = p.add_argument_group("training")
    t.add_argument("--micro-batch-size", type=_positive_int, default=1)
    t.add_argument("--global-batch-size", type=_positive_int, default=None, help="default micro batch x DP")
    t.add_argument("--train-iters", type=int, default=20)
    t.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--adam-beta1", type=float, default=0.9)
    t.add_argument("--adam-beta2", type=float, default=0.95)
    t.add_argument("--sgd-momentum", type=float, default=0.0)
    t.add_argument("--clip-grad", type=float, default=1.0)
    t.add_argument("--bf16", action="store_true", help="bf16 weights and activations (GPU)")
    t.add_argument("--calculate-per-token-loss", action="store_true")
    t.add_argument("--seed", type=int, default=1234)
    t.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    d = p.add_argument_group("data")
    d.add_argument("--mock-data", action="store_true", help="megatron-core's MockGPTDataset (the default)")
    d.add_argument("--data-path", nargs="*", default=None, help="Megatron indexed dataset prefix(es)")
    d.add_argument("--split", default="100,0,0")
    c = p.add_argument_group("checkpoints and logging")
    c.add_argument("--save", default=None)
    c.add_argument("--save-interval", type=int, default=None, help="default: only at the end")
    c.add_argument("--load", default=None)
    c.add_argument("--ckpt-step", type=int, default=None, help="iteration to load (default: the latest)")
    c.add_argument("--log-interval", type=int, default=1)
    c.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default cuda if available")
    c.add_argument("--distributed-backend", choices=["gloo", "nccl"], default=None)
    add_moe_args(p)
    add_lasp2_args(p)
    return p


def _positive_int(text: str) -> int:
    """A size (layers, heads, lengths, parallel degrees, batch sizes, --linear-* sizes), checked
    on every rank at parse time. Sizes of 0 or below failed later with ZeroDivisionError in the
    set-up, or never (--seq-length -4 at CP 2 passed the split check); a --linear-* size of 0
    or -1 megatron-core's config takes at CP 1, and only the pipeline stages that build a
    GatedDeltaNet layer raised (the others then failed in their first receive: gloo
    'Connection closed by peer')."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}")
    return value


# Longest list --linear-attention-freq builds (one entry per layer): '[1]*10000000000' would
# otherwise allocate the list (80 GB) before its length is compared with --num-layers
MAX_PATTERN_LAYERS = 1 << 16


def _linear_attention_freq(text: str):
    """Megatron-LM's spelling of linear_attention_freq: an int, or a Python list expression of
    ints, + and * (evaluated without eval), at most MAX_PATTERN_LAYERS entries."""
    import ast

    def sized(items: list) -> list:
        if len(items) > MAX_PATTERN_LAYERS:
            raise ValueError
        return items

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return sized([value(item) for item in node.elts])
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Add):
                return sized(left + right) if isinstance(left, list) else left + right
            times, items = (left, right) if isinstance(right, list) else (right, left)
            if isinstance(items, list) and isinstance(times, int) and max(len(items), 1) * times > MAX_PATTERN_LAYERS:
                raise ValueError  # checked before the list is built
            result = left * right
            return sized(result) if isinstance(result, list) else result
        raise ValueError

    try:
        freq = value(ast.parse(text.strip(), mode="eval").body)
    except (SyntaxError, ValueError, TypeError, RecursionError, MemoryError):
        # RecursionError: ast.parse of a few thousand chained '1+1+...'
        freq = None
    if not isinstance(freq, (int, list)):
        raise argparse.ArgumentTypeError(f"expected an int or a list of at most {MAX_PATTERN_LAYERS} entries such "
                                         f"as '([1]*3+[0])*2', got {text[:80]!r}{'...' if len(text) > 80 else ''}")
    return freq


CORE_GDN_SIZES = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
                  "linear_num_key_heads", "linear_num_value_heads")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.distributed_backend is None:
        args.distributed_backend = "nccl" if args.device == "cuda" else "gloo"
    if args.bf16 and args.device == "cpu":
        raise SystemExit("--bf16 is for --device cuda (lasp2's CPU kernels compute in fp32)")
    # flags that only act with another: alone they were dropped without a word
    if args.ckpt_step is not None and not args.load:
        raise SystemExit("--ckpt-step is for --load (the iteration to resume from); without --load the run "
                         "starts from scratch")
    if args.save_interval is not None and not args.save:
        raise SystemExit("--save-interval is for --save (without it nothing is written)")
    if args.mock_data and args.data_path:
        raise SystemExit("--mock-data and --data-path both choose the data: give one")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.max_position_embeddings < args.seq_length:
        # the table has one row per position: shorter, the first forward fails in an index error
        # on the first pipeline stage only (the others wait in their first receive)
        raise SystemExit(f"--max-position-embeddings {args.max_position_embeddings} is below --seq-length "
                         f"{args.seq_length} (--position-embedding-type learned_absolute has one row per position)")
    if not args.group_query_attention:
        args.num_query_groups = None
    elif args.num_query_groups is None:
        # Megatron-LM's --num-query-groups defaults to 1 there; None here is multi-head attention
        raise SystemExit("--group-query-attention needs --num-query-groups (the number of key / value heads)")
    elif args.num_attention_heads % args.num_query_groups:
        # megatron-core's config takes it; its QKV split fails at the first forward, on the first
        # pipeline stage only (later stages then wait in their first receive)
        raise SystemExit(f"--num-attention-heads {args.num_attention_heads} must be divisible by "
                         f"--num-query-groups {args.num_query_groups}")
    if args.hidden_size % args.num_attention_heads:
        # megatron-core then floors the head dim (kv_channels) and builds a narrower attention than
        # asked for, without a word; Megatron-LM's own parser refuses it
        raise SystemExit(f"--hidden-size {args.hidden_size} must be divisible by --num-attention-heads "
                         f"{args.num_attention_heads}")
    if args.num_layers % args.pipeline_model_parallel_size:
        # megatron-core's assertion names its config fields, not the flags
        raise SystemExit(f"--num-layers {args.num_layers} must be divisible by --pipeline-model-parallel-size "
                         f"{args.pipeline_model_parallel_size}")
    if args.use_torch_fsdp2:
        from megatron_patches.torch_fsdp import check_torch_fsdp2_args

        check_torch_fsdp2_args(args)
    if args.transformer_impl is None:
        from megatron_patches.specs import HAVE_TE

        args.transformer_impl = "transformer_engine" if (HAVE_TE and args.device == "cuda") else "local"
    return args


def lasp2_options(args) -> Lasp2Options:
    """The validated options, and the sequence length checked against the split: every rank
    raises here, before the model is built and any rank waits on another. (Found at the first
    batch instead, only the ranks that read it raised; later pipeline stages were then waiting
    in their first receive, where gloo fails with 'Connection closed by peer' and NCCL waits
    until its timeout.)"""
    check_moe_args(args)
    options = options_from_args(core_gdn_args(args))
    options.validate(args.num_layers)
    if options.linear_rope and args.position_embedding_type != "rope":
        # the linear layers apply the model's rotary embeddings; without them there are none
        raise Lasp2ConfigError(f"--linear-attention-rope needs --position-embedding-type rope, got "
                               f"{args.position_embedding_type!r}")
    if options.provider == "ulysses" and not args.experimental_attention_variant:
        _check_ulysses_mixer_heads(args, options)
    cp = args.context_parallel_size
    parts = cp * (2 if options.split == "balanced" else 1)
    if cp > 1 and args.seq_length % parts:
        raise Lasp2ConfigError(
            f"--seq-length {args.seq_length} must be divisible by {'2 x ' if options.split == 'balanced' else ''}"
            f"--context-parallel-size {cp} = {parts} for --sp-split {options.split} (each CP rank holds "
            f"{'two chunks' if options.split == 'balanced' else 'one chunk'} of the sequence)")
    return options


def core_gdn_args(args):
    """With --experimental-attention-variant: a copy of args whose --hybrid-layer-pattern is
    megatron-core's layer order ("G" gated DeltaNet, "S" softmax), the flags checked; the
    options are read from it (so they are validated against that pattern, not the default)."""
    variant = getattr(args, "experimental_attention_variant", None)
    given = [k for k in ("linear_attention_freq",) + CORE_GDN_SIZES if getattr(args, k, None) is not None]
    if variant is None:
        if given:
            raise Lasp2ConfigError(f"--{given[0].replace('_', '-')} is for --experimental-attention-variant "
                                   "gated_delta_net")
        return args
    if args.hybrid_layer_pattern is not None:
        raise Lasp2ConfigError("--hybrid-layer-pattern and --experimental-attention-variant both set the layer "
                               "order: give --linear-attention-freq instead")
    if args.sp_provider not in GDN_PROVIDERS:
        raise Lasp2ConfigError(f"--experimental-attention-variant {variant} runs its GatedDeltaNet layers under "
                               f"--sp-provider {' or '.join(GDN_PROVIDERS)}, got {args.sp_provider!r} "
                               "(megatron-core's own layer has no context parallelism)")
    if args.linear_attention_freq is None:
        raise Lasp2ConfigError(f"--experimental-attention-variant {variant} needs --linear-attention-freq "
                               "(N: softmax attention every N-th layer; or a 0 / 1 list per layer)")
    if args.sp_provider == "ulysses":
        _check_ulysses_gdn_heads(args)
    from megatron_patches.specs import core_gdn_layer_pattern

    return argparse.Namespace(**{**vars(args), "hybrid_layer_pattern": core_gdn_layer_pattern(args)})


def _check_ulysses_heads(args, heads: int, heads_flag: str, layers: str) -> None:
    """Ulysses shards a TP rank's heads of `layers` over the CP group. Checked here, on every
    rank: the layers check it too, but only on the pipeline stages that build one (PP 2,
    layers LLNN: the second stage's ranks failed in their first receive)."""
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if heads and heads % tp == 0 and (heads // tp) % cp:  # heads % tp: megatron-core's config names it
        raise Lasp2ConfigError(f"--sp-provider ulysses shards a TP rank's heads of the {layers} layers over the CP "
                               f"group: {heads_flag} {heads} / --tensor-model-parallel-size {tp} = {heads // tp} "
                               f"must be divisible by --context-parallel-size {cp}")


def _check_ulysses_mixer_heads(args, options: Lasp2Options) -> None:
    """The attention heads of the pattern's L / G / K layers."""
    kinds = set(options.pattern_for(args.num_layers)) & {LINEAR, GATED_DELTANET, KDA}
    if kinds:
        _check_ulysses_heads(args, args.num_attention_heads, "--num-attention-heads", "/".join(sorted(kinds)))


def _check_ulysses_gdn_heads(args) -> None:
    """The value heads of megatron-core's GatedDeltaNet layers (its default where not given)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    hv = args.linear_num_value_heads or TransformerConfig.__dataclass_fields__["linear_num_value_heads"].default
    _check_ulysses_heads(args, hv, "--linear-num-value-heads", "GatedDeltaNet")
