"""Pretrain a small hybrid GPT (linear + softmax attention) with megatron-core and lasp2.

A minimal hand-written loop showing the pieces (model call, DDP, a torch optimizer). For
training on Megatron's own schedules, optimizer and checkpoints use the launcher
`python -m megatron_patches.pretrain_gpt` (docs/megatron.md).

Linear-attention layers run LASP-2 and softmax layers LASP-2H over Megatron's
context-parallel group; TP, DP (Megatron's DDP over the dp x cp group) compose as usual.

CPU, 2 processes with gloo (tiny model, a few seconds a step):

    torchrun --standalone --nproc_per_node 2 examples/megatron_hybrid_gpt.py \\
        --context-parallel-size 2 --hybrid-layer-pattern LLLN --check

GPUs with NCCL (here 8: TP 2 x CP 4):

    torchrun --standalone --nproc_per_node 8 examples/megatron_hybrid_gpt.py --device cuda \\
        --tensor-model-parallel-size 2 --context-parallel-size 4 --hidden-size 1024 \\
        --num-attention-heads 16 --seq-length 16384 --num-layers 8 --hybrid-layer-pattern LLLNLLLN

The LASP-2 flags are those of megatron_patches.arguments.add_lasp2_args (--sp-provider,
--sp-split, --hybrid-layer-pattern, --linear-attention-decay, ...). The data is a
synthetic stream of arithmetic progressions modulo the vocabulary (learnable from
context, so the loss falls). With --check the same steps run again with TP = CP = 1
(every rank a data-parallel replica) and the per-step loss difference is printed.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import torch
import torch.distributed as dist

from megatron_patches import add_lasp2_args, options_from_args


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model and run")
    g.add_argument("--num-layers", type=int, default=4)
    g.add_argument("--hidden-size", type=int, default=64)
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None, help="GQA groups (default: heads)")
    g.add_argument("--vocab-size", type=int, default=128)
    g.add_argument("--seq-length", type=int, default=64)
    g.add_argument("--global-batch-size", type=int, default=4)
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute", "none"], default="rope")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--context-parallel-size", type=int, default=1)
    g.add_argument("--steps", type=int, default=20)
    g.add_argument("--lr", type=float, default=1e-2)
    g.add_argument("--optimizer", choices=["adamw", "sgd"], default="sgd",
                   help="sgd (default) keeps --check's differences at float-noise level (~1e-7); Adam's "
                        "normalised steps turn float noise in near-zero gradients into full-size updates, "
                        "so with adamw the curves drift apart by ~1e-2 over 20 steps although every "
                        "step's gradients agree to ~1e-6")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    g.add_argument("--check", action="store_true", help="rerun with TP = CP = 1 and print the loss difference")
    add_lasp2_args(parser)
    return parser.parse_args()


def synthetic_batch(args, step: int, device):
    """[B, S + 1] tokens: t_i = (a + b i) mod V with per-sequence a, b (the same on every rank)."""
    gen = torch.Generator().manual_seed(args.seed * 1000 + step)
    b, s, v = args.global_batch_size, args.seq_length, args.vocab_size
    start = torch.randint(0, v, (b, 1), generator=gen)
    stride = torch.randint(1, 8, (b, 1), generator=gen)
    tokens = (start + stride * torch.arange(s + 1)) % v
    return {"tokens": tokens[:, :-1].to(device), "labels": tokens[:, 1:].to(device),
            "loss_mask": torch.ones(b, s, device=device),
            "position_ids": torch.arange(s, device=device).expand(b, s).contiguous()}


def build(args, options, tp: int, cp: int, device):
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_patches.specs import get_lasp2_hybrid_block_spec

    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups, ffn_hidden_size=4 * args.hidden_size,
        tensor_model_parallel_size=tp, context_parallel_size=cp, params_dtype=torch.float32,
        use_cpu_initialization=True,  # the same weights for every TP x CP layout (sliced for TP)
        hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(args.seed)
    model = GPTModel(config=config, transformer_layer_spec=get_lasp2_hybrid_block_spec(config, options),
                     vocab_size=args.vocab_size, max_sequence_length=args.seq_length,
                     position_embedding_type=args.position_embedding_type).to(device)
    # Parameters are replicated over CP: DDP reduces their gradients over the dp x cp group.
    return DistributedDataParallel(config=config, ddp_config=DistributedDataParallelConfig(), module=model)


def train(args, options, tp: int, cp: int, device, log: bool):
    from megatron.core import parallel_state as ps

    from megatron_patches.batch import get_batch_on_this_sp_rank

    model = build(args, options, tp, cp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    # A torch optimizer over DDP's main_grad buffers (runs on CPU too; on GPUs Megatron's own
    # get_megatron_optimizer / distributed optimizer can be used instead).
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    else:
        opt = torch.optim.SGD(params, lr=args.lr)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    dp_cp_size = ps.get_data_parallel_world_size(with_context_parallel=True)
    if args.global_batch_size % dp_size:
        raise SystemExit(f"--global-batch-size {args.global_batch_size} must be divisible by DP size {dp_size}")
    losses = []
    for step in range(args.steps):
        start = time.perf_counter()
        batch = synthetic_batch(args, step, device)
        total_tokens = batch["loss_mask"].sum()
        mine = {k: v.chunk(dp_size)[dp_rank] for k, v in batch.items()}  # DP splits the batch
        local = get_batch_on_this_sp_rank(mine, split=options.split)  # CP splits the sequence
        model.zero_grad_buffer()
        opt.zero_grad(set_to_none=True)
        per_token = model(local["tokens"], local["position_ids"], None, labels=local["labels"])
        share = (per_token * local["loss_mask"]).sum() / total_tokens  # sums to the global mean loss
        (share * dp_cp_size).backward()  # DDP averages gradients over dp x cp
        model.finish_grad_sync()
        for p in params:
            p.grad = p.main_grad
        opt.step()
        loss = share.detach().clone()
        dist.all_reduce(loss)
        loss = loss.item() / tp  # every TP rank holds the same share
        losses.append(loss)
        if log:
            print(f"[tp={tp} cp={cp} dp={dp_size}] step {step}: loss {loss:.6f} ({time.perf_counter() - start:.2f} s)",
                  flush=True)
    return losses


def main():
    args = parse_args()
    options = options_from_args(args).validate(args.num_layers)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|full scope is deprecated).*")
    if device.type == "cpu":
        from megatron_patches.cpu import enable_cpu_execution

        enable_cpu_execution()
    if options.split == "contiguous" and args.position_embedding_type == "rope":
        from megatron_patches.rope import use_lasp2_rope

        use_lasp2_rope("contiguous")  # Megatron slices RoPE zig-zag (= balanced) otherwise
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, cp = args.tensor_model_parallel_size, args.context_parallel_size
    if world % (tp * cp):
        raise SystemExit(f"world size {world} must be divisible by TP x CP = {tp * cp}")
    if rank == 0:
        print(f"world {world}: TP {tp} x CP {cp} x DP {world // (tp * cp)}; options {options}", flush=True)
    losses = train(args, options, tp, cp, device, log=rank == 0)
    if args.check:
        reference = train(args, options, 1, 1, device, log=False)
        if rank == 0:
            for step, (a, b) in enumerate(zip(losses, reference)):
                print(f"check step {step}: TP {tp} x CP {cp} loss {a:.6f}, TP = CP = 1 loss {b:.6f}, "
                      f"|diff| {abs(a - b):.2e}", flush=True)
            worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
            print(f"max relative loss difference over {args.steps} steps: {worst:.2e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
