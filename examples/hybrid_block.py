"""A hybrid (linear + softmax attention) stack under sequence parallelism, checked against one process.

    torchrun --standalone --nproc_per_node 2 examples/hybrid_block.py [--split balanced] [--pattern LLLS]
    torchrun --standalone --nproc_per_node 4 examples/hybrid_block.py --device cuda --dtype bfloat16

Each rank holds 1/P of a long sequence. Linear-attention layers run LASP-2 (one
AllGather of d x d states), softmax-attention layers LASP-2H (one AllGather of K/V
in forward, one reduce-scatter of dK/dV in backward); all layers share the SP group
and the split, so activations stay where they are between layers. The output and
the parameter gradients (summed over ranks, as data-parallel x context-parallel
reduction does) are compared with the same stack run on the whole sequence in one
process. Runs on CPU with gloo by default, on GPUs with NCCL when --device cuda.
"""

import argparse
import copy
import os
import time

import torch
import torch.distributed as dist

import lasp2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-len", type=int, default=512, help="global sequence length")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2, help="K/V heads of the softmax layers (GQA)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--pattern", default="LLLS",
                        help="one letter a layer: L linear, S softmax attention, G gated DeltaNet, "
                             "K Kimi Delta Attention (e.g. KKKS)")
    parser.add_argument("--split", choices=["contiguous", "balanced"], default="balanced")
    parser.add_argument("--docs", action="store_true", help="pack 3 documents (batch 1, cu_seqlens)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    sp_group = dist.new_group(list(range(world)))  # stands in for Megatron's context-parallel group
    dtype = getattr(torch, args.dtype)

    torch.manual_seed(0)  # same weights and data on every rank
    stack = lasp2.nn.HybridStack(args.hidden, args.heads, pattern=args.pattern,
                                 softmax_kwargs={"num_kv_heads": args.kv_heads} if "S" in args.pattern else None,
                                 device=device, dtype=dtype)
    batch = 1 if args.docs else args.batch
    x = torch.randn(batch, args.seq_len, args.hidden, device=device, dtype=dtype)
    w = torch.randn_like(x)  # loss = <y, w>: a random projection of the output
    cu = None
    if args.docs:
        T = args.seq_len
        cu = torch.tensor([0, T // 3 + 1, T // 2 + 3, T], device=device)  # documents cross rank edges

    # one process, whole sequence: in the run's dtype and, as the yardstick, in float32
    def full_run(model, dtype_):
        y_ = model(x.to(dtype_), cu_seqlens=cu)
        return y_, torch.autograd.grad((y_.float() * w.float()).sum(), list(model.parameters()))

    y_full, grads_full = full_run(stack, dtype)
    y_ref, grads_ref = full_run(copy.deepcopy(stack).float(), torch.float32)

    # LASP-2 + LASP-2H over the group: each rank its share of the sequence; the SP
    # context (group, split, documents, RoPE positions) is built once for the batch
    sp_context = lasp2.build_sp_context(sp_group, args.split, cu, seqlen=args.seq_len, device=device)
    x_local = lasp2.split_sequence(x, sp_group, split=args.split)
    w_local = lasp2.split_sequence(w, sp_group, split=args.split)
    start = time.perf_counter()
    y = stack(x_local, sp_context=sp_context)
    grads = torch.autograd.grad((y.float() * w_local.float()).sum(), list(stack.parameters()))
    elapsed = time.perf_counter() - start
    grads = [grad.float() for grad in grads]
    for grad in grads:
        dist.all_reduce(grad, group=sp_group)

    local = lambda t: lasp2.split_sequence(t, sp_group, split=args.split)
    rel = lambda a, b: ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12)).item()
    # SP vs one process, and both vs the float32 yardstick: in half precision SP must be
    # as close to float32 as the single-process run is (rounding order differs, not math).
    errors = torch.tensor([rel(y, local(y_full)), max(rel(a, b) for a, b in zip(grads, grads_full)),
                           rel(y, local(y_ref)), max(rel(a, b) for a, b in zip(grads, grads_ref)),
                           rel(y_full, y_ref), max(rel(a, b) for a, b in zip(grads_full, grads_ref))],
                          device=device)
    dist.all_reduce(errors, op=dist.ReduceOp.MAX)
    e = errors.tolist()
    if dtype == torch.float32:
        ok = max(e[:2]) < 1e-4
    else:
        ok = e[2] <= 2 * e[4] + 1e-3 and e[3] <= 2 * e[5] + 1e-3
    if rank == 0:
        print(f"lasp2 hybrid example: {world} ranks, pattern={args.pattern} "
              "(L: LASP-2, S: LASP-2H, G / K: delta rule), "
              f"split={args.split}, docs={args.docs}, global T={args.seq_len} "
              f"({args.seq_len // world} tokens per rank), {args.dtype} on {device.type}")
        print(f"  max relative error vs one process: output {e[0]:.2e}, parameter grads {e[1]:.2e}")
        if dtype != torch.float32:
            print(f"  vs float32 one process: SP output {e[2]:.2e}, grads {e[3]:.2e}; "
                  f"{args.dtype} one process output {e[4]:.2e}, grads {e[5]:.2e}")
        print(f"  -> {'OK' if ok else 'MISMATCH'}")
        print(f"  SP forward+backward on rank 0: {elapsed * 1e3:.1f} ms")
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
