"""linear_attention's initial_state / output_final_state: one process against a float64
step-by-step recurrence with per-sequence and per-document states, gradcheck, bad
input, and gloo worlds of 2 and 3 (LASP-2 and LASP-1, both splits, packed documents
that span ranks) equal to one process under the "sum of the ranks' losses" convention: every rank
returns the same final states, the ranks' final-state gradients add up, the ranks'
initial-state gradients are shares summing to one process's."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import assert_rel
from lasp2_testing.dist import run_distributed


def recurrence(q, k, v, g, h0, cu, scale):
    """float64 S_t = exp(g_t) S_{t-1} + k_t v_t^T per document (state h0[n] before its
    first token); returns o and the final state of every sequence / document."""
    B, T, H, _ = q.shape
    starts = [0] * T
    doc = torch.zeros(T, dtype=torch.long)
    if cu is not None:
        for n, s in enumerate(cu.tolist()[:-1]):
            starts[s] = 1
            doc[s:] = n
    o = torch.zeros(B, T, H, v.shape[3], dtype=torch.float64)
    finals = []
    for b in range(B):
        for t in range(T):
            n = doc[t] if cu is not None else b
            if t == 0 or starts[t]:
                if t > 0:
                    finals.append(S)
                S = h0[n].double().clone() if h0 is not None else torch.zeros(H, q.shape[3], v.shape[3], dtype=torch.float64)
            a = torch.exp(g[b, t].double()) if g is not None else torch.ones(H, dtype=torch.float64)
            S = a[:, None, None] * S + k[b, t].double()[:, :, None] * v[b, t].double()[:, None, :]
            o[b, t] = scale * torch.einsum("hk,hkv->hv", q[b, t].double(), S)
        finals.append(S)
    return o, torch.stack(finals)


def inputs(B, T, H=2, D=4, dtype=torch.float64, seed=0, gates=True):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, T, H, D, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    g = (F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)) / 3).to(dtype) if gates else None
    return q, k, v, g


@pytest.mark.parametrize("with_docs", [False, True])
@pytest.mark.parametrize("gates", [False, True])
def test_one_process_matches_recurrence(with_docs, gates):
    B = 1 if with_docs else 2
    q, k, v, g = inputs(B, 21, gates=gates)
    cu = torch.tensor([0, 5, 6, 13, 21], dtype=torch.int32) if with_docs else None
    N = 4 if with_docs else B
    h0 = torch.randn(N, 2, 4, 4, dtype=torch.float64)
    o, final = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu, initial_state=h0, output_final_state=True)
    o_ref, final_ref = recurrence(q, k, v, g, h0, cu, 4 ** -0.5)
    assert final.shape == (N, 2, 4, 4) and final.dtype == torch.float64
    assert_rel(o, o_ref, 1e-6, "o")
    assert_rel(final, final_ref, 1e-6, "final_state")
    o2, final2 = lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu, output_final_state=True)  # from zero
    assert final2.dtype == torch.float32
    assert_rel(final2, recurrence(q, k, v, g, None, cu, 4 ** -0.5)[1], 1e-6, "final_state from zero")
    assert isinstance(lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu, initial_state=h0), torch.Tensor)


@pytest.mark.parametrize("with_docs", [False, True])
def test_gradcheck(with_docs):
    """float64 gradcheck of o through the path with states (states are fp32 inside the
    core, so initial_state is a constant here; its gradient is checked below)."""
    B = 1 if with_docs else 2
    q, k, v, g = inputs(B, 7, H=1, D=2, seed=3)
    cu = torch.tensor([0, 3, 7], dtype=torch.int32) if with_docs else None
    h0 = torch.randn(2, 1, 2, 2, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]

    def f(q, k, v, g):
        return lasp2.linear_attention(q, k, v, g=g, cu_seqlens=cu, initial_state=h0, output_final_state=True)[0]

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("with_docs", [False, True])
def test_state_gradients_match_recurrence(with_docs):
    """Every gradient of <o, do> + <final, dfinal>, initial_state's included, against
    autograd through the float64 recurrence (fp32 states: 1e-6 relative)."""
    B = 1 if with_docs else 2
    q, k, v, g = inputs(B, 13, seed=4)
    cu = torch.tensor([0, 4, 5, 13], dtype=torch.int32) if with_docs else None
    N = 3 if with_docs else B
    gen = torch.Generator().manual_seed(5)
    h0, dfinal = (torch.randn(N, 2, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    do = torch.randn(B, 13, 2, 4, generator=gen, dtype=torch.float64)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = lasp2.linear_attention(*leaves[:3], g=leaves[3], cu_seqlens=cu, initial_state=leaves[4],
                                      output_final_state=True)
    got = torch.autograd.grad((o * do).sum() + (final * dfinal).sum(), leaves)
    ref = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o_ref, final_ref = recurrence(*ref[:4], ref[4], cu, 4 ** -0.5)
    want = torch.autograd.grad((o_ref * do).sum() + (final_ref * dfinal).sum(), ref)
    for name, a, b in zip(("q", "k", "v", "g", "initial_state"), got, want):
        assert_rel(a, b, 1e-6, f"d{name}")


def test_bad_states_name_the_argument():
    q, k, v, g = inputs(2, 6)
    h0 = torch.zeros(2, 2, 4, 4)
    with pytest.raises(ValueError, match="initial_state"):
        lasp2.linear_attention(q, k, v, initial_state=torch.zeros(3, 2, 4, 4))
    with pytest.raises(ValueError, match="initial_state"):
        lasp2.linear_attention(q, k, v, initial_state=h0.to(torch.int32))
    with pytest.raises(ValueError, match="initial_state"):
        lasp2.linear_attention(q, k, v, initial_state=h0.tolist())
    with pytest.raises(ValueError, match="initial_state"):
        lasp2.linear_attention(q, k, v, initial_state=torch.zeros(2, 2, 4, 5))
    with pytest.raises(ValueError, match="output_final_state"):
        lasp2.linear_attention(q, k, v, output_final_state=1)
    q1, k1, v1, _ = inputs(1, 6)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    with pytest.raises(ValueError, match="initial_state"):  # N = number of documents
        lasp2.linear_attention(q1, k1, v1, cu_seqlens=cu, initial_state=torch.zeros(1, 2, 4, 4))


CONFIGS = [("lasp2", "contiguous", False), ("lasp2", "balanced", False), ("lasp2", "contiguous", True),
           ("lasp2", "balanced", True), ("lasp1", "contiguous", True), ("lasp1", "balanced", True),
           ("lasp1", "contiguous", False), ("lasp1", "balanced", False)]


def check_rank(rank, world):
    group = dist.new_group(list(range(world)))  # a sub-group, as Megatron's CP group would be
    for index, (provider, split, with_docs) in enumerate(CONFIGS):
        B, L = (1, 12) if with_docs else (2, 12)
        T = L * world
        q, k, v, g = inputs(B, T, seed=10 + index)
        cu = torch.tensor(sorted({0, 3, 4, L, L + 1, T - 2, T}), dtype=torch.int32) if with_docs else None
        N = cu.numel() - 1 if with_docs else B
        gen = torch.Generator().manual_seed(index)
        h0 = torch.randn(N, 2, 4, 4, generator=gen, dtype=torch.float64)
        do = torch.randn(B, T, 2, 4, generator=gen, dtype=torch.float64)
        dfinal = torch.randn(N, 2, 4, 4, generator=gen, dtype=torch.float64)
        full = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
        o_full, f_full = lasp2.linear_attention(*full[:3], g=full[3], cu_seqlens=cu, initial_state=full[4],
                                                output_final_state=True)
        want = torch.autograd.grad((o_full * do).sum() + (f_full * dfinal).sum(), full)

        local = lambda x: lasp2.split_sequence(x, group, split=split, dim=1)
        leaves = [local(x).detach().requires_grad_() for x in (q, k, v, g)] + [h0.clone().requires_grad_()]
        o, final = lasp2.linear_attention(*leaves[:3], g=leaves[3], group=group, split=split, cu_seqlens=cu,
                                          initial_state=leaves[4], output_final_state=True, provider=provider)
        where = f"config {index} ({provider}, {split}, docs={with_docs}) rank {rank}"
        assert_rel(o, local(o_full.detach()), 1e-6, "o " + where)
        assert_rel(final, f_full.detach(), 1e-6, "final_state " + where)
        # each rank's loss holds its outputs and a share of the replicated final state's
        share = (rank + 1) / (world * (world + 1) / 2)
        got = torch.autograd.grad((o * local(do)).sum() + share * (final * dfinal).sum(), leaves)
        for name, x, y in zip("qkvg", got[:4], want[:4]):
            assert_rel(x, local(y), 1e-6, f"d{name} " + where)
        d_initial = got[4].clone()
        dist.all_reduce(d_initial, group=group)
        assert_rel(d_initial, want[4], 1e-6, "sum of d_initial over ranks " + where)


@pytest.mark.parametrize("world", [2, 3])
def test_sp_equals_one_process(world):
    run_distributed(world, check_rank)


def check_other_providers_refuse(rank, world):
    q, k, v, _ = inputs(2, 4)
    with pytest.raises(ValueError, match="`initial_state` / `output_final_state` are supported by providers"):
        lasp2.linear_attention(q, k, v, group=dist.group.WORLD, provider="ulysses", output_final_state=True)


def test_ulysses_refuses_states():
    run_distributed(2, check_other_providers_refuse, timeout=120)


@pytest.mark.gpu
@pytest.mark.parametrize("with_docs", [False, True])
def test_cuda_states_match_cpu(with_docs):
    """The states path on one CUDA GPU (documents cut into segments that begin off the
    64-token tiles; the backend's add sums the final-state gradients) equals the CPU."""
    B, T = (1, 300) if with_docs else (2, 300)
    q, k, v, g = inputs(B, T, H=2, D=64, dtype=torch.float32, seed=6)
    cu = torch.tensor([0, 37, 38, 150, 300], dtype=torch.int32) if with_docs else None
    N = 4 if with_docs else B
    gen = torch.Generator().manual_seed(7)
    h0, dfinal = (torch.randn(N, 2, 64, 64, generator=gen) for _ in range(2))
    do = torch.randn(B, T, 2, 64, generator=gen)
    results = []
    for device in ("cpu", "cuda"):
        leaves = [x.to(device).requires_grad_() for x in (q, k, v, g, h0)]
        o, final = lasp2.linear_attention(*leaves[:3], g=leaves[3], cu_seqlens=cu, initial_state=leaves[4],
                                          output_final_state=True)
        grads = torch.autograd.grad((o * do.to(device)).sum() + (final * dfinal.to(device)).sum(), leaves)
        results.append([x.detach().cpu() for x in (o, final, *grads)])
    for name, a, b in zip(("o", "final", "dq", "dk", "dv", "dg", "dh0"), *results):
        assert_rel(b, a, 1e-3, name)


@pytest.mark.parametrize("with_docs", [False, True])
def test_unused_final_state_leaves_the_gradients_alone(with_docs):
    """output_final_state=True with a loss on o only: the same gradients as without."""
    B = 1 if with_docs else 2
    q, k, v, g = inputs(B, 9, seed=8)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32) if with_docs else None
    grads = []
    for want_final in (False, True):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
        out = lasp2.linear_attention(*leaves[:3], g=leaves[3], cu_seqlens=cu, output_final_state=want_final)
        o = out[0] if want_final else out
        grads.append(torch.autograd.grad(o.sum(), leaves))
    for a, b in zip(*grads):
        assert_rel(b, a, 1e-6, "gradient")
