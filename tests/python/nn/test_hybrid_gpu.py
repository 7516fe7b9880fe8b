"""lasp2.nn.HybridStack "LGKS" (linear attention with gates, gated DeltaNet, KDA, softmax
attention) forward and backward on one CUDA GPU (marker gpu) in bf16 and fp32 against the
same module in float64 on the CPU: the output, the input gradient and every parameter's
gradient, for rows and packed documents.

The reference module holds the device module's weights cast back to float64 and reads the
device input cast back too (the rounded values are the problem, as in the ops' GPU tests),
so the difference is the device run's arithmetic alone. Bounds are the ops' own GPU bounds
(tests/python/ops/test_delta_rule_gpu.py: bf16 2e-2, fp32 2e-4, the loosest of the four
mixers' ops) for the output, and in fp32 for everything. The same bodies run on the CPU
(lasp2's CPU kernels, one process and 2 / 4 gloo ranks) measured: fp32 at most 4e-6 for
everything; bf16 output <= 1.2e-2, but bf16 gradients up to 2.9e-2 here (the linear layer's
gate-projection bias) and 4.5e-2 with 132 rows (the first token's input gradient: it
carries the linear layer's gate gradient, a cancelling sum whose ops-level bound is
4 tol sqrt(T / 64)); parameter gradients are sums over every token of rounded activations
too. So a bf16 gradient is held to lasp2_testing.checks.module_grad_bound: 2e-2 or three
times the CPU kernels' own bf16 error on the same inputs, capped at the ops' gate-gradient
bound (a wrong CUDA result is off by O(1)). On one H200 (session 20) the worst, the
gate-projection bias on packed documents, measured 3.0e-2 against the CPU's 1.3e-2.

With 2+ GPUs (marker multigpu) the same stack runs LASP-2 over an NCCL group, each rank's
output, input gradient and the rank-summed parameter gradients against the same float64
one-process reference.

Run on the device machine: `pytest -m "gpu or multigpu" tests/python/nn/test_hybrid_gpu.py`.
"""

import copy

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2_testing.checks import module_grad_bound, rel_err
from lasp2_testing.dist import run_distributed

TOL = {torch.bfloat16: 2e-2, torch.float32: 2e-4}
HIDDEN, HEADS = 128, 2  # head dim 64, as the ops' GPU tests
# 200 tokens: three 64-token chunks and a tail; documents inside and across chunks
PACKED_CU = (0, 5, 64, 65, 150, 200)
ROWS_T = 136  # two 64-token chunks and a tail; 8 balanced parts of 17 (4 ranks)


def make_stack():
    torch.manual_seed(0)
    return lasp2.nn.HybridStack(HIDDEN, HEADS, pattern="LGKS", intermediate_size=192,
                                linear_kwargs={"decay": "gate"}, softmax_kwargs={"num_kv_heads": 1}).double()


def stack_errors(device, dtype, packed, group=None, split="contiguous"):
    """Worst relative error of the output, the input gradient and each parameter gradient of
    sum(y * w): the stack on `device` in `dtype` against its float64 copy on the CPU. With a
    group: this rank's share of the sequence under LASP-2, its parameter gradients summed
    over the group (as Megatron's DP x CP reduction does)."""
    model = make_stack().to(device, dtype)
    ref = copy.deepcopy(model).to("cpu", torch.float64)  # the rounded weights, in float64
    gen = torch.Generator().manual_seed(3)
    B, T = (1, PACKED_CU[-1]) if packed else (2, ROWS_T)
    x = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64)
    cu = torch.tensor(PACKED_CU, dtype=torch.int32) if packed else None
    local = (lambda t: t) if group is None else (lambda t: lasp2.split_sequence(t, group, split=split))  # noqa: E731

    def run(module, x, w, cu):
        x = x.clone().requires_grad_(True)
        y = module(x, cu_seqlens=cu)
        (y.double() * w).sum().backward()
        return y, x.grad, {n: p.grad for n, p in module.named_parameters()}

    if group is not None:
        model.set_sequence_parallel(group, split)
    y, dx, grads = run(model, local(x).to(device), local(w).to(device), None if cu is None else cu.to(device))
    y_ref, dx_ref, grads_ref = run(ref, x.double(), w, cu)
    assert y.device.type == torch.device(device).type and y.dtype == dtype
    errs = {"y": rel_err(y.cpu(), local(y_ref)), "dx": rel_err(dx.cpu(), local(dx_ref))}
    assert set(grads) == set(grads_ref) and len(grads) > 20
    for name, g in grads.items():
        assert g is not None and g.dtype == dtype, name
        if group is not None:
            g = g.clone()
            dist.all_reduce(g, group=group)
        errs[name] = rel_err(g.cpu(), grads_ref[name])
    return errs


def check_stack_on(device, dtype, packed, group=None, split="contiguous", cpu_group=None):
    """cpu_group: the group of the CPU kernels' run where `group` cannot carry CPU tensors (NCCL)."""
    errs = stack_errors(device, dtype, packed, group, split)
    tol = TOL[dtype]
    assert errs["y"] < tol, ("y", errs["y"], errs)
    if dtype == torch.float32:
        worst = max(errs, key=errs.get)
        assert errs[worst] < tol, (worst, errs[worst], errs)
        return
    cpu = stack_errors("cpu", dtype, packed, group if cpu_group is None else cpu_group, split)
    T = PACKED_CU[-1] if packed else ROWS_T
    for name, err in errs.items():
        bound = module_grad_bound(tol, cpu[name], T)
        assert err < bound, (name, err, bound, errs)


@pytest.mark.gpu
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_lgks_stack_on_cuda_matches_float64_cpu(dtype, packed):
    check_stack_on("cuda", dtype, packed)


def _sp_rank(rank, world, device):
    group = dist.new_group(list(range(world)))
    cpu_group = dist.new_group(list(range(world)), backend="gloo")  # the CPU kernels' bf16 run
    for split in ("contiguous", "balanced"):
        for dtype in (torch.bfloat16, torch.float32):
            for packed in (False, True):
                check_stack_on(device, dtype, packed, group, split, cpu_group)


@pytest.mark.multigpu
def test_lgks_stack_over_gpus_matches_float64_cpu():
    world = min(torch.cuda.device_count(), 4)  # 136 and 200 tokens: 8 balanced parts
    if world < 2:
        pytest.skip("needs at least 2 GPUs")
    run_distributed(world, _sp_rank, "cuda", timeout=300, backend="nccl")
