"""lasp2.gated_delta_rule / lasp2.kda on one CUDA GPU (marker gpu) against the float64
step-by-step recurrence (lasp2_testing/delta_rule.py) and against the CPU path:
outputs, final states and the gradients of q, k, v, g, beta and the initial state,
for rows and packed documents, bf16 / fp16 / fp32 inputs, head dims 64 and 128.

Run on the device machine: `pytest -m gpu tests/python/ops/test_delta_rule_gpu.py`.
"""

import pytest
import torch
import torch.nn.functional as F

import lasp2
from lasp2_testing.checks import rel_err
from lasp2_testing.delta_rule import delta_rule_reference

pytestmark = pytest.mark.gpu

OPS = {"gdn": lasp2.gated_delta_rule, "kda": lasp2.kda}
# bf16 / fp16 outputs round to 8 / 11 bits; states and accumulation are fp32
TOL = {torch.bfloat16: 2e-2, torch.float16: 5e-3, torch.float32: 2e-4}


def make_inputs(kind, B, T, H, D, seed=0, docs=None):
    """float64 CPU tensors: k l2-normalized per head (as GDN / KDA layers do)."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)
    q, k, v = rnd(B, T, H, D), F.normalize(rnd(B, T, H, D), dim=-1), rnd(B, T, H, D)
    g = F.logsigmoid(rnd(B, T, H, D) + 3.0 if kind == "kda" else rnd(B, T, H) + 3.0) / 2
    beta = torch.sigmoid(rnd(B, T, H))
    N = B if docs is None else len(docs) - 1
    h0 = rnd(N, H, D, D) * 0.3
    return q, k, v, g, beta, h0


def run(op, q, k, v, g, beta, h0, cu, scale):
    """o, final and the gradients of (q, k, v, g, beta, h0) for a fixed random loss."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta, h0)]
    o, final = op(*leaves[:5], scale=scale, initial_state=leaves[5], output_final_state=True,
                  cu_seqlens=cu)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device, o.dtype)
    dF = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final.device, final.dtype)
    loss = (o.double() * do.double()).sum() + (final.double() * dF.double()).sum()
    grads = torch.autograd.grad(loss, leaves)
    return o, final, grads


NAMES = ("dq", "dk", "dv", "dg", "dbeta", "d_initial_state")


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_float64_recurrence(kind, dtype, D, packed):
    # 200 tokens: three 64-token checkpoints of the backward, documents across them
    cu = torch.tensor([0, 5, 64, 65, 150, 200]) if packed else None
    B, T, H = (1 if packed else 2), 200, 2
    q, k, v, g, beta, h0 = make_inputs(kind, B, T, H, D, docs=cu.tolist() if packed else None)
    q, k, v = (x.to(dtype) for x in (q, k, v))  # the rounded values are the problem
    scale = D ** -0.5
    dev = [x.cuda() for x in (q, k, v)] + [g.float().cuda(), beta.float().cuda(), h0.float().cuda()]
    o, final, grads = run(OPS[kind], *dev, cu.cuda() if packed else None, scale)
    assert o.dtype == dtype and o.device.type == "cuda" and final.dtype == torch.float32
    ref = [x.double() for x in (q, k, v)] + [g.float().double(), beta.float().double(), h0.float().double()]
    reference = lambda *a, scale, initial_state, output_final_state, cu_seqlens: delta_rule_reference(
        *a, scale, initial_state, cu_seqlens)
    o_ref, final_ref, grads_ref = run(reference, *ref, cu, scale)
    tol = TOL[dtype]
    assert rel_err(o.cpu(), o_ref) < tol, "o"
    assert rel_err(final.cpu(), final_ref) < tol, "final state"
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert got.device.type == "cuda", name
        assert rel_err(got.cpu(), want) < tol, name


@pytest.mark.parametrize("kind", ["gdn", "kda"])
@pytest.mark.parametrize("packed", [False, True])
def test_matches_cpu_path(kind, packed):
    # 1000 tokens (15 checkpoints), q, k, v strided views of one fused projection
    T, H, D = 1000, 2, 64
    cu = torch.tensor([0, 1, 333, 334, 700, 1000]) if packed else None
    B = 1 if packed else 2
    q, k, v, g, beta, h0 = (x.float() for x in make_inputs(kind, B, T, H, D, seed=3,
                                                          docs=cu.tolist() if packed else None))
    scale = 0.9 * D ** -0.5
    cpu = run(OPS[kind], q, k, v, g, beta, h0, cu, scale)
    qkv = torch.cat([q, k, v], dim=-1).cuda()
    views = (qkv[..., :D], qkv[..., D:2 * D], qkv[..., 2 * D:])
    gpu = run(OPS[kind], *views, g.cuda(), beta.cuda(), h0.cuda(), cu.cuda() if packed else None, scale)
    assert rel_err(gpu[0].cpu(), cpu[0]) < 1e-4, "o"
    assert rel_err(gpu[1].cpu(), cpu[1]) < 1e-4, "final state"
    for name, got, want in zip(NAMES, gpu[2], cpu[2]):
        assert rel_err(got.cpu(), want) < 2e-4, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("packed", [False, True])
def test_gdn_chunked_kernels(dtype, D, packed):
    """GDN without sequence states: the CUDA backend's chunked tensor-core kernels
    (csrc/core/delta_rule/cuda/delta_chunk.h) run forward and backward. 250 tokens (the
    last chunk partial), documents inside chunks and on a chunk's first token, and -inf
    log gates (the state forgotten mid-chunk) against the float64 recurrence."""
    cu = torch.tensor([0, 5, 64, 65, 128, 201, 250]) if packed else None
    B, T, H = (1 if packed else 2), 250, 2
    q, k, v, g, beta, _ = make_inputs("gdn", B, T, H, D, seed=5, docs=cu.tolist() if packed else None)
    g[:, [40, 100, 192, 193]] = -float("inf")
    q, k, v = (x.to(dtype) for x in (q, k, v))
    scale = D ** -0.5

    def grads_of(op, tensors, cu_seqlens):
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        o = op(*leaves, scale=scale, cu_seqlens=cu_seqlens)[0]
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        loss = (o.double() * do.to(o.device).double()).sum()
        return o, torch.autograd.grad(loss, leaves)

    dev = [x.cuda() for x in (q, k, v)] + [g.float().cuda(), beta.float().cuda()]
    o, grads = grads_of(lasp2.gated_delta_rule, dev, cu.cuda() if packed else None)
    ref = [x.double() for x in (q, k, v)] + [g.float().double(), beta.float().double()]
    reference = lambda q, k, v, g, beta, scale, cu_seqlens: (
        delta_rule_reference(q, k, v, g, beta, scale, None, cu_seqlens)[0],)
    o_ref, grads_ref = grads_of(reference, ref, cu)
    tol = TOL[dtype]
    assert torch.isfinite(o).all(), "o"
    assert rel_err(o.cpu(), o_ref) < tol, "o"
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert torch.isfinite(got).all(), name
        assert rel_err(got.cpu(), want) < tol, name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("with_initial", [False, True])
def test_gdn_chunked_document_states(dtype, D, with_initial):
    """Packed documents with their own initial states in and end states out: the forward
    and the end states run the chunked kernels (csrc/core/delta_rule/cuda/
    delta_chunk_docs.h), the backward the recurrent ones. 300 tokens: several documents
    inside one chunk, documents shorter than a chunk, a one-token document, documents
    crossing chunk boundaries, one on a chunk's first token; -inf log gates inside a
    chunk and on a document's first token; against the float64 recurrence."""
    cu = torch.tensor([0, 3, 10, 11, 40, 64, 100, 190, 260, 300])
    T, H = 300, 2
    q, k, v, g, beta, h0 = make_inputs("gdn", 1, T, H, D, seed=7, docs=cu.tolist())
    g[:, [20, 64 + 36, 220]] = -float("inf")  # inside a chunk; a document's first token (100)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    scale = D ** -0.5
    h0 = h0 if with_initial else torch.zeros_like(h0)

    def outputs(op, tensors, cu_seqlens):
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        init = leaves[5] if with_initial else None
        o, final = op(*leaves[:5], scale=scale, initial_state=init, output_final_state=True, cu_seqlens=cu_seqlens)
        gen = torch.Generator().manual_seed(4)
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64).to(o.device)
        dF = torch.randn(final.shape, generator=gen, dtype=torch.float64).to(o.device)
        loss = (o.double() * do).sum() + (final.double() * dF).sum()
        grads = torch.autograd.grad(loss, leaves if with_initial else leaves[:5])
        return o, final, grads

    dev = [x.cuda() for x in (q, k, v)] + [g.float().cuda(), beta.float().cuda(), h0.float().cuda()]
    o, final, grads = outputs(lasp2.gated_delta_rule, dev, cu.cuda())
    ref = [x.double() for x in (q, k, v)] + [g.float().double(), beta.float().double(), h0.float().double()]
    reference = lambda q, k, v, g, beta, scale, initial_state, output_final_state, cu_seqlens: \
        delta_rule_reference(q, k, v, g, beta, scale, initial_state, cu_seqlens)
    o_ref, final_ref, grads_ref = outputs(reference, ref, cu)
    tol = TOL[dtype]
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    assert rel_err(o.cpu(), o_ref) < tol, "o"
    assert rel_err(final.cpu(), final_ref) < tol, "final state"
    for name, got, want in zip(NAMES, grads, grads_ref):
        assert rel_err(got.cpu(), want) < tol, name


def _skip_unless_kept(kind, D, dtype=torch.bfloat16):
    """Skips where the CUDA kernels keep nothing for (kind, D): KDA at D = 128 needs the
    chunked backward's 191.75 KiB of shared memory (sm_90; an sm_80 takes the token walks)."""
    from lasp2._extension import _C
    if not _C.delta_keeps_forward(dtype, D, D, kind == "kda", torch.device("cuda")):
        assert torch.cuda.get_device_capability() < (9, 0), "an H100 / H200 keeps the forward's outputs"
        pytest.skip(f"{kind} at D = {D}: this GPU's shared memory does not take the chunked backward")


@pytest.mark.parametrize("kind,D", [("gdn", 64), ("kda", 128)])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("final", [False, True])
def test_forward_kept_equals_recomputing(kind, D, packed, final, monkeypatch):
    """The forward's kept buffer (prep's and the state pass's outputs, read by the
    backward instead of running them again) against LASP2_DELTA_KEEP_FORWARD=0: the same
    kernels on the same values, so o, dq, dk, dv are equal bit for bit (dg, dbeta through
    shared-memory atomics: up to their order). GDN at D = 64, KDA at D = 128; 300 tokens
    (five chunks), rows with initial states or packed documents across chunks. The op's
    kept tensor has the fake function's size (> 0 where it keeps: rows with or without
    states, packed documents without)."""
    from lasp2.ops import _delta_library
    _skip_unless_kept(kind, D)
    cu = torch.tensor([0, 5, 64, 65, 150, 300]) if packed else None
    B, T, H = (1 if packed else 2), 300, 2
    q, k, v, g, beta, h0 = make_inputs(kind, B, T, H, D, seed=3, docs=cu.tolist() if packed else None)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    g, beta, h0 = (x.to("cuda", torch.float32) for x in (g, beta, h0))
    cu = cu.cuda() if packed else None
    h0 = None if packed else h0  # packed documents with their own states keep nothing

    def grads():
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, g, beta)]
        o, fin = OPS[kind](*leaves, initial_state=h0, output_final_state=final and not packed, cu_seqlens=cu)
        do = torch.randn(o.shape, generator=torch.Generator().manual_seed(1)).to(o.device, o.dtype)
        loss = (o.float() * do.float()).sum() + (fin.sum() if fin is not None else 0)
        return [o.detach(), *torch.autograd.grad(loss, leaves)]

    monkeypatch.setenv("LASP2_DELTA_KEEP_FORWARD", "0")
    want = grads()
    monkeypatch.delenv("LASP2_DELTA_KEEP_FORWARD")
    got = grads()
    for name, a, b in zip(("o", "dq", "dk", "dv"), got[:4], want[:4]):
        assert torch.equal(a, b), name
    for name, a, b in zip(("dg", "dbeta"), got[4:], want[4:]):
        assert rel_err(a, b) < 1e-5, name
    # the real kept buffer against the fake function's size
    args = (q, k, v, g, beta, cu, h0, D ** -0.5, 64, 0, 1, False, B if cu is None else cu.numel() - 1,
            final and not packed, [])
    kept = _delta_library.delta_rule_forward(*args)[6]
    assert kept.numel() > 0
    assert kept.numel() == _delta_library._forward_kept_floats(q, v, g, cu, h0, final and not packed, 0, 1)
    monkeypatch.setenv("LASP2_DELTA_KDA_KEEP_FORWARD", "0")  # KDA's own knob leaves GDN alone
    assert (_delta_library.delta_rule_forward(*args)[6].numel() == 0) == (kind == "kda")
    monkeypatch.delenv("LASP2_DELTA_KDA_KEEP_FORWARD")
    monkeypatch.setenv("LASP2_DELTA_KEEP_FORWARD", "0")
    assert _delta_library.delta_rule_forward(*args)[6].numel() == 0


@pytest.mark.parametrize("kind,D", [("gdn", 64), ("kda", 128)])
def test_forward_keeps_only_for_a_backward(kind, D):
    """The op keeps the forward's outputs only where a backward can follow: with inputs
    that require grad in grad mode the call's graph holds the kept buffer (its size from
    _forward_kept_floats) until it is freed; under torch.no_grad, or with no input that
    requires grad, nothing beyond o and the schedule's small saved buffers stays
    allocated after the call."""
    from lasp2.ops import _delta_library
    _skip_unless_kept(kind, D)
    B, T, H = 1, 4096, 4
    q, k, v, g, beta, _ = make_inputs(kind, B, T, H, D, seed=5)
    q, k, v = (x.to("cuda", torch.bfloat16) for x in (q, k, v))
    g, beta = (x.to("cuda", torch.float32) for x in (g, beta))
    kept_bytes = 4 * _delta_library._forward_kept_floats(q, v, g, None, None, False, 0, 1)
    o_bytes = v.numel() * v.element_size()
    assert kept_bytes > 4 * o_bytes  # the bound below tells the two apart

    def held(grad_mode, requires_grad):
        """Bytes the call leaves allocated while its output (and graph) lives."""
        leaves = [x.detach().clone().requires_grad_(requires_grad) for x in (q, k, v, g, beta)]
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        with torch.set_grad_enabled(grad_mode):
            o, _ = OPS[kind](*leaves)
        torch.cuda.synchronize()
        after = torch.cuda.memory_allocated()
        del o
        return after - before

    assert held(True, True) >= kept_bytes + o_bytes
    assert held(False, True) < o_bytes + kept_bytes // 4
    assert held(True, False) < o_bytes + kept_bytes // 4
