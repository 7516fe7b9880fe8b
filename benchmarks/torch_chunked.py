"""A plain PyTorch chunked causal linear attention (the benchmarks' baseline).

Intra-chunk masked products plus a Python loop over chunks for the state, in the
inputs' precision for the matmuls and fp32 for states; autograd gives backward.
"""

import torch


def torch_chunked_linear_attention(q, k, v, g=None, scale=None, chunk=64):
    B, T, H, D = q.shape
    Dv = v.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    pad = (-T) % chunk
    if g is None:
        g = q.new_zeros(B, T, H, dtype=torch.float32)
    if pad:
        q, k, v = (torch.nn.functional.pad(x, (0, 0, 0, 0, 0, pad)) for x in (q, k, v))
        g = torch.nn.functional.pad(g, (0, 0, 0, pad))
    N = q.shape[1] // chunk
    to_chunks = lambda x: x.view(B, N, chunk, H, -1).permute(0, 3, 1, 2, 4)  # [B, H, N, C, D]
    qc, kc, vc = to_chunks(q), to_chunks(k), to_chunks(v)
    G = g.float().view(B, N, chunk, H).permute(0, 3, 1, 2).cumsum(-1)  # [B, H, N, C]
    mask = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~mask, float("-inf")).exp()
    scores = (qc @ kc.transpose(-1, -2)).float() * decay
    o_intra = scores.to(v.dtype) @ vc
    # per-chunk state contributions and the sequential scan over chunks
    k_exit = (kc.float() * (G[..., -1:] - G).exp()[..., None]).to(k.dtype)
    contrib = (k_exit.transpose(-1, -2) @ vc).float()  # [B, H, N, D, Dv]
    through = G[..., -1].exp()  # [B, H, N]
    states = []
    S = q.new_zeros(B, H, D, Dv, dtype=torch.float32)
    for n in range(N):
        states.append(S)
        S = through[..., n, None, None] * S + contrib[:, :, n]
    S_in = torch.stack(states, dim=2)  # state entering each chunk
    q_entry = (qc.float() * G.exp()[..., None])
    o_inter = q_entry @ S_in
    o = (o_intra.float() + o_inter) * scale
    o = o.permute(0, 2, 3, 1, 4).reshape(B, N * chunk, H, Dv)[:, :T]
    return o.to(v.dtype)
