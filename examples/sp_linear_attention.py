"""Sequence-parallel linear attention with LASP-2, checked against one process.

    torchrun --standalone --nproc_per_node 2 examples/sp_linear_attention.py [--decay gate] [--split balanced]

Each rank holds 1/P of a long sequence. The layer's output and its parameter
gradients (summed over ranks, as data-parallel x context-parallel reduction does)
are compared with the same layer run on the whole sequence in one process.
Runs on CPU with gloo by default, on GPUs with NCCL when --device cuda.
"""

import argparse
import os
import time

import torch
import torch.distributed as dist

import lasp2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=1024, help="global sequence length")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--decay", choices=["none", "fixed", "gate"], default="gate")
    parser.add_argument("--split", choices=["contiguous", "balanced"], default="contiguous")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp_group = dist.new_group(list(range(world)))  # stands in for Megatron's context-parallel group
    dtype = torch.float32

    torch.manual_seed(0)  # same weights and data on every rank
    layer = lasp2.nn.LinearAttention(args.hidden, args.heads, decay=args.decay, device=device, dtype=dtype)
    x = torch.randn(args.batch, args.seq_len, args.hidden, device=device, dtype=dtype)

    # one process, whole sequence
    y_full = layer(x)
    grads_full = torch.autograd.grad(y_full.square().mean() * world, list(layer.parameters()))

    # LASP-2 over the group: each rank its share of the sequence
    sp_context = lasp2.build_sp_context(sp_group, args.split, seqlen=args.seq_len, device=device)
    x_local = lasp2.split_sequence(x, sp_group, split=args.split)
    start = time.perf_counter()
    y = layer(x_local, sp_context=sp_context)
    grads = torch.autograd.grad(y.square().mean(), list(layer.parameters()))
    elapsed = time.perf_counter() - start
    for grad in grads:
        dist.all_reduce(grad, group=sp_group)

    want = lasp2.split_sequence(y_full, sp_group, split=args.split)
    out_err = ((y - want).abs().max() / want.abs().max()).item()
    grad_err = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(grads, grads_full))
    errors = torch.tensor([out_err, grad_err], device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    ok = errors.max().item() < 1e-4
    if rank == 0:
        print(f"lasp2 example: {world} ranks, split={args.split}, decay={args.decay}, "
              f"global T={args.seq_len} ({args.seq_len // world} tokens per rank), device={device.type}")
        print(f"  max relative error vs one process: output {errors[0].item():.2e}, "
              f"parameter grads {errors[1].item():.2e}  ->  {'OK' if ok else 'MISMATCH'}")
        print(f"  SP forward+backward on rank 0: {elapsed * 1e3:.1f} ms")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
