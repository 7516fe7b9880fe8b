"""A bounded, seeded fuzz of every public op and module (issue 13): linear_attention,
softmax_attention, gated_delta_rule, kda, the nn modules and the split helpers.

A few hundred generated calls, valid and invalid, run in child processes (each
child takes a slice of the cases and reports every case before and after running
it, so a crash or hang names its case, and the child is restarted after it):

  valid   : the result (and, for some, the gradients) equals a float64 reference;
  invalid : a ValueError or TypeError whose message names the argument;
  never   : a crash (signal), a hang (per-case timeout), NaN where the reference
            is finite, or a silent success on invalid input.

Seeded (FUZZ_SEED, default 13) and sized (FUZZ_CASES, default 320) from the
environment; well under 2 minutes on 2 cores.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import traceback

import pytest

SEED = int(os.environ.get("FUZZ_SEED", "13"))
CASES = int(os.environ.get("FUZZ_CASES", "320"))
CASE_TIMEOUT = 30.0
CHILDREN = 2


# --------------------------------------------------------------------------- case generation
# A case is a dict of plain Python values (picklable); tensors are built in the child.

def _doc_cuts(rng, total):
    cuts = sorted({rng.randrange(1, total) for _ in range(rng.randrange(0, 3))}) if total > 1 else []
    return [0, *cuts, total]


def _linear_valid(rng):
    B = rng.choice([1, 1, 2])
    c = dict(kind="linear", B=B, T=rng.randrange(1, 14), H=rng.randrange(1, 4), Dk=rng.randrange(1, 9),
             Dv=rng.randrange(1, 9), dtype=rng.choice(["float32", "float64"]),
             mode=rng.choice(["none", "decay", "g", "g"]), layout=rng.choice(["bthd", "tbhd"]),
             scale=rng.choice([None, None, 0.3, 0.0, -0.7, 2.0]), strided=rng.random() < 0.3,
             edges=rng.random() < 0.5, grad=rng.random() < 0.4, seed=rng.randrange(1 << 30))
    c["cu"] = _doc_cuts(rng, c["T"]) if B == 1 and rng.random() < 0.4 else None
    return c


def _softmax_valid(rng):
    B = rng.choice([1, 1, 2])
    hkv = rng.choice([1, 2])
    c = dict(kind="softmax", B=B, T=rng.randrange(1, 14), H=hkv * rng.choice([1, 2]), Hkv=hkv,
             D=rng.randrange(1, 17), Dv=rng.choice([None, rng.randrange(1, 9)]),
             dtype=rng.choice(["float32", "float64"]), layout=rng.choice(["bthd", "tbhd"]),
             scale=rng.choice([None, None, 0.25, 0.0, -0.5]), causal=rng.random() < 0.8,
             backend=rng.choice(["auto", "plain", "sdpa"]), strided=rng.random() < 0.3,
             grad=rng.random() < 0.4, seed=rng.randrange(1 << 30))
    c["cu"] = _doc_cuts(rng, c["T"]) if B == 1 and rng.random() < 0.4 else None
    return c


def _delta_valid(rng):
    """gated_delta_rule / kda: chunk edges (T up to 140 against 64-token chunks), packed
    documents, initial / final states, L2 norm, and edge gates (-inf: a full reset, a
    gate whose exp is 0 in double, 0; beta 0 and 1)."""
    B = rng.choice([1, 1, 2])
    c = dict(kind="delta", op=rng.choice(["gdn", "kda"]), B=B, T=rng.choice([rng.randrange(1, 20), rng.randrange(60, 141)]),
             H=rng.randrange(1, 3), Dk=rng.randrange(1, 7), Dv=rng.randrange(1, 7),
             dtype=rng.choice(["float32", "float64"]), layout=rng.choice(["bthd", "tbhd"]),
             scale=rng.choice([None, 0.3, -0.7]), edges=rng.random() < 0.5, state=rng.random() < 0.4,
             final=rng.random() < 0.5, l2norm=rng.random() < 0.3, grad=rng.random() < 0.4, seed=rng.randrange(1 << 30))
    c["cu"] = _doc_cuts(rng, c["T"]) if B == 1 and rng.random() < 0.4 else None
    return c


# (op, argument, bad value tag): each names the argument in its error
_INVALID = [
    ("linear", "q", "list"), ("linear", "q", "3d"), ("linear", "q", "int32"), ("linear", "k", "shape"),
    ("linear", "k", "dtype"), ("linear", "v", "shape"), ("linear", "q", "empty_seq"), ("linear", "q", "head_dim_0"),
    ("linear", "q", "head_dim_300"), ("linear", "g", "shape"), ("linear", "g", "positive"), ("linear", "g", "int"),
    ("linear", "decay", "shape"), ("linear", "decay", "positive"), ("linear", "decay", "with_g"),
    ("linear", "scale", True), ("linear", "scale", "str"), ("linear", "scale", "nan"), ("linear", "scale", "inf"),
    ("linear", "scale", "tensor"), ("linear", "layout", "bhtd"), ("linear", "split", "halves"),
    ("linear", "provider", "ring"), ("linear", "overlap", "no"), ("linear", "overlap", 1),
    ("linear", "cu_seqlens", "float"), ("linear", "cu_seqlens", "2d"), ("linear", "cu_seqlens", "start"),
    ("linear", "cu_seqlens", "decreasing"), ("linear", "cu_seqlens", "end"), ("linear", "cu_seqlens", "batch2"),
    ("linear", "group", "str"),
    ("softmax", "q", "list"), ("softmax", "q", "3d"), ("softmax", "k", "heads"), ("softmax", "k", "head_dim"),
    ("softmax", "v", "shape"), ("softmax", "k", "dtype"), ("softmax", "q", "empty_seq"),
    ("softmax", "scale", True), ("softmax", "scale", "nan"), ("softmax", "causal", "no"), ("softmax", "causal", 1),
    ("softmax", "backend", "flash"), ("softmax", "layout", "x"), ("softmax", "split", "x"),
    ("softmax", "cu_seqlens", "end"), ("softmax", "cu_seqlens", "decreasing"), ("softmax", "group", 3),
    ("split_sequence", "rank", 5), ("split_sequence", "rank", -1), ("split_sequence", "world_size", 0),
    ("split_sequence", "dim", 9), ("split_sequence", "dim", True), ("split_sequence", "rank", True),
    ("global_token_index", "rank", 3), ("global_token_index", "local_len", -2),
    ("LinearAttention", "num_heads", 0), ("LinearAttention", "hidden_size", 0),
    ("LinearAttention", "gate_logit_normalizer", 0.0), ("LinearAttention", "gate_logit_normalizer", -2.0),
    ("LinearAttention", "decay", "exp"), ("LinearAttention", "feature_map", "tanh"),
    ("LinearAttention", "provider", "x"), ("LinearAttention", "head_dim", 0), ("LinearAttention", "x", "shape"),
    ("SoftmaxAttention", "num_heads", 0), ("SoftmaxAttention", "num_kv_heads", 3),
    ("SoftmaxAttention", "num_kv_heads", 0), ("SoftmaxAttention", "hidden_size", 0),
    ("SoftmaxAttention", "x", "shape"), ("RMSNorm", "dim", 0), ("RMSNorm", "eps", -1.0), ("RMSNorm", "dim", True),
    ("gdn", "g", "positive"), ("gdn", "g", "per_key"), ("gdn", "g", "nan"), ("gdn", "beta", "above_one"),
    ("gdn", "beta", "negative"), ("gdn", "beta", "shape"), ("gdn", "initial_state", "shape"),
    ("gdn", "initial_state", "int"), ("gdn", "scale", True), ("gdn", "v", "shape"), ("gdn", "cu_seqlens", "end"),
    ("gdn", "use_qk_l2norm", "no"), ("gdn", "output_final_state", 1), ("gdn", "provider", "ring"),
    ("kda", "g", "per_head"), ("kda", "g", "positive"), ("kda", "beta", "above_one"),
    ("GatedDeltaNet", "num_heads", 0), ("GatedDeltaNet", "hidden_size", 0), ("GatedDeltaNet", "conv_size", 0),
    ("GatedDeltaNet", "norm_eps", 0.0), ("GatedDeltaNet", "layout", "x"), ("GatedDeltaNet", "split", "x"),
]


def _module_valid(rng):
    return dict(kind="module", which=rng.choice(["LinearAttention", "SoftmaxAttention", "RMSNorm", "GatedDeltaNet"]),
                decay=rng.choice(["none", "fixed", "gate"]), layout=rng.choice(["bthd", "tbhd"]),
                T=rng.randrange(1, 10), seed=rng.randrange(1 << 30))


def generate_cases(seed=SEED, n=CASES):
    rng = random.Random(seed)
    cases = [dict(kind="invalid", op=op, arg=arg, bad=bad, seed=i) for i, (op, arg, bad) in enumerate(_INVALID)]
    makers = [_linear_valid] * 5 + [_softmax_valid] * 4 + [_delta_valid] * 4 + [_module_valid]
    while len(cases) < n:
        cases.append(rng.choice(makers)(rng))
    rng.shuffle(cases)
    return cases


# --------------------------------------------------------------------------- running a case (child side)

def _run_case(case):
    import torch

    torch.manual_seed(case["seed"])
    if case["kind"] == "linear":
        return _check_linear(case)
    if case["kind"] == "softmax":
        return _check_softmax(case)
    if case["kind"] == "delta":
        return _check_delta(case)
    if case["kind"] == "module":
        return _check_module(case)
    return _check_invalid(case)


def _t(shape, dtype, strided, gen):
    import torch

    if strided:
        return torch.randn(*shape[:-1], 2 * shape[-1], generator=gen, dtype=torch.float64).to(dtype)[..., ::2]
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def _compare(name, got, want, dtype, tol64=1e-9):
    import torch

    tol = tol64 if dtype == torch.float64 else 3e-4
    got = got.detach()
    if not torch.isfinite(got).all():
        raise AssertionError(f"{name}: non-finite values where the reference is finite")
    err = float((got.double() - want).norm() / want.norm().clamp_min(1e-12))
    if err > tol and float((got.double() - want).abs().max()) > tol:
        raise AssertionError(f"{name}: relative error {err:.3g} > {tol}")


def _compare_with_grads(o, ref, leaves, ref_leaves, grad, gen, dtype):
    """o against its float64 reference and, with grad, dq, dk, dv for one dO drawn from
    gen: the checks of linear_attention and softmax_attention (the delta rule's differ:
    final states, its own tolerances)."""
    import torch

    _compare("o", o, ref.detach(), dtype)
    if grad:
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        got = torch.autograd.grad(o, leaves, do.to(dtype))
        want = torch.autograd.grad(ref, ref_leaves, do)
        for name, a, b in zip(("dq", "dk", "dv"), got, want):
            _compare(name, a, b, dtype)


def _check_linear(c):
    import torch
    import torch.nn.functional as F

    import lasp2
    from lasp2_testing.reference import recurrence_reference

    dtype = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, T, H = c["B"], c["T"], c["H"]
    q, k = (_t((B, T, H, c["Dk"]), dtype, c["strided"], gen) for _ in range(2))
    v = _t((B, T, H, c["Dv"]), dtype, c["strided"], gen)
    g = decay = None
    if c["mode"] == "g":
        g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64)).to(dtype)
        if c["edges"]:
            g.view(-1)[torch.randint(0, g.numel(), (2,), generator=gen)] = float("-inf")
            g.view(-1)[torch.randint(0, g.numel(), (1,), generator=gen)] = 0.0
    elif c["mode"] == "decay":
        decay = -torch.rand(H, generator=gen, dtype=torch.float64).to(dtype)
        if c["edges"]:
            decay[0] = float("-inf")
    cu = torch.tensor(c["cu"]) if c["cu"] is not None else None
    leaves = [x.detach().clone().requires_grad_(c["grad"]) for x in (q, k, v)]
    to_layout = (lambda x: x.transpose(0, 1)) if c["layout"] == "tbhd" else (lambda x: x)
    o = lasp2.linear_attention(*(to_layout(x) for x in leaves), g=None if g is None else to_layout(g),
                               decay=decay, scale=c["scale"], layout=c["layout"], cu_seqlens=cu)
    o = to_layout(o)
    ref_leaves = [x.detach().double().requires_grad_(c["grad"]) for x in (q, k, v)]
    ref = recurrence_reference(*ref_leaves, g=g, decay=decay, scale=c["scale"], cu_seqlens=cu)
    _compare_with_grads(o, ref, leaves, ref_leaves, c["grad"], gen, dtype)
    return "ok"


def _check_delta(c):
    import torch
    import torch.nn.functional as F

    import lasp2
    from lasp2_testing.delta_rule import delta_rule_reference, l2norm_reference

    dtype = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, T, H, Dk = c["B"], c["T"], c["H"], c["Dk"]
    q, k = (_t((B, T, H, Dk), torch.float64, False, gen) for _ in range(2))
    k = k if c["l2norm"] else F.normalize(k, dim=-1)
    v = _t((B, T, H, c["Dv"]), torch.float64, False, gen)
    g = F.logsigmoid(torch.randn(B, T, H, *([Dk] if c["op"] == "kda" else []), generator=gen, dtype=torch.float64))
    beta = torch.sigmoid(torch.randn(B, T, H, generator=gen, dtype=torch.float64))
    if c["edges"]:
        for value in (float("-inf"), float("-inf"), -1e30, 0.0):
            g.view(-1)[torch.randint(0, g.numel(), (1,), generator=gen)] = value
        beta.view(-1)[torch.randint(0, beta.numel(), (2,), generator=gen)] = torch.tensor([0.0, 1.0], dtype=torch.float64)
    cu = torch.tensor(c["cu"]) if c["cu"] is not None else None
    N = B if cu is None else len(c["cu"]) - 1
    h0 = 0.5 * torch.randn(N, H, Dk, c["Dv"], generator=gen, dtype=torch.float64) if c["state"] else None
    inputs = [x.to(dtype) for x in (q, k, v, g, beta)] + ([h0.to(dtype)] if c["state"] else [])
    leaves = [x.detach().clone().requires_grad_(c["grad"]) for x in inputs]
    to_layout = (lambda x: x.transpose(0, 1)) if c["layout"] == "tbhd" else (lambda x: x)
    op = lasp2.kda if c["op"] == "kda" else lasp2.gated_delta_rule
    o, final = op(*(to_layout(x) for x in leaves[:5]), scale=c["scale"], layout=c["layout"],
                  initial_state=leaves[5] if c["state"] else None, output_final_state=c["final"],
                  cu_seqlens=cu, use_qk_l2norm=c["l2norm"])
    o = to_layout(o)
    ref_leaves = [x.detach().double().requires_grad_(c["grad"]) for x in inputs]
    rq, rk = ref_leaves[:2]
    if c["l2norm"]:
        rq, rk = l2norm_reference(rq), l2norm_reference(rk)
    scale = c["scale"] if c["scale"] is not None else Dk ** -0.5
    ref, ref_final = delta_rule_reference(rq, rk, *ref_leaves[2:5], scale, ref_leaves[5] if c["state"] else None, cu)
    tol64 = 1e-5 if c["state"] or c["final"] else 1e-9  # states travel in fp32 in the core
    _compare("o", o, ref.detach(), dtype, tol64)
    if c["final"]:
        _compare("final_state", final, ref_final.detach(), dtype, tol64)
    if c["grad"]:
        do = torch.randn(o.shape, generator=gen, dtype=torch.float64)
        outs, ref_outs, grads_out = [o], [ref], [do]
        if c["final"]:
            dF = torch.randn(final.shape, generator=gen, dtype=torch.float64)
            outs, ref_outs, grads_out = outs + [final], ref_outs + [ref_final], grads_out + [dF]
        got = torch.autograd.grad(outs, leaves, [x.to(y.dtype) for x, y in zip(grads_out, outs)])
        want = torch.autograd.grad(ref_outs, ref_leaves, grads_out)
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), got, want):
            _compare(name, a, b, dtype, 1e-5)
    return "ok"


def _softmax_reference(q, k, v, scale, causal, cu):
    import torch

    T = q.shape[1]
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    v = v.repeat_interleave(q.shape[2] // v.shape[2], dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * scale
    mask = torch.ones(T, T, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    if cu is not None:
        ids = torch.zeros(T, dtype=torch.int64)
        for start in cu[1:-1]:
            ids[start:] += 1
        mask &= ids[:, None] == ids[None, :]
    return torch.einsum("bhts,bshd->bthd", s.masked_fill(~mask, float("-inf")).softmax(-1), v)


def _check_softmax(c):
    import torch

    import lasp2

    dtype = getattr(torch, c["dtype"])
    gen = torch.Generator().manual_seed(c["seed"])
    B, T = c["B"], c["T"]
    dv = c["Dv"] or c["D"]
    q = _t((B, T, c["H"], c["D"]), dtype, c["strided"], gen)
    k = _t((B, T, c["Hkv"], c["D"]), dtype, c["strided"], gen)
    v = _t((B, T, c["Hkv"], dv), dtype, c["strided"], gen)
    cu = torch.tensor(c["cu"]) if c["cu"] is not None else None
    leaves = [x.detach().clone().requires_grad_(c["grad"]) for x in (q, k, v)]
    to_layout = (lambda x: x.transpose(0, 1)) if c["layout"] == "tbhd" else (lambda x: x)
    o = to_layout(lasp2.softmax_attention(*(to_layout(x) for x in leaves), scale=c["scale"], layout=c["layout"],
                                          cu_seqlens=cu, causal=c["causal"], backend=c["backend"]))
    scale = c["scale"] if c["scale"] is not None else c["D"] ** -0.5
    ref_leaves = [x.detach().double().requires_grad_(c["grad"]) for x in (q, k, v)]
    ref = _softmax_reference(*ref_leaves, scale, c["causal"], c["cu"])
    _compare_with_grads(o, ref, leaves, ref_leaves, c["grad"], gen, dtype)
    return "ok"


def _check_module(c):
    """A module in float32 equals the same module (same weights) run in float64."""
    import copy

    import torch

    import lasp2

    hidden, heads = 16, 2
    if c["which"] == "LinearAttention":
        m = lasp2.nn.LinearAttention(hidden, heads, decay=c["decay"], layout=c["layout"])
    elif c["which"] == "SoftmaxAttention":
        m = lasp2.nn.SoftmaxAttention(hidden, heads, layout=c["layout"])
    elif c["which"] == "GatedDeltaNet":
        m = lasp2.nn.GatedDeltaNet(hidden, heads, per_key_gate=c["decay"] == "gate", layout=c["layout"])
    else:
        m = lasp2.nn.RMSNorm(hidden)
    x = torch.randn(1, c["T"], hidden, generator=torch.Generator().manual_seed(c["seed"]))
    m64 = copy.deepcopy(m).double()
    got, want = m(x), m64(x.double())
    _compare(c["which"], got, want.detach(), torch.float32)
    return "ok"


def _bad_linear(arg, bad, torch, kw):
    q, k, v = kw["q"], kw["k"], kw["v"]
    if arg in ("q", "k", "v"):
        x = kw[arg]
        kw[arg] = {"list": lambda: x.tolist(), "3d": lambda: x[0], "int32": lambda: x.to(torch.int32),
                   "shape": lambda: x[:, :2], "dtype": lambda: x.double(), "empty_seq": lambda: x[:, :0],
                   "head_dim_0": lambda: x[..., :0], "head_dim_300": lambda: torch.randn(*x.shape[:3], 300),
                   "heads": lambda: torch.randn(x.shape[0], x.shape[1], 3, x.shape[3]),
                   "head_dim": lambda: torch.randn(*x.shape[:3], x.shape[3] + 1)}[bad]()
        if bad in ("empty_seq", "head_dim_0", "head_dim_300"):  # one consistent bad q, k, v
            for n in ("k", "v"):
                kw[n] = kw["q"].clone() if bad != "head_dim_300" else kw["q"]
    elif arg == "g":
        kw["g"] = {"shape": lambda: torch.zeros(1, 3), "positive": lambda: torch.full(q.shape[:3], 0.1),
                   "int": lambda: torch.zeros(q.shape[:3], dtype=torch.int64)}[bad]()
    elif arg == "decay":
        if bad == "with_g":
            kw["decay"], kw["g"] = torch.zeros(q.shape[2]), torch.zeros(q.shape[:3])
        else:
            kw["decay"] = {"shape": torch.zeros(q.shape[2] + 1), "positive": torch.full((q.shape[2],), 0.5)}[bad]
    elif arg == "scale":
        kw["scale"] = {"str": "0.5", "nan": float("nan"), "inf": float("inf"),
                       "tensor": torch.tensor(0.5)}.get(bad, bad) if not isinstance(bad, bool) else bad
    elif arg == "cu_seqlens":
        T = q.shape[1]
        if bad == "batch2":
            kw.update(q=q.expand(2, *q.shape[1:]), k=k.expand(2, *k.shape[1:]), v=v.expand(2, *v.shape[1:]))
            kw["cu_seqlens"] = torch.tensor([0, T])
        else:
            kw["cu_seqlens"] = {"float": torch.tensor([0.0, T]), "2d": torch.tensor([[0, T]]),
                                "start": torch.tensor([1, T]), "decreasing": torch.tensor([0, 5, 3, T]),
                                "end": torch.tensor([0, T + 1])}[bad]
    else:
        kw[arg] = bad


def _bad_delta(op, arg, bad, torch, kw):
    """gated_delta_rule / kda with one bad argument; the rest valid."""
    import lasp2

    q = kw["q"]
    shape = (*q.shape[:3], q.shape[3]) if op == "kda" else q.shape[:3]
    kw["g"], kw["beta"] = -0.1 * torch.ones(shape), 0.5 * torch.ones(q.shape[:3])
    bad_values = {
        ("g", "positive"): lambda: 0.1 * torch.ones(shape), ("g", "nan"): lambda: torch.full(shape, float("nan")),
        ("g", "per_key"): lambda: -0.1 * torch.ones(*q.shape), ("g", "per_head"): lambda: -0.1 * torch.ones(q.shape[:3]),
        ("beta", "above_one"): lambda: torch.full(q.shape[:3], 1.5), ("beta", "negative"): lambda: -kw["beta"],
        ("beta", "shape"): lambda: kw["beta"][..., :1], ("initial_state", "shape"): lambda: torch.zeros(2, 2, 4, 4),
        ("initial_state", "int"): lambda: torch.zeros(1, 2, 4, 4, dtype=torch.int32),
        ("v", "shape"): lambda: kw["v"][:, :3], ("cu_seqlens", "end"): lambda: torch.tensor([0, q.shape[1] + 1]),
    }
    kw[arg] = bad_values[(arg, bad)]() if (arg, bad) in bad_values else bad
    fn = lasp2.kda if op == "kda" else lasp2.gated_delta_rule
    return lambda: fn(**kw)


def _check_invalid(c):
    import torch

    import lasp2

    op, arg, bad = c["op"], c["arg"], c["bad"]
    gen = torch.Generator().manual_seed(c["seed"])
    kw = {n: torch.randn(1, 8, 2, 4, generator=gen) for n in "qkv"}
    if op in ("gdn", "kda"):
        call = _bad_delta(op, arg, bad, torch, kw)
    elif op in ("linear", "softmax"):
        _bad_linear(arg, bad, torch, kw)
        fn = lasp2.linear_attention if op == "linear" else lasp2.softmax_attention
        call = lambda: fn(**kw)  # noqa: E731
    elif op == "split_sequence":
        call = lambda: lasp2.split_sequence(kw["q"], **({"rank": bad, "world_size": 2} if arg == "rank" else  # noqa: E731
                                                         {"rank": 0, "world_size": bad} if arg == "world_size" else
                                                         {arg: bad}))
    elif op == "global_token_index":
        args = dict(local_len=4, rank=0, world_size=2)
        args[arg] = bad
        call = lambda: lasp2.global_token_index(**args)  # noqa: E731
    else:
        cls = getattr(lasp2.nn, op)
        args = {"LinearAttention": dict(hidden_size=16, num_heads=2), "GatedDeltaNet": dict(hidden_size=16, num_heads=2),
                "SoftmaxAttention": dict(hidden_size=16, num_heads=4),
                "RMSNorm": dict(dim=8)}[op]
        if arg == "x":
            call = lambda: cls(**args)(torch.randn(1, 4, 7))  # noqa: E731
        else:
            args[arg] = bad
            call = lambda: cls(**args)  # noqa: E731
    try:
        call()
    except (ValueError, TypeError) as e:
        if f"`{arg}`" not in str(e) and not (arg in ("split", "provider", "layout") and arg in str(e)):
            raise AssertionError(f"error does not name `{arg}`: {type(e).__name__}: {e}")
        return "ok"
    raise AssertionError(f"no error for {op} with {arg}={bad!r}")


def _child(cases, conn):
    import torch

    torch.set_num_threads(1)
    for index, case in cases:
        conn.send(("start", index))
        try:
            _run_case(case)
            conn.send(("done", index, None))
        except BaseException as e:  # reported, and the next case runs
            conn.send(("done", index, f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"))
    conn.send(("end", None))
    conn.close()


# --------------------------------------------------------------------------- parent side

def _run_all(cases):
    """Runs the cases in CHILDREN processes; returns {index: failure text}."""
    ctx = multiprocessing.get_context("spawn")
    failures = {}
    pending = [list(enumerate(cases))[i::CHILDREN] for i in range(CHILDREN)]
    workers = []

    def spawn(todo):
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_child, args=(todo, child), daemon=True)
        proc.start()
        child.close()
        return {"proc": proc, "conn": parent, "todo": todo, "current": None, "first": True}

    workers = [spawn(todo) for todo in pending if todo]
    while workers:
        for w in list(workers):
            timeout = CASE_TIMEOUT * (4 if w["first"] else 1)  # the first case pays the imports
            if w["conn"].poll(timeout):
                try:
                    msg = w["conn"].recv()
                except EOFError:
                    msg = ("died", None)
            else:
                msg = ("hung", None)
            if msg[0] == "start":
                w["current"] = msg[1]
                continue
            if msg[0] == "done":
                w["first"] = False
                if msg[2] is not None:
                    failures[msg[1]] = msg[2]
                w["todo"] = [t for t in w["todo"] if t[0] != msg[1]]
                continue
            workers.remove(w)
            if msg[0] == "end":
                w["proc"].join(10)
                continue
            # crashed or hung inside case w["current"]: report it, go on after it
            w["proc"].kill()
            w["proc"].join()
            bad = w["current"]
            failures[bad] = f"{msg[0]} (exit code {w['proc'].exitcode})"
            rest = [t for t in w["todo"] if t[0] != bad]
            if rest:
                workers.append(spawn(rest))
    return failures


def test_fuzz_every_public_op_and_module():
    cases = generate_cases()
    assert len(cases) >= min(CASES, 300) and sum(c["kind"] == "invalid" for c in cases) >= 60
    failures = _run_all(cases)
    report = "\n".join(f"case {i} {cases[i]}:\n  {text}" for i, text in sorted(failures.items()))
    assert not failures, f"{len(failures)} of {len(cases)} fuzz cases failed:\n{report}"


def test_cases_are_reproducible():
    assert generate_cases(5, 50) == generate_cases(5, 50)
