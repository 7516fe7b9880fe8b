"""lasp2._C directly: the one argument bundle, sequence states (initial state in, final
state out, both gradients) against a float64 step-by-step recurrence on one process
and on a gloo group, and the bounds the binding checks before anything reaches the core."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import lasp2
from lasp2._extension import _C
from lasp2.distributed.communicator import get_communicator
from lasp2_testing.dist import run_distributed

B, T, H, DK, DV = 2, 12, 2, 4, 3


def inputs(seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=dtype)
    q, k, v, do = r(B, T, H, DK), r(B, T, H, DK), r(B, T, H, DV), r(B, T, H, DV)
    g = -torch.rand(B, T, H, generator=gen, dtype=dtype) * 0.5
    h0, dfinal = r(B, H, DK, DV), r(B, H, DK, DV)
    return q, k, v, g, do, h0, dfinal


def recurrence(q, k, v, g, h0, scale):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T from S_{-1} = h0; o_t = scale q_t^T S_t."""
    S = h0.clone()
    out = []
    for t in range(q.shape[1]):
        S = g[:, t, :, None, None].exp() * S + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    return torch.stack(out, 1), S


def reference(q, k, v, g, do, h0, dfinal, scale):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, final = recurrence(*leaves, scale)
    ((o * do).sum() + (final * dfinal).sum()).backward()
    return o.detach(), final.detach(), [x.grad for x in leaves]


def run_core(args, do, dfinal, overlap):
    o, final, saved = _C.lasp2_forward(args, overlap, output_final_state=True)
    dq, dk, dv, dg, ddecay, dh0 = _C.lasp2_backward(args, saved, do, True, d_final_state=dfinal,
                                                    need_dinitial=True)
    assert ddecay is None
    return o, final, [dq, dk, dv, dg, dh0]


def close(got, want, tol, what):
    err = (got.double() - want).abs().max() / want.abs().max().clamp_min(1e-3)
    assert err < tol, f"{what}: relative error {err:.2e}"


@pytest.mark.parametrize("overlap", [True, False])
def test_states_single_process(overlap):
    q, k, v, g, do, h0, dfinal = inputs()
    o_ref, final_ref, grads_ref = reference(q, k, v, g, do, h0, dfinal, 0.5)
    args = _C.LinearAttentionArgs(q, k, v, g=g, initial_state=h0, scale=0.5, chunk_size=5)
    o, final, grads = run_core(args, do, dfinal, overlap)
    assert final.dtype == torch.float32 and final.shape == (B, H, DK, DV)
    close(o, o_ref, 1e-6, "o")
    close(final, final_ref, 1e-6, "final state")  # states are fp32
    for name, got, want in zip(["dq", "dk", "dv", "dg", "dh0"], grads, grads_ref):
        assert got.dtype == want.dtype, name
        close(got, want, 1e-5, name)


def _states_rank(rank, world, split):
    q, k, v, g, do, h0, dfinal = inputs(seed=3)
    o_ref, final_ref, grads_ref = reference(q, k, v, g, do, h0, dfinal, 0.5)
    group = dist.group.WORLD
    local = lambda x: lasp2.split_sequence(x, group, dim=1, split=split)
    args = _C.LinearAttentionArgs(local(q), local(k), local(v), g=local(g), initial_state=h0, scale=0.5,
                                  comm=get_communicator(group, q.device),
                                  parts_per_rank=1 if split == "contiguous" else 2, chunk_size=4)
    # the loss is the sum of the ranks' losses: each holds a share of the final state's
    share = (rank + 1) / (world * (world + 1) / 2)
    o, final, (dq, dk, dv, dg, dh0) = run_core(args, local(do), dfinal * share, overlap=True)
    close(o, local(o_ref), 1e-6, f"rank {rank} o")
    for name, got, want in zip(["dq", "dk", "dv", "dg"], [dq, dk, dv, dg], grads_ref):
        close(got, local(want), 1e-5, f"rank {rank} {name}")
    # the sequence's states are the same on every rank; the ranks' dh0 are shares
    close(final, final_ref, 1e-6, f"rank {rank} final state")
    dist.all_reduce(dh0, group=group)
    close(dh0, grads_ref[4], 1e-5, f"rank {rank} dh0 summed over the group")


@pytest.mark.parametrize("world,split", [(2, "contiguous"), (3, "balanced")])
def test_states_on_a_group(world, split):
    run_distributed(world, _states_rank, split, timeout=180)


def test_args_round_trip_through_save_for_backward():
    q, k, v, g, _, h0, _ = inputs()
    args = _C.LinearAttentionArgs(q, k, v, g=g, initial_state=h0, scale=0.25, parts_per_rank=1)
    tensors = args.tensors()
    assert len(tensors) == _C.LinearAttentionArgs.num_tensors == 7
    assert tensors[0] is q and tensors[3] is g and tensors[4] is None and tensors[6] is h0
    config = args.config()
    assert all(t is None for t in config.tensors()) and config.scale == 0.25 and config.chunk_size == 64
    again = config.with_tensors(tensors)
    assert again.tensors()[1] is k


def _error(match, **overrides):
    q, k, v, g, do, h0, _ = inputs(dtype=torch.float32)
    kw = dict(g=g, scale=0.5)
    kw.update(overrides)
    with pytest.raises(lasp2.Lasp2Error, match=match) as info:
        _C.lasp2_forward(_C.LinearAttentionArgs(q, k, v, **kw), True)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("chunk_size", [0, -3, 2**31, 2**40])
def test_chunk_size_bounds(chunk_size):
    _error("chunk_size", chunk_size=chunk_size)


def test_argument_errors_name_the_argument():
    _error("initial_state", initial_state=torch.zeros(B, H, DK, DV + 1))
    _error("initial_state", initial_state=torch.zeros(B, H, DK, DV, dtype=torch.int32))
    _error("`g` must have shape", g=torch.zeros(B, T + 1, H))
    _error("decay", g=None, decay=torch.zeros(H + 1))
    _error("doc_start", doc_start=torch.zeros(T + 2, dtype=torch.uint8))
    _error("parts_per_rank", parts_per_rank=3)
    _error("scale", scale=float("nan"))
    _error("head_doc", doc_start=torch.zeros(T, dtype=torch.uint8), initial_state=torch.zeros(B, H, DK, DV))
    q, k, v, g, do, _, _ = inputs(dtype=torch.float32)
    with pytest.raises(lasp2.Lasp2Error, match="`k` must have shape"):
        _C.lasp2_forward(_C.LinearAttentionArgs(q, k[:, :-1], v), True)
    with pytest.raises(lasp2.Lasp2Error, match="last dimension of `q`"):
        _C.lasp2_forward(_C.LinearAttentionArgs(q.transpose(2, 3).contiguous().transpose(2, 3), k, v), True)


def test_backward_checks_what_forward_saved():
    q, k, v, g, do, _, _ = inputs(dtype=torch.float32)
    args = _C.LinearAttentionArgs(q, k, v, g=g)
    _, _, saved = _C.lasp2_forward(args, True)
    with pytest.raises(lasp2.Lasp2Error, match="dout"):
        _C.lasp2_backward(args, saved, do[:, 1:], True)
    with pytest.raises(lasp2.Lasp2Error, match="saved buffer `maps`"):
        _C.lasp2_backward(args, [saved[0], saved[1], saved[2][1:], saved[3]], do, True)
    with pytest.raises(lasp2.Lasp2Error, match="initial_state"):
        _C.lasp2_backward(args, saved, do, True, need_dinitial=True)
    _, _, ring_saved = _C.lasp1_forward(args, False)  # LASP-1 keeps 3 buffers (head maps: packed states)
    with pytest.raises(lasp2.Lasp2Error, match="the 3 saved buffers"):
        _C.lasp1_backward(args, ring_saved[:2], do, True)
    with pytest.raises(lasp2.Lasp2Error, match="saved buffer `local_record`"):
        _C.lasp1_backward(args, [ring_saved[0], ring_saved[1][1:], ring_saved[2]], do, True)


def test_segment_states_buffer():
    """saved[4] holds what the CUDA kernels keep from the forward for the dq pass: the CPU
    keeps nothing (size 0, as the fake function's size query says), and a backward given
    only the first four buffers computes the same gradients."""
    q, k, v, g, do, _, _ = inputs(dtype=torch.float32)
    args = _C.LinearAttentionArgs(q, k, v, g=g, scale=0.5)
    _, _, saved = _C.lasp2_forward(args, True)
    assert len(saved) == 5 and saved[4].numel() == 0
    assert _C.lasp2_saved_states_floats(B, T, H, DK, DV, q.dtype, q.device, 1) == 0
    with_states = _C.lasp2_backward(args, saved, do, True)
    without = _C.lasp2_backward(args, saved[:4], do, True)
    for a, b in zip(with_states[:4], without[:4]):
        assert torch.equal(a, b)
    with pytest.raises(lasp2.Lasp2Error, match="saved buffer `segment_states`"):
        _C.lasp2_backward(args, saved[:4] + [torch.zeros(3)], do, True)


@pytest.mark.gpu
@pytest.mark.parametrize("decay", ["g", "decay", None])
def test_cuda_linear_attention_backward_reads_the_forward_segment_states(decay):
    """On CUDA saved[4] is the forward's segment states (batch x heads x segments x dk x dv
    floats, the size the fake function asks _C.lasp2_saved_states_floats for): the
    backward reads them and gives the gradients of a backward that recomputes them,
    bit for bit; altered states change dq (only dq and what builds on it)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    gen = torch.Generator(device="cuda").manual_seed(4)
    Bc, Tc, Hc, D = 2, 2048, 2, 64
    r = lambda *s: torch.randn(*s, generator=gen, device="cuda").to(torch.bfloat16)
    q, k, v, do = r(Bc, Tc, Hc, D), r(Bc, Tc, Hc, D), r(Bc, Tc, Hc, D), r(Bc, Tc, Hc, D)
    kw = {"g": -torch.rand(Bc, Tc, Hc, generator=gen, device="cuda") * 0.1} if decay == "g" else {}
    if decay == "decay":
        kw = {"decay": -torch.rand(Hc, generator=gen, device="cuda") * 0.05}
    args = _C.LinearAttentionArgs(q, k, v, scale=D**-0.5, **kw)
    _, _, saved = _C.lasp2_forward(args, True)
    n = _C.lasp2_saved_states_floats(Bc, Tc, Hc, D, D, q.dtype, q.device, 1)
    assert len(saved) == 5 and saved[4].numel() == n > 0 and n % (Bc * Hc * D * D) == 0
    need_dg = decay is not None
    kept = _C.lasp2_backward(args, saved, do, need_dg)
    again = _C.lasp2_backward(args, saved, do, need_dg)  # a second backward from one forward
    recomputed = _C.lasp2_backward(args, saved[:4], do, need_dg)
    for a, b, c in zip(kept[:5], again[:5], recomputed[:5]):
        assert (a is None and c is None) or (torch.equal(a, c) and torch.equal(b, c))
    altered = _C.lasp2_backward(args, saved[:4] + [saved[4] * 0.5 + 1], do, need_dg)
    assert not torch.equal(altered[0], recomputed[0])
    assert torch.equal(altered[2], recomputed[2])  # dv: the dk/dv pass does not read them


@pytest.mark.gpu
def test_cuda_linear_attention_fake_sizes_match():
    """The custom op's fake function gives every output the real kernel's size on CUDA,
    the segment states included (opcheck: schema and fake tensors)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from lasp2.ops import _library
    gen = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(1, 4096, 3, 128, generator=gen, device="cuda").to(torch.bfloat16) for _ in range(3))
    g = -torch.rand(1, 4096, 3, generator=gen, device="cuda") * 0.1
    args = (q, k, v, g, None, None, None, 128**-0.5, 64, 0, 1, True, [], 0, False)
    torch.library.opcheck(_library.lasp2_forward, args, test_utils=("test_schema", "test_faketensor"))
    assert _library.lasp2_forward(*args)[6].numel() > 0


@pytest.mark.gpu
def test_cuda_linear_attention_fake_segment_states_size_follows_the_kernels():
    """The fake function's size of the segment states (computed from sizes that may be
    symbolic) equals the CUDA backend's own, over batch x heads below, at and above one
    wave of blocks, head dims of both tile sizes and the generic route, short and long
    sequences, one and two parts."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from lasp2.ops import _library
    for Bc, Tc, Hc, dk, dv, dtype, parts in [(1, 65536, 16, 128, 128, torch.bfloat16, 1),
                                           (1, 16384, 16, 128, 128, torch.bfloat16, 2),
                                           (2, 4109, 2, 64, 64, torch.float16, 1), (1, 200, 1, 64, 64, torch.bfloat16, 2),
                                           (8, 4096, 32, 128, 128, torch.bfloat16, 1),
                                           (3, 1000, 5, 40, 24, torch.float32, 2), (1, 77, 2, 33, 17, torch.float32, 1)]:
        q = torch.empty(Bc, Tc, Hc, dk, device="cuda", dtype=dtype)
        v = torch.empty(Bc, Tc, Hc, dv, device="cuda", dtype=dtype)
        want = _C.lasp2_saved_states_floats(Bc, Tc, Hc, dk, dv, dtype, q.device, parts)
        assert _library._segment_states_floats(q, v, parts) == want, (Bc, Tc, Hc, dk, dv, dtype, parts)
