"""The math of the chunked KDA backward (csrc/core/delta_rule/cuda/kda_chunk_bwd.h,
docs/history/delta-rule-log.md "The KDA chunked backward") in float64 against autograd of the token
recurrence: the per-chunk forward (T, w, u, qg, kd, eL, P, v_new), the reverse pass for
each chunk's leaving-state gradient dh_c, then each chunk's dq, dk, dv, dg (per key dim,
a reverse cumulative sum inside each segment) and dbeta, with documents starting inside
chunks, an entering state and a leaving-state gradient. The kernels factor the decayed
token sums between 16-token sub-chunks; that factoring is exact, so this model sums with
the full per-element decays. CPU only, no lasp2 code: it pins the formulas the kernels
implement."""

import torch

C = 64  # tokens a chunk


def recurrence(q, k, v, g, beta, S, starts, scale):
    outs = []
    for t in range(q.shape[0]):
        X = torch.zeros_like(S) if starts[t] else torch.exp(g[t])[:, None] * S
        S = X - beta[t] * torch.outer(k[t], k[t] @ X) + beta[t] * torch.outer(k[t], v[t])
        outs.append(scale * S.T @ q[t])
    return torch.stack(outs), S


def chunk(q, k, v, g, beta, starts, c):
    """The chunk's padded rows, G (restarting at 0 at a document start) and segment ids."""
    T, d = q.shape
    t0, n = c * C, min(C, T - c * C)
    pad = lambda a: torch.cat([a[t0:t0 + n], torch.zeros((C - n,) + a.shape[1:], dtype=a.dtype)])
    qc, kc, vc, gc, bc, st = (pad(x) for x in (q, k, v, g, beta, starts.double()))
    G, acc = torch.zeros(C, d, dtype=q.dtype), torch.zeros(d, dtype=q.dtype)
    for x in range(C):
        acc = torch.zeros_like(acc) if st[x] else (acc + gc[x] if x < n else acc)
        G[x] = acc
    return qc, kc, vc, bc, G, torch.cumsum(st, 0), n


def test_chunked_kda_backward_formulas():
    torch.manual_seed(0)
    dt, T, d, scale = torch.float64, 150, 8, 0.7
    q, v = torch.randn(T, d, dtype=dt), torch.randn(T, d, dtype=dt)
    k = torch.randn(T, d, dtype=dt) / d ** 0.5
    g = -torch.rand(T, d, dtype=dt) * 2.0
    g[5, 3] = -30.0
    beta = torch.rand(T, dtype=dt)
    starts = torch.zeros(T, dtype=torch.bool)
    starts[[20, 40, 74, 130]] = True
    S_in, X_out, dO = torch.randn(d, d, dtype=dt), torch.randn(d, d, dtype=dt), torch.randn(T, d, dtype=dt)

    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, beta, S_in)]
    o, S_fin = recurrence(*leaves, starts, scale)
    ((o * dO).sum() + (S_fin * X_out).sum()).backward()
    want = [x.grad for x in leaves]

    idx = torch.arange(C)
    nck = (T + C - 1) // C
    F, S = [], S_in
    for c in range(nck):  # forward: the state entering each chunk, v_new, T, P
        qc, kc, vc, bc, G, s, n = chunk(q, k, v, g, beta, starts, c)
        same = s[:, None] == s[None, :]
        dec = torch.exp(torch.clamp(G[:, None, :] - G[None, :, :], max=0.0))  # used where y <= x only
        L = torch.where((idx[None] < idx[:, None]) & same, bc[:, None] * torch.einsum("xi,yi,xyi->xy", kc, kc, dec), 0.0)
        P = torch.where((idx[None] <= idx[:, None]) & same, scale * torch.einsum("xi,yi,xyi->xy", qc, kc, dec), 0.0)
        Tm = torch.linalg.inv(torch.eye(C, dtype=dt) + L)
        first, last = (s == 0)[:, None], (s == s[-1])[:, None]
        w = Tm @ (bc[:, None] * torch.where(first, torch.exp(G) * kc, 0.0))
        U = Tm @ (bc[:, None] * vc) - w @ S
        qg = torch.where(first, scale * torch.exp(G) * qc, 0.0)
        dd = torch.where(last, torch.exp(G[-1][None] - G), 0.0)
        eL = torch.exp(G[-1]) if s[-1] == 0 else torch.zeros(d, dtype=dt)
        F.append(dict(qc=qc, kc=kc, vc=vc, bc=bc, G=G, s=s, n=n, Tm=Tm, P=P, w=w, U=U, qg=qg, dd=dd, eL=eL, S0=S,
                      dO=torch.cat([dO[c * C:c * C + n], torch.zeros(C - n, d, dtype=dt)])))
        S = eL[:, None] * S + (dd * kc).T @ U
    assert (S - S_fin.detach()).abs().max() < 1e-12

    X = X_out  # the reverse pass: dh_c, the gradient of the state leaving chunk c
    for f in reversed(F):
        f["X"], r = X, -(f["P"].T @ f["dO"])
        X = f["eL"][:, None] * X + f["w"].T @ (r - (f["dd"] * f["kc"]) @ X) + f["qg"].T @ f["dO"]
    dS_in = X

    got = [[] for _ in range(5)]
    for f in F:  # every chunk's gradients from the chunk alone
        qc, kc, vc, bc, G, s, n, Tm, U, S0, X, dOc = (f[x] for x in "qc kc vc bc G s n Tm U S0 X dO".split())
        ent = torch.where((s == 0)[:, None], torch.exp(G), 0.0)
        kd = f["dd"] * kc
        dU = kd @ X + f["P"].T @ dOc
        CX = U @ X.T
        dG = -kd * CX
        dGL = (kd * CX).sum(0) + f["eL"] * (X * S0).sum(1)
        dB = Tm.T @ dU
        dv, db = bc[:, None] * dB, (dB * vc).sum(1)
        Z = ent * (dB @ S0.T)
        dk = f["dd"] * CX - bc[:, None] * Z
        dG -= bc[:, None] * kc * Z
        db -= (kc * Z).sum(1)
        same = s[:, None] == s[None, :]
        dP = torch.where((idx[None] <= idx[:, None]) & same, scale * (dOc @ U.T), 0.0)
        dL = torch.where((idx[None] < idx[:, None]) & same, -(dB @ U.T), 0.0)
        dec = torch.exp(torch.clamp(G[:, None, :] - G[None, :, :], max=0.0))
        rows = lambda M, B: torch.einsum("xy,yi,xyi->xi", M, B, dec)
        cols = lambda M, A: torch.einsum("xy,xi,xyi->yi", M, A, dec)
        dq = scale * ent * (dOc @ S0.T) + rows(dP, kc)
        dG += qc * dq
        R = rows(dL, kc)
        dk += bc[:, None] * R
        db += (kc * R).sum(1)
        dG += kc * bc[:, None] * R
        for term in (cols(dP, qc), cols(dL, bc[:, None] * kc)):
            dk += term
            dG -= kc * term
        dG[-1] += dGL
        dg, run = torch.zeros_like(dG), torch.zeros(d, dtype=dt)
        for x in reversed(range(C)):
            if x + 1 < C and s[x + 1] != s[x]:
                run = torch.zeros(d, dtype=dt)
            run = run + dG[x]
            seg_first = s[x] != 0 if x == 0 else s[x] != s[x - 1]
            dg[x] = 0.0 if seg_first else run
        for lst, val in zip(got, (dq, dk, dv, dg, db)):
            lst.append(val[:n])
    got = [torch.cat(x) for x in got] + [dS_in]
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "d_entering"), got, want):
        assert (a - b).abs().max() < 1e-12 * max(1.0, b.abs().max().item()), name
