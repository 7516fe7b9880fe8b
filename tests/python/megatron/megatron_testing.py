"""Shared pieces of the megatron-core integration tests (tiny GPT models, batches,
gradient gathering, comparisons, Megatron's DDP training loop, the Linear-MoE stand-in).

The models are megatron-core GPTModels (local spec, fp32, use_cpu_initialization,
no dropout): hidden 64, 4 heads (GQA: 2 query groups), vocab 128, sequence 32.
A "case" fixes the LASP-2 options, the position embedding and whether the batch
is packed (THD, batch 1, documents crossing CP ranks).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")

from megatron_patches import Lasp2Options  # noqa: E402

VOCAB, HIDDEN, HEADS, SEQ = 128, 64, 4, 32
PACKED_CU = (0, 5, 19, 21, 32)  # documents inside a rank's chunk and across CP ranks
# fp32 model, states exchanged in fp32: loss and every gradient (max |diff| / max |ref| over
# the whole model) of CP = P runs agree with CP = 1 to this bound (measured: ~1e-7 .. 1e-6)
FP32_TOL = 2e-5
# each parameter's own max |grad diff| / max |ref grad| (floored at 1e-3 of the model's max); measured <= 4e-6
PARAM_TOL = 1e-4


@dataclass
class Case:
    name: str
    options: Lasp2Options = field(default_factory=lambda: Lasp2Options(layer_pattern="LNLN"))
    num_layers: int = 4
    groups: int = 2
    pos_emb: str = "rope"
    packed: bool = False
    rope_split: Optional[str] = None  # megatron_patches.rope.use_lasp2_rope(split) for this case
    config: Dict[str, object] = field(default_factory=dict)  # TransformerConfig overrides


def worker_setup():
    """Per-process setup of a spawned test worker."""
    warnings.filterwarnings("ignore")
    from megatron_patches.cpu import enable_cpu_execution

    enable_cpu_execution()


def init_parallel(tp: int = 1, cp: int = 1, seed: int = 1234):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def transformer_config(case: Case, **overrides):
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_config import TransformerConfig

    kwargs = dict(num_layers=case.num_layers, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  num_query_groups=case.groups, ffn_hidden_size=2 * HIDDEN, use_cpu_initialization=True,
                  params_dtype=torch.float32, hidden_dropout=0.0, attention_dropout=0.0,
                  tensor_model_parallel_size=ps.get_tensor_model_parallel_world_size(),
                  context_parallel_size=ps.get_context_parallel_world_size())
    kwargs.update(overrides)
    if kwargs["tensor_model_parallel_size"] == 1:
        kwargs["sequence_parallel"] = False  # Megatron's sequence parallelism needs TP > 1
    return TransformerConfig(**kwargs)


def build_gpt(case: Case, seed: int = 7, **config_overrides):
    """GPTModel for the current parallel state; the same seed gives the same (TP-sliced) weights."""
    from megatron.core.models.gpt import GPTModel

    from megatron_patches.specs import get_lasp2_hybrid_block_spec

    config = transformer_config(case, **{**case.config, **config_overrides})
    torch.manual_seed(seed)
    return GPTModel(config=config, transformer_layer_spec=get_lasp2_hybrid_block_spec(config, case.options),
                    vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type=case.pos_emb)


def global_batch(case: Case, seed: int = 0, batch: int = 2):
    """The whole batch (identical on every rank) and, packed, its global cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    b = 1 if case.packed else batch
    tokens = torch.randint(0, VOCAB, (b, SEQ + 1), generator=gen)
    loss_mask = torch.ones(b, SEQ)
    loss_mask[:, 3] = 0.0
    out = {"tokens": tokens[:, :-1], "labels": tokens[:, 1:], "loss_mask": loss_mask,
           "position_ids": torch.arange(SEQ).expand(b, SEQ).clone()}
    cu = None
    if case.packed:
        cu = torch.tensor(PACKED_CU, dtype=torch.int32)
        doc = torch.searchsorted(cu.long(), torch.arange(SEQ), right=True) - 1
        out["position_ids"] = (torch.arange(SEQ) - cu.long()[doc])[None]
    return out, cu


def local_batch(case: Case, batch, cu):
    from megatron_patches.batch import get_batch_on_this_sp_rank, get_packed_batch_on_this_sp_rank

    if case.packed:
        return get_packed_batch_on_this_sp_rank(batch, cu, split=case.options.split)
    return get_batch_on_this_sp_rank(batch, split=case.options.split), None


def apply_rope_patch(case: Case):
    from megatron_patches import rope

    if case.rope_split is None:
        rope.restore_megatron_rope()
    else:
        rope.use_lasp2_rope(case.rope_split)


def local_loss(model, case: Case, batch, cu):
    """This rank's share of the global mean token loss (sums to it over the CP group)."""
    local, packed = local_batch(case, batch, cu)
    per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                      packed_seq_params=packed)
    return (per_token * local["loss_mask"]).sum() / batch["loss_mask"].sum()


def full_tensor(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value (a param or its grad) with TP shards gathered along the param's partition dim."""
    from megatron.core import parallel_state as ps

    group = ps.get_tensor_model_parallel_group()
    if group.size() == 1 or not getattr(param, "tensor_model_parallel", False):
        return value.detach().clone()
    parts = [torch.empty_like(value) for _ in range(group.size())]
    dist.all_gather(parts, value.detach().contiguous(), group=group)
    return torch.cat(parts, dim=param.partition_dim)


def loss_and_grads(model, case: Case, batch, cu):
    """Global loss and full (TP-gathered, CP-summed) gradients of every parameter."""
    from megatron.core import parallel_state as ps

    apply_rope_patch(case)
    model.zero_grad(set_to_none=True)
    loss = local_loss(model, case, batch, cu)
    loss.backward()
    cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
    total = loss.detach().clone()
    dist.all_reduce(total, group=cp_group)
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is None:
            continue
        g = p.grad.detach().clone()
        dist.all_reduce(g, group=cp_group)  # replicated over CP: Megatron reduces over dp x cp
        if model.config.sequence_parallel and getattr(p, "sequence_parallel", False):
            dist.all_reduce(g, group=tp_group)  # as Megatron's finalize_model_grads does
        grads[name] = full_tensor(p, g)
    return total.item(), grads


def full_state(model) -> Dict[str, torch.Tensor]:
    return {n: full_tensor(p, p) for n, p in model.named_parameters()}


def compare(ref, got) -> Dict[str, float]:
    """Relative loss difference and max |grad diff| / max |ref grad| over all parameters."""
    (ref_loss, ref_grads), (loss, grads) = ref, got
    if set(ref_grads) != set(grads):
        raise AssertionError(f"parameter sets differ: {sorted(set(ref_grads) ^ set(grads))}")
    scale = max(g.abs().max().item() for g in ref_grads.values())
    worst, worst_name, param_rel = 0.0, None, 0.0
    for name, g in ref_grads.items():
        diff = (grads[name] - g).abs().max().item()
        if diff > worst:
            worst, worst_name = diff, name
        # per parameter too, so that a parameter with small gradients (gates) cannot hide
        param_rel = max(param_rel, diff / max(g.abs().max().item(), 1e-3 * scale))
    return {"loss": loss, "ref_loss": ref_loss, "loss_rel": abs(loss - ref_loss) / abs(ref_loss),
            "grad_rel": worst / scale, "param_rel": param_rel, "worst": worst_name, "n_params": len(ref_grads)}


def max_state_diff(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> float:
    if set(a) != set(b):
        raise AssertionError(f"parameter sets differ: {sorted(set(a) ^ set(b))}")
    return max((a[k] - b[k]).abs().max().item() for k in a)


def matches(r: Dict[str, float], tol: float = FP32_TOL) -> bool:
    return r["loss_rel"] <= tol and r["grad_rel"] <= tol and r["param_rel"] <= PARAM_TOL


def format_failures(results: Dict[str, Dict[str, float]], tol: float = FP32_TOL):
    return {name: r for name, r in results.items() if not matches(r, tol)}


def linear_moe_config(decay="gate", split="balanced", **fields):
    """A TransformerConfig with the Linear-MoE fields the core module reads."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=HIDDEN, num_attention_heads=HEADS,
                               use_cpu_initialization=True, params_dtype=torch.float32)
    values = dict(la_mode="chunk", la_feature_map="relu", la_output_norm="rmsnorm", la_elementwise_affine=True,
                  la_norm_eps=1e-6, gla_la_gate_logit_normalizer=16.0, lasp2_decay=decay, lasp2_split=split)
    values.update(fields)
    for name, value in values.items():
        setattr(config, name, value)
    return config


def swap_forward(layer, core, x):
    """What Linear-MoE's outer LinearAttention does around its core: project, call, project."""
    s, b, _ = x.shape
    heads = (s, b, layer.num_heads, layer.head_dim)
    q, k, v = layer.q_proj(x).view(heads), layer.k_proj(x).view(heads), layer.v_proj(x).view(heads)
    gk = layer.g_proj(x) if layer.g_proj is not None else None  # per-head gate logits [s, b, h]
    o = core(q=q, k=k, v=v, gk=gk) if gk is not None else core(q=q, k=k, v=v)
    assert o.shape == (s, b, layer.num_heads * layer.head_dim)
    return layer.o_proj(o)


def ddp_train(case, tp, cp, steps=3, global_batch_size=4):
    """Megatron DDP (grads reduced over the dp x cp group) + SGD; the global loss per step."""
    from megatron.core import parallel_state as ps
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    init_parallel(tp=tp, cp=cp)
    model = build_gpt(case, seed=3)
    model = DistributedDataParallel(config=model.config, ddp_config=DistributedDataParallelConfig(), module=model)
    params = [p for p in model.parameters() if p.requires_grad]
    # torch SGD over DDP's main_grad (get_megatron_optimizer allocates on cuda); SGD keeps the
    # parameter differences proportional to the gradient differences (Adam amplifies tiny ones)
    opt = torch.optim.SGD(params, lr=0.5)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    dp_cp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    losses = []
    for step in range(steps):
        batch, cu = global_batch(case, seed=100 + step, batch=global_batch_size)
        total_tokens = batch["loss_mask"].sum()
        mine = {k: v.chunk(dp_size)[dp_rank] for k, v in batch.items()}
        model.zero_grad_buffer()
        opt.zero_grad(set_to_none=True)
        local, packed = local_batch(case, mine, cu)
        per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"],
                          packed_seq_params=packed)
        share = (per_token * local["loss_mask"]).sum() / total_tokens  # sums to the global mean
        (share * dp_cp_size).backward()  # DDP averages over dp x cp
        model.finish_grad_sync()
        for p in params:
            p.grad = p.main_grad
        opt.step()
        total = share.detach().clone()
        dist.all_reduce(total)  # over every rank: each TP rank holds the same share
        losses.append(total.item() / tp)
    return losses, full_state(model.module)
