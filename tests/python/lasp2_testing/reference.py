"""Independent float64 references: the quadratic (attention-matrix) form of causal
linear attention and plain softmax attention, differentiated by autograd."""

from __future__ import annotations

from typing import Optional

import torch


def document_ids(cu_seqlens: Optional[torch.Tensor], length: int) -> Optional[torch.Tensor]:
    if cu_seqlens is None:
        return None
    ids = torch.zeros(length, dtype=torch.int64)
    for start in cu_seqlens.cpu()[1:-1].tolist():
        ids[start:] += 1
    return ids


def attention_mask(length: int, cu_seqlens=None, causal: bool = True) -> torch.Tensor:
    """mask[t, s]: query t may see key s (same document, and s <= t when causal)."""
    mask = torch.ones(length, length, dtype=torch.bool)
    if causal:
        mask = mask.tril()
    ids = document_ids(cu_seqlens, length)
    if ids is not None:
        mask &= ids[:, None] == ids[None, :]
    return mask


def log_gates(q, g=None, decay=None) -> torch.Tensor:
    """float64 [B, T, H] log decay of every step: g, the per-head decay, or zeros."""
    B, T, H, _ = q.shape
    if g is not None:
        return g.double()
    if decay is not None:
        return decay.double().view(1, 1, H).expand(B, T, H)
    return q.new_zeros(B, T, H, dtype=torch.float64)


def linear_attention_reference(q, k, v, g=None, decay=None, scale=None, cu_seqlens=None):
    """o[b, t] = scale * sum_{s<=t, same doc} exp(G_t - G_s) (q_t . k_s) v_s, [B, T, H, D] inputs."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    log_a = log_gates(q, g, decay)
    G = log_a.cumsum(1).permute(0, 2, 1)  # [B, H, T]
    mask = attention_mask(T, cu_seqlens).to(q.device)
    diff = (G[..., :, None] - G[..., None, :]).masked_fill(~mask, 0.0)
    weights = torch.where(mask, diff.exp(), torch.zeros_like(diff))
    scores = torch.einsum("bthd,bshd->bhts", q, k) * weights
    return scale * torch.einsum("bhts,bshd->bthd", scores, v)


def recurrence_reference(q, k, v, g=None, decay=None, scale=None, cu_seqlens=None):
    """S_t = exp(g_t) S_{t-1} + k_t v_t^T, o_t = scale q_t^T S_t in float64, token by token.

    [B, T, H, D] inputs; differentiable (autograd) in q, k, v, g and decay.
    """
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, Dk = q.shape
    scale = Dk ** -0.5 if scale is None else scale
    log_a = log_gates(q, g, decay)
    starts = set(cu_seqlens.tolist()[1:-1]) if cu_seqlens is not None else set()
    S = q.new_zeros(B, H, Dk, v.shape[-1])
    out = []
    for t in range(T):
        a = log_a[:, t].exp()[..., None, None]
        S = (torch.zeros_like(S) if t in starts else a * S) + k[:, t, :, :, None] * v[:, t, :, None, :]
        out.append(scale * torch.einsum("bhd,bhde->bhe", q[:, t], S))
    return torch.stack(out, 1)


def softmax_attention_reference(q, k, v, scale=None, cu_seqlens=None, causal=True):
    """Softmax attention (causal unless told), [B, T, H, D] inputs; K/V heads may divide
    Q heads (GQA); with cu_seqlens no query sees another document."""
    q, k, v = (x.double() for x in (q, k, v))
    B, T, H, D = q.shape
    groups = H // k.shape[2]
    k = k.repeat_interleave(groups, dim=2)
    v = v.repeat_interleave(groups, dim=2)
    scale = D ** -0.5 if scale is None else scale
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale
    scores = scores.masked_fill(~attention_mask(T, cu_seqlens, causal).to(q.device), float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)
