"""A drop-in core linear attention for Linear-MoE (OpenSparseLLMs/Linear-MoE).

Linear-MoE's outer `LinearAttention` builds its core module as
`build_module(submodules.core_linear_attention, config=config, expand_k=..., expand_v=...)`
and calls it as `core(q=q, k=k, v=v[, gk=gk])` with q, k, v [n, b, h, d] (its
LightningAttention, GLA, BasicLinearAttention, LASP2 modules). `Lasp2LinearAttention`
has that constructor and forward, so the swap is one line in a Linear-MoE layer spec:

    core_linear_attention=Lasp2LinearAttention,

and the sequence-parallel algorithm becomes lasp2's, over Megatron's context-parallel
group (parallel_state.get_context_parallel_group()), split the way Megatron splits
batches ("balanced", zig-zag) unless configured otherwise.

Config fields read (all optional; Linear-MoE's names where it has one):
  la_feature_map          None/"identity", "relu", "elu" (F.elu, as Linear-MoE's
                          ACT2FN), "elu+1", "silu"/"swish", "sigmoid"
  la_output_norm          "rmsnorm" (default) or "identity"; the module is `la_output_norm`
                          as in Linear-MoE (parameter la_output_norm.weight [head_v_dim]), so
                          Linear-MoE checkpoints load
  la_elementwise_affine   learned per-channel scale of the output norm (default True)
  la_norm_eps             output-norm epsilon (default 1e-6)
  gla_la_gate_logit_normalizer  g = logsigmoid(gk) / normalizer (default 16)
  gla_la_clamp_min        optional lower clamp of g
  lasp2_decay             "none" | "fixed" (lightning slopes of the global heads) |
                          "gate" (default: "gate" if gates are passed, else "none")
  lasp2_split             "balanced" (default) or "contiguous"
  lasp2_provider          "lasp2" (default), "lasp1", "ulysses"
  la_scale                multiplies q (default head_dim ** -0.5, as lasp2)

Gates: lasp2 takes one log gate per head and token. `gk` may be per-head gate logits
[n, b, h] or [n, b, h*1]; GLA's per-channel gates [n, b, h*d] are not supported (project
the gates to heads). `g` may be passed as log gates [n, b, h] directly.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402

import lasp2  # noqa: E402
from lasp2.nn.norms import RMSNorm  # noqa: E402
from lasp2.ops.gates import gate_from_logits, lightning_log_decay  # noqa: E402
from lasp2.options import FEATURE_MAPS  # noqa: E402
from megatron_patches.common import repeat_kv_heads, sum_grad_over_tp  # noqa: E402
from megatron_patches.options import Lasp2ConfigError  # noqa: E402

__all__ = ["Lasp2LinearAttention"]

# Linear-MoE's feature-map names (its ACT2FN): "elu" is plain F.elu there, lasp2's "elu" is
# spelled "elu+1" here; the other maps are lasp2's own (lasp2.options.FEATURE_MAPS).
_FEATURE_MAPS = {
    None: None,
    "identity": None,
    "relu": FEATURE_MAPS["relu"],
    "silu": FEATURE_MAPS["silu"],
    "swish": FEATURE_MAPS["silu"],
    "elu+1": FEATURE_MAPS["elu"],
    "elu": F.elu,
    "sigmoid": torch.sigmoid,
}


def _groups():
    """(cp group or None, tp rank, tp size) from Megatron's parallel state."""
    if not parallel_state.model_parallel_is_initialized():
        return None, 0, 1
    cp = parallel_state.get_context_parallel_group()
    cp = cp if cp.size() > 1 else None
    return cp, parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size()


class Lasp2LinearAttention(MegatronModule):
    """Linear-MoE's core-linear-attention interface on lasp2 (see the module docstring)."""

    def __init__(self, config, expand_k: float = 1.0, expand_v: float = 1.0, **kwargs):
        super().__init__(config)
        get = lambda name, default=None: kwargs.get(name, getattr(config, name, default))  # noqa: E731
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.key_dim = int(config.hidden_size * expand_k)
        self.value_dim = int(config.hidden_size * expand_v)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise Lasp2ConfigError(f"Lasp2LinearAttention: key dim {self.key_dim} and value dim {self.value_dim} "
                                   f"must be divisible by num_attention_heads {self.num_heads}")
        self.head_qk_dim = self.key_dim // self.num_heads
        self.head_v_dim = self.value_dim // self.num_heads
        feature = get("la_feature_map")
        if feature not in _FEATURE_MAPS:
            raise Lasp2ConfigError(f"Lasp2LinearAttention: la_feature_map must be one of "
                                   f"{[k for k in _FEATURE_MAPS if k]}, got {feature!r}")
        self.feature_map = _FEATURE_MAPS[feature]
        norm = get("la_output_norm", "rmsnorm")
        if norm not in ("rmsnorm", "identity"):
            raise Lasp2ConfigError(f"Lasp2LinearAttention: la_output_norm must be 'rmsnorm' or 'identity', got {norm!r}")
        # Linear-MoE's own module and parameter name (la_output_norm.weight, [head_v_dim]) so
        # that its checkpoints load: the scale is shared by all heads.
        if norm == "rmsnorm":
            self.la_output_norm = RMSNorm(self.head_v_dim, eps=float(get("la_norm_eps", 1e-6)),
                                              dtype=config.params_dtype)
            affine = get("la_elementwise_affine", True)
            if not isinstance(affine, bool):  # a config file's "false" is truthy: it kept the scale
                raise Lasp2ConfigError(f"Lasp2LinearAttention: la_elementwise_affine must be True or False, "
                                       f"got {affine!r}")
            if not affine:  # Linear-MoE then has no parameter
                del self.la_output_norm.weight
                self.la_output_norm.register_buffer("weight", torch.ones(self.head_v_dim), persistent=False)
        else:
            self.la_output_norm = torch.nn.Identity()
        self._register_load_state_dict_pre_hook(_rename_old_norm_weight)
        self.gate_normalizer = get("gla_la_gate_logit_normalizer", 16.0)
        if isinstance(self.gate_normalizer, bool) or not isinstance(self.gate_normalizer, (int, float)) \
                or not 0 < self.gate_normalizer < float("inf"):
            # 0 made every log gate -inf (NaN where logsigmoid rounds to 0), a negative one positive
            raise Lasp2ConfigError(f"Lasp2LinearAttention: gla_la_gate_logit_normalizer must be a finite number "
                                   f"> 0, got {self.gate_normalizer!r}")
        self.gate_normalizer = float(self.gate_normalizer)
        self.gate_clamp_min = get("gla_la_clamp_min")
        if self.gate_clamp_min is not None and not (isinstance(self.gate_clamp_min, (int, float))
                                                    and not isinstance(self.gate_clamp_min, bool)
                                                    and self.gate_clamp_min <= 0):
            raise Lasp2ConfigError(f"Lasp2LinearAttention: gla_la_clamp_min is a floor on the log gates, which are "
                                   f"<= 0: it must be a number <= 0 or None, got {self.gate_clamp_min!r}")
        self.split = get("lasp2_split", "balanced")
        self.provider = get("lasp2_provider", "lasp2")
        self.decay_mode = get("lasp2_decay")
        if self.decay_mode not in (None, "none", "fixed", "gate"):
            raise Lasp2ConfigError(f"Lasp2LinearAttention: lasp2_decay must be none/fixed/gate, got {self.decay_mode!r}")
        self.scale = get("la_scale")
        self.register_buffer("log_decay", None, persistent=False)
        if self.decay_mode == "fixed":
            _, tp_rank, tp_size = _groups()
            if self.num_heads % tp_size:
                raise Lasp2ConfigError(f"Lasp2LinearAttention: {self.num_heads} heads are not divisible by TP {tp_size}")
            per = self.num_heads // tp_size
            self.register_buffer("log_decay", lightning_log_decay(self.num_heads)[tp_rank * per:(tp_rank + 1) * per]
                                 .float(), persistent=False)
        weight = getattr(self.la_output_norm, "weight", None)
        if isinstance(weight, torch.nn.Parameter) and parallel_state.model_parallel_is_initialized():
            # one scale shared by all heads while heads are split over TP ranks
            sum_grad_over_tp(weight, parallel_state.get_tensor_model_parallel_group())

    @property
    def norm_weight(self):
        """The output norm's scale (la_output_norm.weight), None without one."""
        weight = getattr(self.la_output_norm, "weight", None)
        return weight if isinstance(weight, torch.nn.Parameter) else None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gk: Optional[torch.Tensor] = None,
                g: Optional[torch.Tensor] = None, beta: Optional[torch.Tensor] = None,
                cu_seqlens: Optional[torch.Tensor] = None, **unused) -> torch.Tensor:
        """q, k, v [n, b, h, d] (or [t, h, d] packed, with cu_seqlens) -> [n, b, h * d_v]."""
        if beta is not None:
            raise Lasp2ConfigError("Lasp2LinearAttention: `beta` (DeltaNet's delta rule) is not taken in this "
                                   "linear-attention slot; the delta rule is lasp2.gated_delta_rule / lasp2.kda, "
                                   "and in Megatron the gated DeltaNet and KDA layers (pattern letters 'G', 'K')")
        packed = q.dim() == 3
        if packed:
            q, k, v = (x.unsqueeze(1) for x in (q, k, v))
            gk = gk.unsqueeze(1) if gk is not None and gk.dim() == 2 else gk
            g = g.unsqueeze(1) if g is not None and g.dim() == 2 else g
        if q.dim() != 4:
            raise Lasp2ConfigError(f"Lasp2LinearAttention: q must be [n, b, heads, head_dim] (or [t, heads, "
                                   f"head_dim] packed), got {list(q.shape)}")
        n, b, h, _ = q.shape
        k, v = repeat_kv_heads("Lasp2LinearAttention", h, k, v)
        if isinstance(self.la_output_norm, RMSNorm) and v.shape[-1] != self.head_v_dim:
            # the norm's scale is [head_v_dim]: a RuntimeError from broadcasting otherwise
            raise Lasp2ConfigError(f"Lasp2LinearAttention: v has head dim {v.shape[-1]} but the module was built "
                                   f"for head_v_dim {self.head_v_dim} (hidden_size x expand_v / num_attention_heads)")
        if self.feature_map is not None:
            q, k = self.feature_map(q), self.feature_map(k)
        if (gk is not None or g is not None) and self.decay_mode in ("none", "fixed"):
            # the gates would replace the configured decay without a word
            raise Lasp2ConfigError(f"Lasp2LinearAttention: lasp2_decay={self.decay_mode!r} takes no gates, but "
                                   f"{'gk' if gk is not None else 'g'} was passed (lasp2_decay='gate' or unset "
                                   "uses them)")
        log_gate = self._log_gate(gk, g, n, b, h)
        decay = self.log_decay if log_gate is None else None
        if self.decay_mode == "gate" and log_gate is None:
            raise Lasp2ConfigError("Lasp2LinearAttention: lasp2_decay='gate' but no gk / g was passed")
        cp_group, _, _ = _groups()
        o = lasp2.linear_attention(q, k, v, g=log_gate, decay=decay, scale=self.scale, group=cp_group,
                                   layout="tbhd", split=self.split, cu_seqlens=cu_seqlens,
                                   provider=self.provider)
        o = self.la_output_norm(o)
        return o.reshape(n, b, h * o.shape[-1])

    def _log_gate(self, gk, g, n, b, h):
        if gk is not None and g is not None:
            raise Lasp2ConfigError("Lasp2LinearAttention: pass gk (gate logits) or g (log gates), not both")
        if gk is not None:
            if gk.dim() == 3 and gk.shape[-1] != h:
                raise Lasp2ConfigError(
                    f"Lasp2LinearAttention: gk has {gk.shape[-1]} channels per token; lasp2 takes one gate per "
                    f"head ({h}), not GLA's per-channel gates [n, b, h*d]: project the gates to heads")
            g = gate_from_logits(_per_head("gk", gk, n, b, h), self.gate_normalizer, self.gate_clamp_min)
        elif g is not None:
            g = _per_head("g", g, n, b, h)
        return g


def _per_head(name: str, gate: torch.Tensor, n: int, b: int, h: int) -> torch.Tensor:
    """A gate tensor as [n, b, h]: it must be laid out as q (its dims other than 1 those of
    [n, b, h], e.g. [n, b, h, 1], or [1, t, h] for packed [t, 1, h]); a reshape of anything
    with n*b*h entries (e.g. [b, n, h]) would pair gates with the wrong tokens silently."""
    if [d for d in gate.shape if d != 1] != [d for d in (n, b, h) if d != 1]:
        raise Lasp2ConfigError(f"Lasp2LinearAttention: {name} must be [n, b, heads] = {[n, b, h]} (q's layout, "
                               f"[t, heads] packed), got {list(gate.shape)}")
    return gate.reshape(n, b, h)


def _rename_old_norm_weight(state_dict, prefix, *args):
    """Checkpoints of earlier lasp2 versions named the output-norm scale `norm_weight`."""
    old = prefix + "norm_weight"
    if old in state_dict:
        state_dict[prefix + "la_output_norm.weight"] = state_dict.pop(old)

