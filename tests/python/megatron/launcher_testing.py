"""The launcher tests' view of a whole model (test_megatron_pretrain.py, test_megatron_moe.py):
every parameter under one global name whatever the layout, set from a generator seeded by
that name, gathered onto every rank and compared. A tensor-parallel parameter is a shard of
its whole value along its partition dim, cut in (expert) TP rank order.

Global names: pipeline stages' layer indices made global, the last stage's copy of a tied
embedding named as the embedding, and MoE experts by their global index (EP rank x experts
a rank + local index), so a run at EP 2 names its experts as one at EP 1 does.
"""

import re
import zlib

import torch
import torch.distributed as dist

EXPERT = re.compile(r"(.*\.local_experts\.)(\d+)(\..*)")


def global_named_params(chunks):
    """(global name, parameter) of this rank's model chunks."""
    from megatron.core import parallel_state as ps

    ep_rank = ps.get_expert_model_parallel_rank()
    for chunk in chunks:
        model = chunk.module
        for name, param in model.named_parameters():
            if name.startswith("decoder.layers."):
                local, rest = name[len("decoder.layers."):].split(".", 1)
                name = f"decoder.layers.{model.decoder.layers[int(local)].layer_number - 1}.{rest}"
            elif name == "output_layer.weight" and model.share_embeddings_and_output_weights:
                name = "embedding.word_embeddings.weight"  # the last pipeline stage's copy
            match = EXPERT.match(name)
            if match:
                per_rank = model.decoder.layers[0].mlp.num_local_experts
                name = f"{match[1]}{ep_rank * per_rank + int(match[2])}{match[3]}"
            yield name, param


def initial_value(name, shape):
    """The starting value of the parameter `name` (norm weights around 1)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.randn(shape, generator=gen) * 0.1
    return values + 1.0 if name.endswith(("layernorm.weight", "norm.weight", "norm_weight")) else values


def _tp_group(param):
    """The group a tensor-parallel parameter is split over (None: whole on every TP rank).
    Experts' (allreduce = False) is the expert-TP group, the others' the TP group."""
    from megatron.core import parallel_state as ps

    if not getattr(param, "tensor_model_parallel", False):
        return None
    group = (ps.get_tensor_model_parallel_group() if getattr(param, "allreduce", True)
             else ps.get_expert_tensor_parallel_group())
    if group.size() == 1:
        return None
    assert getattr(param, "partition_stride", 1) == 1, "a strided shard is not one cut of the whole value"
    return group


def set_weights(chunks):
    """Every parameter from initial_value: whole or this rank's TP shard of the whole value;
    under FSDP2 a DTensor whose dp-cp shards are cut from that. The launcher's after_model_build
    hook."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, param in global_named_params(chunks):
            group = _tp_group(param)
            if group is None:
                values = initial_value(name, param.shape)
            else:
                shape = list(param.shape)
                shape[param.partition_dim] *= group.size()
                values = initial_value(name, shape).chunk(group.size(), param.partition_dim)[dist.get_rank(group)]
            if isinstance(param, DTensor):
                values = distribute_tensor(values, param.device_mesh, param.placements)
            param.copy_(values)


def reuse_datasets():
    """Makes pretrain_gpt.build_dataset build the mock dataset once in this process.

    megatron-core's mock GPT dataset indexes and shuffles a 100,000-document corpus (12.8 M
    samples of 16 tokens) on every rank of every launch: measured 1.3 s of a 3.3 s test launch.
    What it holds depends on the flags in the key below, not on the layout, nor on the sample
    count (train iters x global batch) while that is within one epoch: megatron-core then
    indexes exactly one epoch (gpt_dataset._build_document_sample_shuffle_indices), and a test's
    few dozen samples are far below the mock corpus' 12.8 M. A launch that needs more than the
    kept dataset holds builds its own. So a worker's later launches read the samples a fresh
    build gives them (losses and weights bit for bit, checked). --data-path datasets are built
    every time. Idempotent."""
    from megatron_patches import pretrain_gpt

    if getattr(pretrain_gpt.build_dataset, "reused", False):
        return
    build, built = pretrain_gpt.build_dataset, {}

    def build_once(args):
        if args.data_path:
            return build(args)
        # the flags build_dataset reads but the sample count (see above)
        key = (args.seed, args.seq_length, args.vocab_size)
        if key not in built or len(built[key]) < args.train_iters * args.global_batch_size:
            built[key] = build(args)
        return built[key]

    build_once.reused = True
    pretrain_gpt.build_dataset = build_once


def run_launcher(argv, after_model_build=set_weights, **kwargs):
    """One launcher run of a test: megatron_patches.pretrain_gpt on Megatron-LM's flags, the
    weights set by set_weights once the model is built (after_model_build=None: as the launcher
    builds them, or from --load). The mock dataset is built once a process (reuse_datasets)."""
    from megatron_patches import pretrain_gpt

    reuse_datasets()
    return pretrain_gpt.pretrain(pretrain_gpt.parse_args(argv), after_model_build=after_model_build, **kwargs)


def _whole(param):
    """A parameter's whole value: an FSDP2 DTensor gathered over its dp-cp mesh (this TP rank's
    shard), then a TP shard over its TP group (collectives, in the same order on every rank)."""
    full_tensor = getattr(param, "full_tensor", None)
    value = (full_tensor() if full_tensor is not None else param).detach().clone()
    group = _tp_group(param)
    if group is None:
        return value
    parts = [torch.empty_like(value) for _ in range(group.size())]
    dist.all_gather(parts, value.contiguous(), group=group)
    return torch.cat(parts, param.partition_dim)


def whole_weights(chunks):
    """Every parameter of the whole model (every stage's, every EP rank's experts), on every rank."""
    mine = {name: _whole(p) for name, p in global_named_params(chunks)}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    out = {}
    for part in gathered:
        out.update(part)
    return out


def config_errors_on_every_rank(fn, *args):
    """fn(*args) on this rank; every rank's Lasp2ConfigError message (None where fn returned),
    gathered on every rank: a refusal must happen on all of them, none left waiting."""
    from megatron_patches import Lasp2ConfigError

    try:
        fn(*args)
        error = None
    except Lasp2ConfigError as exc:
        error = str(exc)
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    return errors


def max_diff(a, b):
    """The largest absolute difference of two whole models' weights (same names)."""
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_same_losses(r, ref, rel=1e-5):
    """Runs r and ref logged the same loss at each step, to `rel` relative (the callers check
    the step counts)."""
    for got, want in zip(r["losses"], ref["losses"]):
        assert abs(got - want) <= rel * abs(want), (r["losses"], ref["losses"])


def assert_same_load_balancing_losses(r, ref, rel=1e-5):
    """Runs r and ref (MoE, load-balancing loss on) logged the same load_balancing_loss at each
    step, to `rel` relative."""
    for got, want in zip(r["aux"], ref["aux"]):
        assert abs(got["load_balancing_loss"] - want["load_balancing_loss"]) <= rel * want["load_balancing_loss"]


def assert_resumed_as_the_uninterrupted_run(r, weight_tol=None):
    """r: the losses of a 3-step run ("whole") and of its resume from the step-2 checkpoint
    ("resumed"), and where given the largest weight difference after step 3 ("weight_diff").
    The resume ran step 3 alone, from trained weights, with the uninterrupted run's loss."""
    assert len(r["resumed"]) == 1 and len(r["whole"]) == 3, r  # steps 1-2 came from the checkpoint
    assert abs(r["resumed"][0] - r["whole"][2]) <= 1e-5 * abs(r["whole"][2]), r
    assert r["resumed"][0] < r["whole"][0], r  # trained weights, not a fresh start
    if weight_tol is not None:
        assert r["weight_diff"] <= weight_tol, r
