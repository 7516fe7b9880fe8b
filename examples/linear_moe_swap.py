"""Swap lasp2 into a Linear-MoE model: one line in its layer spec.

Linear-MoE (OpenSparseLLMs/Linear-MoE) builds each linear-attention layer from
`LinearAttentionSubmodules(qkv_proj=..., o_gate_proj=..., gk_proj=...,
core_linear_attention=<LightningAttention | GLA | LASP2 | ...>, o_proj=...)`. Using
lasp2 is the one line

    core_linear_attention=Lasp2LinearAttention,

after which the layer's sequence parallelism is LASP-2 over Megatron's context-parallel
group. Linear-MoE is not needed to run this file: `MiniLinearAttention` below does what
its outer LinearAttention does around the core (project q/k/v and gate logits, call
`core(q=, k=, v=, gk=)`, output gate, output projection).

    python examples/linear_moe_swap.py                                   # one process
    torchrun --standalone --nproc_per_node 2 examples/linear_moe_swap.py  # CP = 2, gloo

Each rank checks its output slice and the (CP-summed) gradients against the layer run
on the whole sequence without context parallelism.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")

from megatron.core import parallel_state  # noqa: E402
from megatron.core.transformer.spec_utils import ModuleSpec, build_module  # noqa: E402
from megatron.core.transformer.transformer_config import TransformerConfig  # noqa: E402

import lasp2  # noqa: E402
from megatron_patches.linear_moe import Lasp2LinearAttention  # noqa: E402


@dataclass
class LinearAttentionSubmodules:
    """Linear-MoE's submodules dataclass (linear_moe/sequence_modeling/linear_attention.py)."""
    qkv_proj: Union[ModuleSpec, type] = None
    o_gate_proj: Union[ModuleSpec, type] = None
    gk_proj: Union[ModuleSpec, type] = None
    core_linear_attention: Union[ModuleSpec, type] = None
    o_proj: Union[ModuleSpec, type] = None


class MiniLinearAttention(torch.nn.Module):
    """Stands in for Linear-MoE's outer LinearAttention (plain linears instead of TP ones)."""

    def __init__(self, config, submodules: LinearAttentionSubmodules):
        super().__init__()
        h, self.heads = config.hidden_size, config.num_attention_heads
        self.qkv_proj = torch.nn.Linear(h, 3 * h, bias=False)
        self.o_gate_proj = torch.nn.Linear(h, h, bias=False)
        self.gk_proj = torch.nn.Linear(h, self.heads)  # per-head gate logits (lasp2 gates are per head)
        self.core_linear_attention = build_module(submodules.core_linear_attention, config=config,
                                                  expand_k=1.0, expand_v=1.0)
        self.o_proj = torch.nn.Linear(h, h, bias=False)

    def forward(self, hidden_states, attention_mask=None, rotary_pos_emb=None, packed_seq_params=None):
        n, b, _ = hidden_states.shape
        q, k, v = self.qkv_proj(hidden_states).view(n, b, self.heads, -1).chunk(3, dim=-1)
        o = self.core_linear_attention(q=q, k=k, v=v, gk=self.gk_proj(hidden_states))  # [n, b, h*d]
        o = o * F.silu(self.o_gate_proj(hidden_states))
        return self.o_proj(o)


def linear_moe_config(split: str = "balanced") -> TransformerConfig:
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4, use_cpu_initialization=True,
                               params_dtype=torch.float32)
    # the Linear-MoE fields its core modules read, plus lasp2's (all optional)
    for name, value in dict(la_mode="chunk", la_feature_map="elu+1", la_output_norm="rmsnorm",
                            la_elementwise_affine=True, la_norm_eps=1e-6, gla_la_gate_logit_normalizer=16.0,
                            lasp2_decay="gate", lasp2_split=split).items():
        setattr(config, name, value)
    return config


def main(split: Optional[str] = None):
    world = int(os.environ.get("WORLD_SIZE", 1))
    split = split or os.environ.get("LASP2_SPLIT", "balanced")
    config = linear_moe_config(split)
    torch.manual_seed(0)
    layer = MiniLinearAttention(config, LinearAttentionSubmodules(
        core_linear_attention=Lasp2LinearAttention,  # <- the swap (was LightningAttention, GLA, LASP2, ...)
    ))
    x = torch.randn(256, 2, config.hidden_size)  # [n, b, hidden], Megatron's order

    # the whole sequence, no context parallelism (parallel state not initialised yet)
    full = layer(x)
    full_grads = torch.autograd.grad(full.square().sum(), list(layer.parameters()))
    if world == 1:
        print(f"one process: output {list(full.shape)}, loss {full.square().sum().item():.6f}")
        return

    dist.init_process_group("gloo")
    parallel_state.initialize_model_parallel(context_parallel_size=world)  # the CP group lasp2 uses
    cp_group = parallel_state.get_context_parallel_group()
    x_local = lasp2.split_sequence(x, cp_group, split=split, dim=0)  # this rank's tokens
    y = layer(x_local)
    grads = torch.autograd.grad(y.square().sum(), list(layer.parameters()))
    for g in grads:
        dist.all_reduce(g, group=cp_group)  # parameters are replicated over CP
    y_ref = lasp2.split_sequence(full.detach(), cp_group, split=split, dim=0)
    out_err = ((y - y_ref).abs().max() / y_ref.abs().max()).item()
    grad_err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(grads, full_grads))
    print(f"rank {dist.get_rank()}/{world} ({split} split): output rel. error {out_err:.1e}, "
          f"gradient rel. error {grad_err:.1e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
