"""The LASP-2 settings of a Megatron model, validated once.

`Lasp2Options` is what every module in this package reads. It comes from, in order:
an explicit `Lasp2Options` passed to a spec builder (megatron-core users), or the
parsed Megatron-LM arguments (`megatron.training.get_args()`, filled by
`add_lasp2_args`), or the defaults below. This module does not import megatron; its vocabulary is lasp2.options'.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import lasp2.options as lasp2_options
from lasp2.ops.gated_delta_rule import FAMILY as _DELTA_FAMILY
from lasp2.ops.providers import LINEAR_ATTENTION as _LINEAR_FAMILY
from lasp2.ops.providers import get_provider, provider_names

# The vocabulary is lasp2's (lasp2.options); Megatron adds provider "none" (its own
# attention and context parallelism) and its spellings of softmax attention.
PROVIDERS = (*lasp2_options.PROVIDERS, "none")
# the providers lasp2.gated_delta_rule and lasp2.kda share ("lasp2", "lasp1", "ulysses"; one
# provider family), read from lasp2's registry so that this list cannot fall behind the ops
GDN_PROVIDERS = provider_names(_DELTA_FAMILY)
SPLITS = lasp2_options.SPLITS
DECAYS = lasp2_options.DECAYS
FEATURE_MAPS = tuple(lasp2_options.FEATURE_MAPS)
SOFTMAX_BACKENDS = lasp2_options.SOFTMAX_BACKENDS
LINEAR, SOFTMAX, GATED_DELTANET, KDA = "L", "S", "G", "K"
# the delta-rule layer kinds and their ops (one provider family: the same providers and splits)
DELTA_RULE_OPS = {GATED_DELTANET: "lasp2.gated_delta_rule", KDA: "lasp2.kda"}
# lasp2's layer letters plus the spellings of softmax attention in Megatron: "N" (earlier lasp2
# patterns) and "*" (the attention symbol of Megatron's --hybrid-layer-pattern, 0.17+)
MEGATRON_SPELLINGS = {"N": SOFTMAX, "*": SOFTMAX}
LAYER_LETTERS = {**{letter: letter for letter in lasp2_options.LAYER_LETTERS}, **MEGATRON_SPELLINGS}


def normalize_layer_pattern(pattern: Optional[str], name: str = "layer_pattern (--hybrid-layer-pattern)"):
    """The pattern in lasp2's letters ("N" and "*" become "S"); Lasp2ConfigError naming the
    argument for other characters. Megatron's pipeline separator "|" is dropped (stages come
    from --pipeline-model-parallel-size)."""
    if pattern is None:
        return None
    if not isinstance(pattern, str):
        raise Lasp2ConfigError(f"{name} must be a string of layer letters, got {pattern!r}")
    letters = "".join(MEGATRON_SPELLINGS.get(c, c) for c in pattern if c != "|")
    try:
        return "".join(lasp2_options.parse_layer_pattern(letters, name))
    except ValueError as exc:
        raise Lasp2ConfigError(f"{exc} (from {pattern!r}; softmax attention may also be spelled 'N' or "
                               "Megatron's '*')") from None


class Lasp2ConfigError(ValueError):
    """A LASP-2 setting that cannot work (raised at model build time, on every rank)."""


@dataclass(frozen=True)
class Lasp2Options:
    """LASP-2 / LASP-2H settings of a Megatron model.

    provider: sequence-parallel algorithm of the linear-attention layers: "lasp2",
        "lasp1" (P2P ring), "ulysses" (all-to-all over heads) or "none" (no lasp2:
        Megatron's stock attention and its own context parallelism; every layer
        must then be softmax attention). Softmax layers always use LASP-2H; gated
        DeltaNet ("G") and KDA ("K") layers take "lasp2", "lasp1" or "ulysses" too.
    split: how the sequence is laid out over the context-parallel group:
        "balanced" (Megatron's own zig-zag: rank r holds chunks r and 2P-1-r of
        2P) or "contiguous". ulysses needs "contiguous" where the pattern has linear
        ("L") layers (lasp2.gated_delta_rule's and lasp2.kda's ulysses take either split).
    layer_pattern: one character per layer, "L" linear attention, "S" softmax
        attention ("N" and Megatron's "*" mean the same and are stored as "S"), "G"
        gated DeltaNet, "K" Kimi Delta Attention (per-key gate), e.g. "LLLS" * 6 or
        "KKKS" * 6 (Kimi Linear). None: every layer is linear attention.
    decay: linear attention's decay: "none", "fixed" (per-head lightning decay) or
        "gate" (per-token, per-head gate projected from the hidden states).
    feature_map: applied to q and k of linear attention.
    output_norm: per-head RMSNorm of the linear-attention output.
    gate_logit_normalizer: g = logsigmoid(x W_g + b) / normalizer.
    learnable_decay: train the fixed per-head decays.
    linear_rope: apply rotary embeddings in linear-attention layers too (off by
        default: linear attention is position-aware through its recurrence).
    softmax_backend: lasp2.softmax_attention backend ("auto", "sdpa", "plain").
    """

    provider: str = "lasp2"
    split: str = "balanced"
    layer_pattern: Optional[str] = None
    decay: str = "fixed"
    feature_map: str = "identity"
    output_norm: bool = True
    gate_logit_normalizer: float = 16.0
    learnable_decay: bool = False
    linear_rope: bool = False
    softmax_backend: str = "auto"

    def __post_init__(self):
        if isinstance(self.layer_pattern, str):
            object.__setattr__(self, "layer_pattern", normalize_layer_pattern(self.layer_pattern))
        self.validate()

    def replace(self, **changes) -> "Lasp2Options":
        return dataclasses.replace(self, **changes)

    def validate(self, num_layers: Optional[int] = None) -> "Lasp2Options":
        """Checks the settings (and the pattern against num_layers when given)."""
        _choice("provider (--sp-provider)", self.provider, PROVIDERS)
        _choice("split (--sp-split)", self.split, SPLITS)
        _choice("decay (--linear-attention-decay)", self.decay, DECAYS)
        _choice("feature_map (--linear-attention-feature-map)", self.feature_map, FEATURE_MAPS)
        _choice("softmax_backend (--sp-softmax-backend)", self.softmax_backend, SOFTMAX_BACKENDS)
        _positive_number("gate_logit_normalizer (--linear-attention-gate-normalizer)", self.gate_logit_normalizer)
        # a string such as "false" (a config file's spelling) is truthy: it would switch the
        # feature on while asking for it off, so only True / False are taken
        for name, value in (("output_norm (--linear-attention-output-norm)", self.output_norm),
                            ("learnable_decay (--linear-attention-learnable-decay)", self.learnable_decay),
                            ("linear_rope (--linear-attention-rope)", self.linear_rope)):
            if not isinstance(value, bool):
                raise Lasp2ConfigError(f"{name} must be True or False, got {value!r}")
        if self.learnable_decay and self.decay != "fixed":
            # only decay="fixed" has per-head decays to train: the switch was dropped without a word
            raise Lasp2ConfigError(
                "learnable_decay (--linear-attention-learnable-decay) trains the fixed decays: it needs "
                f"decay (--linear-attention-decay) fixed, got {self.decay!r}")
        if self.layer_pattern is not None:
            normalize_layer_pattern(self.layer_pattern)
            if num_layers is not None and len(self.layer_pattern) != num_layers:
                raise Lasp2ConfigError(
                    f"layer_pattern (--hybrid-layer-pattern) {self.layer_pattern!r} has "
                    f"{len(self.layer_pattern)} characters but the model has num_layers={num_layers} "
                    f"(one character per layer, e.g. {('LLLS' * num_layers)[:num_layers]!r})")
        pattern = self.pattern_for(num_layers or 1)
        if self.provider == "none" and set(pattern) - {SOFTMAX}:
            raise Lasp2ConfigError(
                "provider 'none' (Megatron's own context parallelism) has no linear attention, gated "
                "DeltaNet or KDA: set --hybrid-layer-pattern to all 'S', or --sp-provider lasp2|lasp1|ulysses")
        for name, on in (("learnable_decay (--linear-attention-learnable-decay)", self.learnable_decay),
                         ("linear_rope (--linear-attention-rope)", self.linear_rope)):
            if on and LINEAR not in pattern:  # no layer reads it: it was dropped without a word
                raise Lasp2ConfigError(f"{name} acts on linear attention ('L') layers only; the pattern "
                                       f"{pattern!r} has none")
        if self.provider == "none" and self.split != "balanced":
            # Megatron's own context parallelism (TE's attention) lays the sequence out in its
            # zig-zag order only: contiguous chunks under it mask the wrong tokens, with no error
            raise Lasp2ConfigError(
                f"split (--sp-split) {self.split!r}: provider 'none' (Megatron's own context parallelism) "
                "takes Megatron's zig-zag layout only: use --sp-split balanced, or --sp-provider lasp2|lasp1 "
                "for LASP-2H softmax attention on the contiguous split")
        if self.provider == "none" and self.softmax_backend != "auto":
            # Megatron's own attention runs the softmax layers: the choice would be dropped
            raise Lasp2ConfigError(
                f"softmax_backend (--sp-softmax-backend) {self.softmax_backend!r} chooses LASP-2H's kernels: "
                "provider 'none' (--sp-provider none) runs Megatron's own attention, which never reads it; "
                "leave it 'auto' or use --sp-provider lasp2")
        _check_split(self.provider, self.split, LINEAR, _LINEAR_FAMILY, "lasp2.linear_attention", pattern)
        for kind, op in DELTA_RULE_OPS.items():
            if kind in pattern and self.provider not in GDN_PROVIDERS:
                raise Lasp2ConfigError(
                    f"{lasp2_options.LAYER_LETTERS[kind]} ({kind!r}) layers run under --sp-provider "
                    f"{' or '.join(GDN_PROVIDERS)}, got {self.provider!r} ({op} has no {self.provider!r} provider)")
            _check_split(self.provider, self.split, kind, _DELTA_FAMILY, op, pattern)
        return self

    def pattern_for(self, num_layers: int) -> str:
        if self.layer_pattern is None:
            return (SOFTMAX if self.provider == "none" else LINEAR) * num_layers
        return self.layer_pattern

    def layer_kind(self, layer_number: int, num_layers: int) -> str:
        """'L', 'S', 'G' or 'K' for a 1-based global layer number."""
        self.validate(num_layers)
        if not 1 <= layer_number <= num_layers:
            raise Lasp2ConfigError(f"layer_number {layer_number} is outside [1, {num_layers}]")
        return self.pattern_for(num_layers)[layer_number - 1]


def _check_split(provider: str, split: str, kind: str, family: str, op: str, pattern: str) -> None:
    """Lasp2ConfigError naming --sp-split when the pattern has `kind` layers and their op's
    provider does not take the split (lasp2's providers say which splits they take)."""
    if kind not in pattern or provider not in provider_names(family):
        return
    splits = get_provider(op, family, provider).splits
    if split not in splits:
        only = " or ".join(repr(s) for s in splits)
        raise Lasp2ConfigError(
            f"split (--sp-split) {split!r}: provider {provider!r} supports split={only} only for "
            f"{lasp2_options.LAYER_LETTERS[kind]} ({kind!r}) layers ({op}); use --sp-provider lasp2 or "
            f"lasp1 for the balanced split, or --sp-split contiguous")


def _positive_number(name: str, value) -> None:
    """A finite real number > 0 (an infinite normaliser makes every gate 1: no decay at all)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise Lasp2ConfigError(f"{name} must be a finite number > 0, got {value!r}")


def _choice(name: str, value, choices):
    if value not in choices:
        raise Lasp2ConfigError(f"{name} must be one of {choices}, got {value!r}")


def options_from_args(args) -> Lasp2Options:
    """Lasp2Options from an argparse namespace filled by add_lasp2_args."""
    defaults = Lasp2Options()
    get = lambda name, default: getattr(args, name, default)  # noqa: E731
    return Lasp2Options(
        provider=get("sp_provider", defaults.provider),
        split=get("sp_split", defaults.split),
        # add_lasp2_args' flag and Megatron-LM's own (0.17+) share the dest hybrid_layer_pattern
        layer_pattern=get("hybrid_layer_pattern", defaults.layer_pattern),
        decay=get("linear_attention_decay", defaults.decay),
        feature_map=get("linear_attention_feature_map", defaults.feature_map),
        output_norm=get("linear_attention_output_norm", defaults.output_norm),
        gate_logit_normalizer=get("linear_attention_gate_normalizer", defaults.gate_logit_normalizer),
        learnable_decay=get("linear_attention_learnable_decay", defaults.learnable_decay),
        linear_rope=get("linear_attention_rope", defaults.linear_rope),
        softmax_backend=get("sp_softmax_backend", defaults.softmax_backend),
    )


def _megatron_lm_args():
    """Megatron-LM's parsed arguments if megatron.training is there and initialized."""
    try:
        from megatron.training import global_vars
    except ImportError:
        return None
    args = getattr(global_vars, "_GLOBAL_ARGS", None)
    if args is None or not hasattr(args, "sp_provider"):
        return None
    return args


def resolve_options(options: Optional[Lasp2Options] = None) -> Lasp2Options:
    """The explicit options, else Megatron-LM's parsed --sp-* arguments, else defaults."""
    if options is not None:
        if not isinstance(options, Lasp2Options):
            raise Lasp2ConfigError(f"expected Lasp2Options, got {type(options).__name__}")
        return options
    args = _megatron_lm_args()
    return options_from_args(args) if args is not None else Lasp2Options()
