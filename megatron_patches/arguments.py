"""Command-line arguments for LASP-2 in Megatron-LM (`extra_args_provider`).

    from megatron.training import pretrain
    from megatron_patches.arguments import add_lasp2_args
    pretrain(..., extra_args_provider=add_lasp2_args)

The sequence-parallel degree is Megatron's own --context-parallel-size and the
group is Megatron's context-parallel group: nothing here creates one.
"""

from __future__ import annotations

import argparse

from megatron_patches.options import (
    DECAYS,
    FEATURE_MAPS,
    PROVIDERS,
    SOFTMAX_BACKENDS,
    SPLITS,
    Lasp2Options,
    options_from_args,
)

__all__ = ["MEGATRON_PATTERN_FLAG", "add_lasp2_args", "options_from_args"]

MEGATRON_PATTERN_FLAG = "--hybrid-layer-pattern"


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _add(parser: argparse.ArgumentParser, group, flags, **kwargs):
    """Adds an option under the flags the parser does not define yet.

    Flags the parser already defines are skipped; at least one must be free.
    """
    taken = getattr(parser, "_option_string_actions", {})
    free = [f for f in flags if f not in taken]
    if not free:
        raise ValueError(f"add_lasp2_args: the parser already defines all of {flags}")
    group.add_argument(*free, **kwargs)


def add_lasp2_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds the "lasp2" argument group; returns the parser (extra_args_provider protocol)."""
    d = Lasp2Options()
    group = parser.add_argument_group(title="lasp2", description=(
        "LASP-2 sequence parallelism for linear attention and LASP-2H for softmax attention "
        "over Megatron's context-parallel group (--context-parallel-size)."))
    _add(parser, group, ["--sp-provider", "--lasp2-sp-provider"], dest="sp_provider",
         choices=PROVIDERS, default=d.provider,
         help="sequence parallelism of linear-attention and gated DeltaNet layers: lasp2 (one "
              "AllGather of states), lasp1 (P2P ring), ulysses (all-to-all over heads; linear layers "
              "need --sp-split contiguous), none (no lasp2: Megatron's own attention and context "
              "parallelism; softmax layers only). Default: %(default)s")
    _add(parser, group, ["--sp-split", "--lasp2-sp-split"], dest="sp_split", choices=SPLITS,
         default=d.split,
         help="sequence layout over the CP group: balanced (= Megatron's get_batch_on_this_cp_rank "
              "and RoPE slicing, no patch needed) or contiguous (needs megatron_patches.batch and "
              "megatron_patches.rope.use_lasp2_rope). Default: %(default)s")
    if MEGATRON_PATTERN_FLAG not in getattr(parser, "_option_string_actions", {}):
        _add(parser, group, [MEGATRON_PATTERN_FLAG], dest="hybrid_layer_pattern", type=str,
             default=d.layer_pattern,
             help="one character per layer: L = linear attention (LASP-2), S = softmax attention "
                  "(LASP-2H; also N or Megatron's *), G = gated DeltaNet (gated delta rule under "
                  "--sp-provider), K = Kimi Delta Attention (KDA, per-key gate), "
                  "e.g. LLLSLLLS, LGLS or KKKS. Default: every layer linear attention")
    # else: Megatron-LM >= 0.17 defines --hybrid-layer-pattern itself; lasp2 reads the same flag
    # (options_from_args), so there is one pattern flag, in lasp2's letters plus Megatron's "*".
    _add(parser, group, ["--linear-attention-decay"], dest="linear_attention_decay", choices=DECAYS,
         default=d.decay,
         help="none, fixed (per-head lightning decay) or gate (per-token gate projected from the "
              "hidden states). Default: %(default)s")
    _add(parser, group, ["--linear-attention-feature-map"], dest="linear_attention_feature_map",
         choices=FEATURE_MAPS, default=d.feature_map,
         help="feature map on q and k of linear attention. Default: %(default)s")
    _add(parser, group, ["--linear-attention-output-norm"], dest="linear_attention_output_norm",
         type=_bool, default=d.output_norm, metavar="BOOL",
         help="per-head RMSNorm of the linear-attention output. Default: %(default)s")
    _add(parser, group, ["--linear-attention-gate-normalizer"], dest="linear_attention_gate_normalizer",
         type=float, default=d.gate_logit_normalizer,
         help="g = logsigmoid(gate logits) / normalizer (decay=gate). Default: %(default)s")
    _add(parser, group, ["--linear-attention-learnable-decay"], dest="linear_attention_learnable_decay",
         action="store_true", default=d.learnable_decay,
         help="train the fixed per-head decays (decay=fixed)")
    _add(parser, group, ["--linear-attention-rope"], dest="linear_attention_rope", type=_bool,
         default=d.linear_rope, metavar="BOOL",
         help="apply rotary embeddings in linear-attention layers. Default: %(default)s")
    _add(parser, group, ["--sp-softmax-backend", "--lasp2-softmax-backend"], dest="sp_softmax_backend",
         choices=SOFTMAX_BACKENDS, default=d.softmax_backend,
         help="kernels of LASP-2H softmax attention. Default: %(default)s")
    return parser
