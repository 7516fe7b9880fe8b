"""PyTorch FSDP2 (`fully_shard`) beside lasp2's sequence parallelism, on 4 gloo processes
as a 2 x 2 ("dp", "cp") DeviceMesh: a hybrid model (L, S and G layers) trained two
optimizer steps must equal one process trained on the same global batch.

Each CP rank holds part of the same sequences, so a parameter's gradient is the SUM of
its CP ranks' gradients (and the mean over DP ranks). With every rank's loss the mean
over its own tokens and every rank holding as many tokens, the global mean loss is the
average of the 4 local losses: FSDP's default averaging over the flattened dp x cp mesh
(or HSDP: replicate over dp, shard over cp) is then exactly right. A loss that is
already this rank's share of the global mean (sum of local token losses / global token
count, Megatron's form) needs `set_gradient_divide_factor(1.0)` instead (a sum).
Sharding over "dp" alone leaves the CP ranks with partial gradients: the negative
control below shows the test catches that.
"""

import copy

import torch
import torch.distributed as dist
from torch import nn

import lasp2
from lasp2_testing.checks import rel_err
from lasp2_testing.dist import run_distributed

DP, CP = 2, 2
HIDDEN, HEADS, SEQ, SAMPLES_PER_DP = 16, 2, 16, 1
SPLIT = "balanced"  # Megatron's default split; every layer of the model uses it


class GatedDeltaNetBlock(nn.Module):
    """``x + GatedDeltaNet(norm(x))``: a "G" layer next to HybridStack's L and S blocks."""

    def __init__(self):
        super().__init__()
        self.norm = lasp2.nn.RMSNorm(HIDDEN)
        self.mixer = lasp2.nn.GatedDeltaNet(HIDDEN, HEADS)

    def forward(self, x):
        return x + self.mixer(self.norm(x))


class TinyHybrid(nn.Module):
    """HybridStack "LS", then a G block and an output projection."""

    def __init__(self):
        super().__init__()
        self.stack = lasp2.nn.HybridStack(HIDDEN, HEADS, pattern="LS", intermediate_size=2 * HIDDEN,
                                          linear_kwargs={"decay": "gate"}, softmax_kwargs={"num_kv_heads": 1})
        self.gdn = GatedDeltaNetBlock()
        self.head = nn.Linear(HIDDEN, HIDDEN, bias=False)

    def set_sequence_parallel(self, group):
        self.stack.set_sequence_parallel(group, SPLIT)
        self.gdn.mixer.group, self.gdn.mixer.split = group, SPLIT

    def forward(self, x):
        return self.head(self.gdn(self.stack(x)))

    def shards(self):
        """The modules fully_shard wraps one by one (the root comes last)."""
        return [*self.stack.layers, self.gdn]


def global_batch(step):
    """[DP * SAMPLES_PER_DP, SEQ, HIDDEN] inputs and targets of one step, same on every rank."""
    gen = torch.Generator().manual_seed(100 + step)
    shape = (DP * SAMPLES_PER_DP, SEQ, HIDDEN)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen)


def make_optimizer(kind, params):
    if kind == "sgd":  # plain SGD: a wrongly scaled gradient changes the update
        return torch.optim.SGD(params, lr=0.5, momentum=0.9)
    return torch.optim.Adam(params, lr=1e-2)


def reference_run(model, optimizer_kind, steps):
    """One process, whole sequences, the whole global batch; returns the losses."""
    opt = make_optimizer(optimizer_kind, model.parameters())
    losses = []
    for step in range(steps):
        x, target = global_batch(step)
        loss = (model(x) - target).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def sharded_run(model, mesh, optimizer_kind, steps, loss_form, divide_factor=None):
    """Trains `model` (already fully_shard-ed) on this rank's samples and sequence part;
    returns the global losses (the average of the 4 local means)."""
    from torch.distributed.fsdp import FSDPModule

    if divide_factor is not None:
        for m in model.modules():
            if isinstance(m, FSDPModule):
                m.set_gradient_divide_factor(divide_factor)
                # a factor other than the group size is a PREMUL_SUM reduction, which gloo
                # lacks: reduce with SUM and divide separately
                m.set_force_sum_reduction_for_comms(True)
    cp_group = mesh.get_group("cp")
    dp_rank = mesh.get_local_rank("dp")
    samples = slice(dp_rank * SAMPLES_PER_DP, (dp_rank + 1) * SAMPLES_PER_DP)
    opt = make_optimizer(optimizer_kind, model.parameters())
    losses = []
    for step in range(steps):
        x, target = (lasp2.split_sequence(t[samples], cp_group, split=SPLIT) for t in global_batch(step))
        sq = (model(x) - target).pow(2)
        local_mean = sq.mean()
        # "local mean": FSDP averages over its mesh. "global share": sum / global token count.
        loss = local_mean if loss_form == "local mean" else sq.sum() / (DP * SAMPLES_PER_DP * SEQ * HIDDEN)
        opt.zero_grad()
        loss.backward()
        opt.step()
        total = local_mean.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / dist.get_world_size())
    return losses


def full_parameters(model):
    """Every parameter gathered whole (DTensor.full_tensor is a collective: same order on all ranks)."""
    return {name: p.full_tensor().detach() for name, p in model.named_parameters()}


def fsdp_rank(rank, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (DP, CP), mesh_dim_names=("dp", "cp"))
    dp_cp = mesh["dp", "cp"]._flatten("dp_cp")  # torch 2.13 has no public name for flattening a mesh
    torch.manual_seed(0)
    initial = TinyHybrid()
    steps = 2
    reference = {}
    for optimizer_kind in ("sgd", "adam"):
        ref = copy.deepcopy(initial)
        losses = reference_run(ref, optimizer_kind, steps)
        reference[optimizer_kind] = (losses, dict(ref.named_parameters()))

    def train(shard_mesh, optimizer_kind, loss_form="local mean", divide_factor=None):
        model = copy.deepcopy(initial)
        model.set_sequence_parallel(mesh.get_group("cp"))  # SP over the "cp" sub-group only
        for module in model.shards():
            fully_shard(module, mesh=shard_mesh)
        fully_shard(model, mesh=shard_mesh)
        losses = sharded_run(model, mesh, optimizer_kind, steps, loss_form, divide_factor)
        return losses, full_parameters(model)

    def worst_update_error(params, optimizer_kind):
        """Max over parameters of the relative error of the trained-minus-initial update."""
        ref_params = reference[optimizer_kind][1]
        start = dict(initial.named_parameters())
        return max(rel_err(params[n] - start[n], ref_params[n].detach() - start[n].detach()) for n in params)

    cases = [  # (what, mesh, optimizer, loss form, divide factor)
        ("FSDP over dp x cp, SGD", dp_cp, "sgd", "local mean", None),
        ("FSDP over dp x cp, Adam", dp_cp, "adam", "local mean", None),
        ("HSDP: replicate dp, shard cp, SGD", mesh, "sgd", "local mean", None),
        ("FSDP over dp x cp, global-share loss, divide factor 1, SGD", dp_cp, "sgd", "global share", 1.0),
    ]
    for what, shard_mesh, optimizer_kind, loss_form, factor in cases:
        losses, params = train(shard_mesh, optimizer_kind, loss_form, factor)
        ref_losses = reference[optimizer_kind][0]
        for got, want in zip(losses, ref_losses):
            assert abs(got - want) <= 1e-5 * abs(want), f"{what}: losses {losses} vs one process {ref_losses}"
        # fp32, LASP-2 states exchanged in fp32, a different summation order: 1e-4 of the update
        err = worst_update_error(params, optimizer_kind)
        assert err < 1e-4, f"{what}: parameter update relative error {err:.2e} vs one process"

    # Negative controls: the check sees a missing CP reduction and a wrong scale.
    losses, params = train(mesh["dp"], "sgd")  # CP ranks keep their partial gradients
    err = worst_update_error(params, "sgd")
    assert err > 1e-2, f"sharding over dp only should differ from one process; update error {err:.2e}"
    _, params = train(dp_cp, "sgd", "global share")  # share of the global mean, then FSDP averages: 1/4
    err = worst_update_error(params, "sgd")
    assert err > 1e-2, f"a global-share loss averaged again should differ; update error {err:.2e}"


def test_fsdp2_with_sequence_parallel_equals_one_process():
    run_distributed(DP * CP, fsdp_rank, timeout=300)
