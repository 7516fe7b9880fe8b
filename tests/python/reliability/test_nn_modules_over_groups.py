"""lasp2.nn modules over a gloo group where ranks differ in what needs a gradient, in grad
modes and in inference tensors (session 23's red-team of lasp2.nn; float64, gloo P = 2).

Bugs these cases found, each failing before its fix:
- the short convolutions' halo all-gather has a backward only where its input needs a
  gradient: a rank whose projection was frozen (or whose `x` needed none, for a bare
  causal_conv_sp) skipped the backward all-gather its peers made, which met its next
  call's collectives (gloo aborted, or peers raised "calling different lasp2 ops"). The
  halo's node now exists on every rank wherever the (checked) call builds a backward;
- a backward with create_graph=True raised torch's "A view was created in no_grad mode
  ..." from the halo's backward all-gather (GatedDeltaNet over a group; one device ran):
  it now returns the first-order gradients, and a double backward raises lasp2's error;
- an inference tensor `x` with grad mode on raised torch's RuntimeError inside the first
  projection on that rank alone, its peers waiting in the module's check: now a ValueError
  naming `x` among the reported checks, so every rank raises;
- under torch.inference_mode with packed documents every module but SoftmaxAttention
  raised "Inference tensors do not track version counter" (the check's digest memo read
  the version of the context's cu_seqlens copy, an inference tensor): such tensors are now
  digested without the memo.
Also lifted: a part shorter than kernel_size - 1 tokens was refused; the halo now reaches back
over as many parts (and ranks) as it spans.
"""

import torch
import torch.distributed as dist

import lasp2
from lasp2.nn.short_conv import causal_conv_sp
from rel_helpers import assert_all_ok, run_world

T = 8


def _module(group):
    torch.manual_seed(0)  # the same weights on every rank
    return lasp2.nn.GatedDeltaNet(8, 2, conv_size=3, group=group).double()


def _data(world):
    gen = torch.Generator().manual_seed(1)
    return (torch.randn(1, T * world, 8, generator=gen, dtype=torch.float64),
            torch.randn(1, T * world, 8, generator=gen, dtype=torch.float64))


def _own_grads(rank, world, frozen=(), x_grad=False, create_graph=False):
    module = _module(dist.group.WORLD)
    for name, p in module.named_parameters():
        p.requires_grad_(not any(name.startswith(f) for f in frozen))
    x, w = _data(world)
    mine = slice(rank * T, (rank + 1) * T)
    xl = x[:, mine].clone().requires_grad_(x_grad)
    loss = (module(xl) * w[:, mine]).sum()
    # .backward(), as training does: every leaf requiring grad, the halo's anchor included
    # (torch.autograd.grad with a subset of the leaves prunes each rank's graph on its own)
    loss.backward(create_graph=create_graph)
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    return {**grads, "x": xl.grad} if x_grad else grads


def _body(rank, world):
    failures = []

    def expect_equal(what, got, want):
        for name, g in got.items():
            if not torch.allclose(g, want[name], rtol=1e-12, atol=1e-12):
                failures.append(f"{what}: d{name} off by {(g - want[name]).abs().max():.3g}")

    # 1. a projection frozen on rank 0 only (x needs no gradient): each rank's own gradients
    #    are those of the run where nothing is frozen
    base = _own_grads(rank, world)
    for frozen in (("v_proj",), ("q_proj", "k_proj")):
        expect_equal(f"rank 0 froze {frozen}", _own_grads(rank, world, frozen if rank == 0 else ()), base)

    # 2. a bare causal_conv_sp whose `x` needs a gradient on rank 0 only (its weight on both)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, T * world, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(4, 3, generator=gen, dtype=torch.float64)
    mine = slice(rank * T, (rank + 1) * T)
    xl = x[:, mine].clone().requires_grad_(rank == 0)
    wl = weight.clone().requires_grad_()
    causal_conv_sp(xl, wl, None, dist.group.WORLD).pow(2).sum().backward()
    xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
    causal_conv_sp(xr, wr).pow(2).sum().backward()
    dw = wl.grad.clone()
    dist.all_reduce(dw)
    if not torch.allclose(dw, wr.grad, rtol=1e-12, atol=1e-12):
        failures.append("causal_conv_sp: summed dweight")
    if rank == 0 and not torch.allclose(xl.grad, xr.grad[:, mine], rtol=1e-12, atol=1e-12):
        failures.append("causal_conv_sp: dx")
    # ... and whose call builds a backward on rank 0 only: every rank raises
    try:
        causal_conv_sp(x[:, mine].clone().requires_grad_(rank == 0), weight, None, dist.group.WORLD)
        failures.append("causal_conv_sp: a backward on one rank only ran")
    except ValueError as e:
        if "building a backward" not in str(e):
            failures.append(f"causal_conv_sp: {e}")

    # 3. create_graph=True: the first-order gradients, then a clear error at the double backward
    first = _own_grads(rank, world, x_grad=True, create_graph=True)
    expect_equal("create_graph=True", {n: g.detach() for n, g in first.items()}, _own_grads(rank, world, x_grad=True))
    try:
        first["x"].sum().backward()
        failures.append("double backward ran")
    except RuntimeError as e:
        if "double backward" not in str(e):
            failures.append(f"double backward: {e}")

    # 4. an inference tensor on rank 0 only, grad mode on: every rank raises a ValueError
    module = _module(dist.group.WORLD)
    xi = _data(world)[0][:, mine]
    if rank == 0:
        with torch.inference_mode():
            xi = xi.clone()
    try:
        module(xi)
        failures.append("inference tensor ran")
    except ValueError as e:
        if "`x`" not in str(e) and "rejected their arguments" not in str(e):
            failures.append(f"inference tensor: {e}")
    with torch.inference_mode():  # inference mode on every rank is fine
        module(xi)

    # 5. torch.inference_mode with packed documents: every module kind, the no_grad output
    torch.manual_seed(0)
    stack = lasp2.nn.HybridStack(8, 2, pattern="LSGK", group=dist.group.WORLD, gdn_kwargs={"conv_size": 3},
                                 kda_kwargs={"conv_size": 3}).double()
    cu = torch.tensor([0, 5, 11, T * world])
    with torch.no_grad():
        want = stack(xi.clone(), cu_seqlens=cu)
    with torch.inference_mode():
        got = stack(xi, cu_seqlens=cu)
    if not torch.equal(got, want):
        failures.append("inference_mode with cu_seqlens")

    # 6. parts shorter than kernel_size - 1 tokens (refused before): the halo reaches back over
    #    several parts and ranks; packed documents, both splits, the one-process result
    for split, t_local, width, cu in (("contiguous", 1, 4, None), ("contiguous", 2, 6, [0, 1, 3, 4]),
                                      ("balanced", 2, 4, None), ("balanced", 2, 5, [0, 2, 3, 4])):
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(2 if cu is None else 1, t_local * world, 3, generator=gen, dtype=torch.float64)
        weight = torch.randn(3, width, generator=gen, dtype=torch.float64)
        bias = torch.randn(3, generator=gen, dtype=torch.float64)
        cu_t = None if cu is None else torch.tensor(cu)
        local = lambda t: lasp2.split_sequence(t, split=split, dim=1, rank=rank, world_size=world)  # noqa: E731
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        yr = causal_conv_sp(xr, wr, bias, cu_seqlens=cu_t)
        (yr * yr.detach().cos()).sum().backward()
        xl, wl = local(x).clone().requires_grad_(), weight.clone().requires_grad_()
        y = causal_conv_sp(xl, wl, bias, dist.group.WORLD, split, cu_t)
        (y * y.detach().cos()).sum().backward()
        dw = wl.grad.clone()
        dist.all_reduce(dw)
        for name, a, b in (("y", y, local(yr)), ("dx", xl.grad, local(xr.grad)), ("dweight", dw, wr.grad)):
            if not torch.allclose(a, b, rtol=1e-12, atol=1e-12):
                failures.append(f"short parts {split} T_local {t_local} width {width}: {name}")
    return failures


def test_modules_over_a_group_with_rank_dependent_grads_and_grad_modes():
    for rank, failures in enumerate(assert_all_ok(run_world(2, _body, timeout=120, pg_timeout=20))):
        assert not failures, f"rank {rank}: " + "\n".join(failures)
