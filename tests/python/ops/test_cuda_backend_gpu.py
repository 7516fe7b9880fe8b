"""The CUDA backend through the torch op (marker: gpu): fwd + bwd captured in a CUDA
graph and replayed on new inputs, and log gates of -inf (the state forgotten).

Run on the device machine: `pytest -m gpu tests/python`.
"""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import rel_err

pytestmark = pytest.mark.gpu


def recurrence(q, k, v, g, scale):
    """float64 step-by-step S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t
    (the cumulative-sum reference cannot take g = -inf: -inf - -inf)."""
    B, T, H, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.shape[-1], dtype=torch.float64, device=q.device)
    out = []
    for t in range(T):
        S = torch.exp(g[:, t])[..., None, None] * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, dim=1)


def test_forgetting_gates_give_the_recurrence():
    """g = -inf resets that (b, h) state at that token: finite outputs and gradients,
    dg = 0 there (exp(g) = 0), everything equal to the float64 recurrence."""
    gen = torch.Generator(device="cuda").manual_seed(3)
    B, T, H, D = 2, 300, 3, 64
    q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 8
    g[0, [0, 63, 64, 65, 150, 151, 299], 0] = float("-inf")
    g[1, [1, 128, 200], 2] = float("-inf")
    g[:, 100, :] = float("-inf")
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)] + [g.clone().requires_grad_()]
        o = lasp2.linear_attention(*leaves[:3], g=leaves[3])
        do = torch.randn_like(o)
        grads = torch.autograd.grad(o, leaves, do)
        ref_leaves = [x.detach().double().requires_grad_() for x in leaves]
        ref = recurrence(*ref_leaves, scale=D ** -0.5)
        ref_grads = torch.autograd.grad(ref, ref_leaves, do.double())
        assert rel_err(o, ref) < tol, dtype
        for name, got, want in zip(("dq", "dk", "dv"), grads, ref_grads):
            assert torch.isfinite(got).all(), name
            assert rel_err(got, want) < tol, (dtype, name)
        dg, dg_ref = grads[3], ref_grads[3]
        assert torch.isfinite(dg).all()
        assert torch.all(dg_ref[torch.isinf(g)] == 0)
        assert rel_err(dg, dg_ref) < 4 * tol * (T / 64) ** 0.5, (dtype, "dg")


def test_fwd_bwd_captured_in_a_cuda_graph_replays_like_eager():
    """No host synchronization and no device allocation outside torch's allocator in
    fwd + bwd: torch.cuda.graph captures both; replays on new inputs equal eager runs
    bit for bit."""
    gen = torch.Generator(device="cuda").manual_seed(4)
    B, T, H, D = 2, 4096, 4, 128

    def draw():
        q, k, v = (torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16() for _ in range(3))
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda", generator=gen)) / 16
        return q, k, v, g, torch.randn(B, T, H, D, device="cuda", generator=gen).bfloat16()

    def step(q, k, v, g, do):
        o = lasp2.linear_attention(q, k, v, g=g)
        return (o,) + torch.autograd.grad(o, (q, k, v, g), do)

    def eager(inputs):
        q, k, v, g, do = inputs
        return step(*(x.clone().requires_grad_() for x in (q, k, v, g)), do)

    static = [x.clone() for x in draw()]
    for x in static[:4]:
        x.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
        for _ in range(2):
            step(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step(*static)
    for _ in range(2):
        fresh = draw()
        with torch.no_grad():
            for x, y in zip(static, fresh):
                x.copy_(y)
        graph.replay()
        want = eager(fresh)
        torch.cuda.synchronize()
        for name, got, ref in zip(("o", "dq", "dk", "dv", "dg"), outs, want):
            assert torch.equal(got, ref), name
