"""Float64 step-by-step reference for the gated delta rule (GDN) and KDA.

Independent of the chunked kernels: one token at a time, differentiated by autograd.
    S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,  o_t = scale * S_t^T q_t
D_t = exp(g_t) (g [B, T, H]) or diag(exp(g_t)) (g [B, T, H, Dk]). Packed documents
(cu_seqlens, B = 1) restart from their own initial state.
"""

import torch

L2NORM_EPS = 1e-6  # fla's l2norm, what use_qk_l2norm=True applies


def l2norm_reference(x, eps=L2NORM_EPS):
    """The L2 norm over the head dim that use_qk_l2norm=True applies to q and k (fla's
    l2norm; lasp2's op before its fused kernels): x * rsqrt(sum x^2 + eps)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def delta_rule_reference(q, k, v, g, beta, scale, initial_state=None, cu_seqlens=None):
    """q, k [B, T, H, Dk], v [B, T, H, Dv] (bthd). Returns (o, final [N, H, Dk, Dv])."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    per_key = g.dim() == 4
    if cu_seqlens is None:
        bounds = [(b, 0, T) for b in range(B)]  # (row, begin, end) per sequence
    else:
        cu = cu_seqlens.tolist()
        bounds = [(0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]
    outs = [[None] * T for _ in range(B)]
    finals = []
    for n, (b, begin, end) in enumerate(bounds):
        S = (initial_state[n].double() if initial_state is not None
             else torch.zeros(H, K, V, dtype=torch.float64))
        for t in range(begin, end):
            decay = torch.exp(g[b, t]) if per_key else torch.exp(g[b, t])[:, None].expand(H, K)
            X = decay[:, :, None] * S
            kt, vt, bt = k[b, t], v[b, t], beta[b, t]
            kx = torch.einsum("hk,hkv->hv", kt, X)
            S = X + bt[:, None, None] * kt[:, :, None] * (vt - kx)[:, None, :]
            outs[b][t] = scale * torch.einsum("hk,hkv->hv", q[b, t], S)
        finals.append(S)
    o = torch.stack([torch.stack(row) for row in outs])
    return o, torch.stack(finals)
