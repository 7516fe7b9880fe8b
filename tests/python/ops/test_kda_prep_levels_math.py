"""The factoring of the KDA levels prep (csrc/core/delta_rule/cuda/kda_prep.cu,
docs/history/delta-rule-log.md "KDA prep, session 11") in float64 against the direct formulas of
kda_chunk.h: the decays as products of per-token factors gamma (exchanged between the
16-token sub-chunks as each one's first-token factor and the product of its other 15),
the six levels' scaled tiles (levels 0..3 inside a sub-chunk, 4 and 5 between them),
which entries of each level's tile products are kept, P's diagonal, qg, kd, e^G . k and
eL; with segments (document starts, one on the chunk's first token), tokens past the
part and -inf gates. Every pair y < x of L must be written by exactly one level. CPU
only, no lasp2 code: it pins the index logic the kernel implements."""

import numpy as np
import pytest

CH, D, FLOOR = 64, 8, -40.0


def levels(g, start, live, q, k, beta, scale):
    """The kernel's steps, thread (sub-chunk X, dim) by thread, in float64."""
    gam = np.where((live & (start == 0))[:, None], np.exp(np.maximum(g, FLOOR)), 1.0)
    s = np.cumsum(start)
    s_last = s[-1]
    gfirst = np.stack([gam[16 * X] for X in range(4)])
    gtail = np.stack([np.prod(gam[16 * X + 1:16 * X + 16], axis=0) for X in range(4)])
    tot = gfirst * gtail

    def pre(X, a):  # gamma over the sub-chunk's tokens 0..a
        return np.prod(gam[16 * X:16 * X + a + 1], axis=0)

    def prx(X, a):  # 1..a
        return np.prod(gam[16 * X + 1:16 * X + a + 1], axis=0)

    def suf(X, a):  # a+1..15
        return np.prod(gam[16 * X + a + 1:16 * X + 16], axis=0)

    qg, kd, ekg = (np.zeros((CH, D)) for _ in range(3))
    for X in range(4):
        E, Z = np.prod(tot[:X], axis=0), np.prod(tot[X + 1:], axis=0)
        for a in range(16):
            x = 16 * X + a
            qg[x] = scale * q[x] * E * pre(X, a) * (s[x] == 0)
            ekg[x] = k[x] * E * pre(X, a) * (s[x] == 0)
            kd[x] = k[x] * suf(X, a) * Z * (s[x] == s_last)
    eL = np.prod(tot, axis=0) * (s_last == 0)

    def factor(m, X, a):
        if m < 4:
            h = 1 << m
            if a & h:  # upper half: (r, a], r = a with its bits below m cleared
                r = a & ~(h - 1)
                return np.prod(gam[16 * X + r + 1:16 * X + a + 1], axis=0)
            r = (a | h) & ~(h - 1)  # lower half: (a, r], r the upper half's first token
            return np.prod(gam[16 * X + a + 1:16 * X + r + 1], axis=0)
        if m == 4:
            return prx(X, a) if X & 1 else suf(X, a) * gfirst[X + 1]
        if X == 2:
            return prx(X, a)
        if X == 3:
            return gtail[2] * pre(X, a)
        if X == 1:
            return suf(X, a) * gfirst[2]
        return suf(X, a) * gfirst[1] * gtail[1] * gfirst[2]

    L = np.full((CH, CH), np.nan)
    P = np.zeros((CH, CH))
    for m in range(6):
        f = np.stack([factor(m, X, a) for X in range(4) for a in range(16)])
        ks, qs = k * f, q * f
        tiles = [(X, X) for X in range(4)] if m < 4 else [(1, 0), (3, 2)] if m == 4 else [
            (X, Y) for X in (2, 3) for Y in (0, 1)]
        for X, Y in tiles:
            acc_l = ks[16 * X:16 * X + 16] @ ks[16 * Y:16 * Y + 16].T
            acc_p = qs[16 * X:16 * X + 16] @ ks[16 * Y:16 * Y + 16].T
            for a in range(16):
                for b in range(16):
                    x, y = 16 * X + a, 16 * Y + b
                    pair, diag = True, False
                    if m < 4:
                        ha, hb = a >> m, b >> m
                        pair = (ha ^ hb) == 1 and (ha & 1) == 1
                        diag = a == b and (ha & 1) == 1 and (a & ((1 << m) - 1)) == 0
                    same = s[x] == s[y]
                    if pair:
                        assert np.isnan(L[x, y]), "an L entry written twice"
                        L[x, y] = beta[x] * acc_l[a, b] if same else 0.0
                    if pair or diag:
                        assert P[x, y] == 0, "a P entry written twice"
                        P[x, y] = scale * acc_p[a, b] if same else 0.0
    for X in range(4):  # the sub-chunks' first tokens: a dot product
        P[16 * X, 16 * X] = scale * q[16 * X] @ k[16 * X]
    return L, P, qg, kd, ekg, eL


def direct(g, start, live, q, k, beta, scale):
    G = np.cumsum(np.where((live & (start == 0))[:, None], np.maximum(g, FLOOR), 0.0), axis=0)
    s = np.cumsum(start)
    L = np.full((CH, CH), np.nan)
    P = np.zeros((CH, CH))
    for x in range(CH):
        for y in range(x + 1):
            e = np.exp(G[x] - G[y])
            same = s[x] == s[y]
            if y < x:
                L[x, y] = beta[x] * np.sum(k[x] * k[y] * e) if same else 0.0
            P[x, y] = scale * np.sum(q[x] * k[y] * e) if same else 0.0
    first = (s == 0)[:, None]
    qg = scale * q * np.exp(G) * first
    ekg = k * np.exp(G) * first
    kd = k * np.exp(G[-1] - G) * (s == s[-1])[:, None]
    eL = np.exp(G[-1]) * (s[-1] == 0)
    return L, P, qg, kd, ekg, eL


@pytest.mark.parametrize("case", ["mild", "ragged", "neginf", "docs", "docs_ragged", "doc_first"])
def test_levels_match_direct(case):
    rng = np.random.default_rng(["mild", "ragged", "neginf", "docs", "docs_ragged", "doc_first"].index(case))
    g = rng.uniform(-0.5, 0.0, (CH, D))
    if case != "mild" and case != "ragged":
        g[rng.random((CH, D)) < 0.05] = -np.inf
        g[20] = -np.inf  # every dim of one token
    start = np.zeros(CH, dtype=int)
    if case.startswith("docs"):
        start[[5, 16, 17, 40]] = 1  # inside a sub-chunk, on a sub-chunk edge, one-token document
    if case == "doc_first":
        start[0] = 1
    live = np.arange(CH) < (45 if "ragged" in case else CH)
    q, k = rng.normal(size=(CH, D)), rng.normal(size=(CH, D))
    beta = rng.uniform(0.0, 1.0, CH) * live
    got, want = levels(g, start, live, q, k, beta, 0.3), direct(g, start, live, q, k, beta, 0.3)
    for name, a, b in zip(("L", "P", "qg", "kd", "e^G k", "eL"), got, want):
        assert np.array_equal(np.isnan(a), np.isnan(b)), f"{name}: entries written"
        m = ~np.isnan(b)
        assert np.max(np.abs(a[m] - b[m]), initial=0.0) < 1e-9, name
