"""megatron-core's own GatedDeltaNet (Qwen3-Next's linear layer) under LASP-2 context parallelism.

  Lasp2CoreGatedDeltaNet  a drop-in for megatron.core.ssm.gated_delta_net.GatedDeltaNet (the
                          layer get_gated_delta_net_module_spec builds for
                          config.experimental_attention_variant == "gated_delta_net"): the same
                          constructor, parameters (in_proj, conv1d, dt_bias, A_log, out_norm,
                          out_proj), shapes, TP sharding and sharded_state_dict (inherited), so a
                          megatron-core GDN checkpoint loads unchanged

What differs is the forward. megatron-core 0.16.1 has no context parallelism for this layer
and no packed sequences; later releases move the sequence to head sharding with an
all-to-all, which caps CP by the value heads of a TP rank. Here every rank keeps its tokens:
the short causal convolution of q, k, v takes its kernel_size - 1 token halo from the rank
holding the previous part (lasp2.nn.short_conv, reset at document starts), and the gated
delta rule runs over the CP group with lasp2.gated_delta_rule (provider "lasp2", "lasp1" or
"ulysses"; split "balanced" = Megatron's zig-zag, or "contiguous"). Packed documents come
from packed_seq_params (global cu_seqlens, the batch split the lasp2 way:
megatron_patches.batch.get_packed_batch_on_this_sp_rank).

The layer math is megatron-core's: in_proj's local columns are [q, k, v, z, beta, alpha] of
this TP rank's heads (num_key_heads / tp key heads, num_value_heads / tp value heads), the
convolution (config.linear_conv_kernel_dim) then config.activation_func over q, k, v, L2-normed
q and k repeated to the value heads (GQA), g = -exp(A_log) softplus(alpha + dt_bias),
beta = sigmoid(beta), out_norm over the value head dim times activation_func(z), out_proj.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.ssm.gated_delta_net import GatedDeltaNet, GatedDeltaNetSubmodules  # noqa: E402
from megatron.core.tensor_parallel import get_cuda_rng_tracker  # noqa: E402
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes  # noqa: E402
from megatron.core.transformer.module import MegatronModule  # noqa: E402
from megatron.core.transformer.spec_utils import build_module  # noqa: E402
from megatron.core.utils import get_pg_size  # noqa: E402

import lasp2  # noqa: E402
from lasp2.nn.gated_deltanet import beta_from_logits, delta_log_gate  # noqa: E402
from lasp2.nn.delta_checks import check_delta_layer_ranks, op_stand_ins  # noqa: E402
from lasp2.nn.short_conv import causal_conv_sp  # noqa: E402
from megatron_patches.common import (  # noqa: E402
    check_self_attention_call,
    check_ulysses_heads,
    cu_seqlens_of,
    process_groups,
    recomputes_core_attention,
    run_core,
    sp_group_of,
    sum_grad_over_tp,
)
from megatron_patches.core_gdn_config import SIZES, check_gdn_head_layout  # noqa: E402
from megatron_patches.options import GDN_PROVIDERS, Lasp2ConfigError, Lasp2Options, resolve_options  # noqa: E402

__all__ = ["GatedDeltaNetSubmodules", "Lasp2CoreGatedDeltaNet"]

# the in_proj sections, in megatron-core's order and checkpoint names
IN_PROJ_SPLIT_NAMES = ["query", "key", "value", "z", "beta", "alpha"]


class Lasp2CoreGatedDeltaNet(GatedDeltaNet):
    """hidden [s_local, b, h] (THD: [t_local, 1, h]) -> (output, output bias), megatron-core's
    GatedDeltaNet over the CP group. Built like theirs (spec params bias, conv_bias, conv_init,
    use_qk_l2norm, A_init_range) plus `lasp2_options` (None: Megatron-LM's parsed --sp-*
    arguments, else the defaults).

    A subclass, so that isinstance checks and sharded_state_dict (its in_proj / conv1d
    section splits) are megatron-core's own; its __init__ is not run: it needs fla and
    CUDA (parameters on torch.cuda.current_device()), neither of which this layer uses.
    With config.use_cpu_initialization the parameters are built on the CPU, as Megatron's
    linear layers are. The random draws are theirs, in their order: the same seed gives
    the same weights.
    """

    def __init__(self, config, submodules: GatedDeltaNetSubmodules, layer_number: Optional[int] = None,
                 bias: bool = False, conv_bias: bool = False, conv_init: Optional[float] = None,
                 use_qk_l2norm: bool = True, A_init_range: Tuple[float, float] = (1, 16), pg_collection=None,
                 lasp2_options: Optional[Lasp2Options] = None, **kwargs):
        # kwargs: what later megatron-core versions pass and this layer does not use (name=, cp_comm_type=)
        MegatronModule.__init__(self, config=config)
        options = resolve_options(lasp2_options)
        if options.provider not in GDN_PROVIDERS:
            raise Lasp2ConfigError(
                f"{type(self).__name__} runs under --sp-provider {' or '.join(GDN_PROVIDERS)}, got "
                f"{options.provider!r} (layer {layer_number}); provider 'none' keeps megatron-core's GatedDeltaNet")
        self.lasp2_options, self.layer_number = options, layer_number
        self.pg_collection = process_groups(pg_collection)
        self.tp_size = get_pg_size(self.pg_collection.tp)
        self._read_config(config, layer_number)
        if A_init_range[0] < 0 or A_init_range[1] < A_init_range[0]:
            raise Lasp2ConfigError(f"A_init_range must be 0 <= low <= high, got {A_init_range}")
        self.bias, self.conv_bias, self.conv_init = bias, conv_bias, conv_init
        self.use_qk_l2norm, self.A_init_range = use_qk_l2norm, A_init_range
        self.act_fn = config.activation_func
        self.activation = self.act_fn.__name__
        check_ulysses_heads(options, self.num_v_heads_local_tp, self.pg_collection.cp,
                            f"GatedDeltaNet layer {layer_number} (linear_num_value_heads / TP)")
        tp_group = self.tp_group = self.pg_collection.tp
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        factory = {"device": device, "dtype": config.params_dtype}
        # built in megatron-core's order: in_proj, conv1d, dt_bias, A_log, out_norm, out_proj
        self.in_proj = build_module(
            submodules.in_proj, self.hidden_size, self.in_proj_dim, config=config, init_method=config.init_method,
            gather_output=False, bias=bias, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="fc1",
            tp_group=tp_group)
        self.conv1d = torch.nn.Conv1d(self.conv_dim_local_tp, self.conv_dim_local_tp, self.conv_kernel_dim,
                                      groups=self.conv_dim_local_tp, padding=self.conv_kernel_dim - 1,
                                      bias=conv_bias, **factory)
        self.dt_bias = torch.nn.Parameter(torch.empty(self.num_v_heads_local_tp, **factory))
        self.A_log = torch.nn.Parameter(torch.empty(self.num_v_heads_local_tp, **factory))
        for param in (self.conv1d.weight, self.conv1d.bias, self.dt_bias, self.A_log):
            if param is not None:
                set_tensor_model_parallel_attributes(param, is_parallel=True, dim=0, stride=1)
        self.out_norm = build_module(submodules.out_norm, config=config, hidden_size=self.value_head_dim,
                                     eps=config.layernorm_epsilon)
        # One norm scale serves every head, and each TP rank's gradient covers its heads only.
        # A norm marked sequence_parallel (TE's under Megatron's sequence parallelism) is summed
        # over TP by Megatron's finalize_model_grads already.
        for param in self.out_norm.parameters():
            if not getattr(param, "sequence_parallel", False):
                sum_grad_over_tp(param, tp_group)
        self.out_proj = build_module(
            submodules.out_proj, self.v_dim, self.hidden_size, config=config,
            init_method=config.output_layer_init_method, bias=bias, input_is_parallel=True, skip_bias_add=True,
            is_expert=False, tp_comm_buffer_name="fc2", tp_group=tp_group)
        self.checkpoint_core_attention = recomputes_core_attention(config)
        self.reset_parameters()

    def _read_config(self, config, layer_number):
        """The head layout, checked, and the sizes megatron-core's sharded_state_dict reads."""
        check_gdn_head_layout(config, self.tp_size, f"{type(self).__name__} (layer {layer_number})")
        fields = {f: getattr(config, f) for f in SIZES}
        hk, hv = fields["linear_num_key_heads"], fields["linear_num_value_heads"]
        self.config, self.hidden_size = config, config.hidden_size
        self.conv_kernel_dim = fields["linear_conv_kernel_dim"]
        self.key_head_dim, self.value_head_dim = fields["linear_key_head_dim"], fields["linear_value_head_dim"]
        self.num_key_heads, self.num_value_heads = hk, hv
        self.qk_dim, self.v_dim = self.key_head_dim * hk, self.value_head_dim * hv
        tp = self.tp_size
        self.qk_dim_local_tp, self.v_dim_local_tp = self.qk_dim // tp, self.v_dim // tp
        self.num_k_heads_local_tp, self.num_v_heads_local_tp = hk // tp, hv // tp
        self.in_proj_dim = 2 * self.qk_dim + 2 * self.v_dim + 2 * hv
        self.in_proj_split_names = list(IN_PROJ_SPLIT_NAMES)
        self.in_proj_split_sections = (self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp,
                                       self.v_dim_local_tp, self.num_v_heads_local_tp, self.num_v_heads_local_tp)
        self.conv_dim = 2 * self.qk_dim + self.v_dim
        self.conv_dim_local_tp = self.conv_dim // tp
        self.sp_size = tp if config.sequence_parallel else 1

    def reset_parameters(self):
        """megatron-core's initialisation (conv1d uniform in +-conv_init when given, dt_bias 1,
        A uniform in A_init_range) from the same RNG stream, on the parameters' device."""
        if not self.config.perform_initialization:
            return
        with get_cuda_rng_tracker().fork(), torch.no_grad():
            if self.conv_init is not None:
                torch.nn.init.uniform_(self.conv1d.weight, -self.conv_init, self.conv_init)
            self.dt_bias.fill_(1.0)
            A = torch.empty_like(self.A_log).uniform_(*self.A_init_range)
            self.A_log.copy_(torch.log(A))

    def forward(self, hidden_states, attention_mask=None, *, inference_context=None, packed_seq_params=None,
                key_value_states=None, attention_bias=None, inference_params=None, **kwargs):
        """RoPE and the attention mask are not read, as in megatron-core (the recurrence is causal;
        documents come from packed_seq_params)."""
        name = type(self).__name__
        check_self_attention_call(name, "gated DeltaNet", inference_context, inference_params, key_value_states,
                                  attention_bias)
        o = self.lasp2_options
        cu_seqlens = cu_seqlens_of(name, packed_seq_params, o, self.pg_collection.cp)
        group = sp_group_of(self.pg_collection)
        mixed, _ = self.in_proj(hidden_states)  # [s, b, in_proj_dim / tp] (sequence parallel: gathered)
        mixed = mixed.transpose(0, 1)           # lasp2's "bthd"
        b, s = mixed.shape[:2]
        qkv, z, beta_logit, alpha = torch.split(
            mixed, [self.conv_dim_local_tp, self.v_dim_local_tp, self.num_v_heads_local_tp,
                    self.num_v_heads_local_tp], dim=-1)
        g = delta_log_gate(alpha, self.A_log, self.dt_bias)
        beta = beta_from_logits(beta_logit)
        # ONE cross-rank check a call, before the halo all-gather: the convolution's and the delta rule's
        checked = check_delta_layer_ranks(  # q and k are repeated to the value heads
            name, qkv, qkv.shape[-1], self.conv_kernel_dim,
            *op_stand_ins(qkv, self.num_v_heads_local_tp, self.key_head_dim, self.value_head_dim), g, beta,
            per_key=False, group=group, split=o.split, cu_seqlens=cu_seqlens, provider=o.provider,
            use_qk_l2norm=self.use_qk_l2norm, grad_inputs=[qkv, *self.conv1d.parameters()])
        # nn.Conv1d's [C, 1, W] weight with W - 1 left padding, cut to s: tap j reads x_{t-(W-1)+j}
        qkv = self.act_fn(causal_conv_sp(qkv, self.conv1d.weight.squeeze(1), self.conv1d.bias, group=group,
                                         split=o.split, cu_seqlens=checked.cu_seqlens, ranks_checked=checked))
        q, k, v = torch.split(qkv, [self.qk_dim_local_tp, self.qk_dim_local_tp, self.v_dim_local_tp], dim=-1)
        q = q.reshape(b, s, self.num_k_heads_local_tp, self.key_head_dim)
        k = k.reshape(b, s, self.num_k_heads_local_tp, self.key_head_dim)
        v = v.reshape(b, s, self.num_v_heads_local_tp, self.value_head_dim)
        rep = self.num_value_heads // self.num_key_heads
        if rep > 1:  # L2 norm per head commutes with the repeat: lasp2 normalises the repeated heads
            q, k = q.repeat_interleave(rep, dim=2), k.repeat_interleave(rep, dim=2)

        def delta_rule(q, k, v, g, beta):
            return lasp2.gated_delta_rule(q, k, v, g, beta, cu_seqlens=cu_seqlens, group=group, split=o.split,
                                          provider=o.provider, use_qk_l2norm=self.use_qk_l2norm,
                                          ranks_checked=checked)[0]

        out = run_core(self, delta_rule, q, k, v, g, beta)
        out = self._gated_norm(out, z).reshape(b, s, self.v_dim_local_tp).transpose(0, 1).contiguous()
        return self.out_proj(out)

    def _gated_norm(self, x, z):
        """out_norm over the value head dim times activation_func(z) in float32, in x's dtype
        (megatron-core's _apply_gated_norm, without its jit fusion)."""
        y = self.out_norm(x.reshape(-1, self.value_head_dim))
        y = y * self.act_fn(z.reshape(-1, self.value_head_dim).float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        o = self.lasp2_options
        return (f"layer={self.layer_number}, key_heads={self.num_k_heads_local_tp}, "
                f"value_heads={self.num_v_heads_local_tp} (this TP rank), provider={o.provider}, split={o.split}")
