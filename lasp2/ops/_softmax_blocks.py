"""Attention on one block of queries x keys, returning the log-sum-exp, and its backward.

LASP-2H (lasp2.softmax_attention) splits a rank's causal attention into blocks that
are each either *square causal* (queries and keys are the same positions) or *full*
(every query sees every key): the pieces of a lower-right aligned causal mask.
Blocks are merged with their log-sum-exp (LSE), and in backward each block is
differentiated with the *merged* output and LSE, so the block gradients add up to
the gradient of the whole attention row.

Two backends, same contract (inputs ``[B, T, H, D]`` views, K/V may have fewer heads,
GQA; results in the accumulation dtype, float32, or float64 for float64 inputs):
  "sdpa":  PyTorch's fused attention kernels, the ops behind
           ``scaled_dot_product_attention`` that also return the LSE:
           ``_scaled_dot_product_flash_attention_for_cpu`` on CPU (exact in float64)
           and the flash kernel ``_scaled_dot_product_flash_attention`` on CUDA
           (float16/bfloat16, head dim a multiple of 8, <= 256); both need equal
           q/k/v head dims. GQA: native on CPU, K/V heads repeated on CUDA.
  "plain": explicit matrix products with float32 (float64) accumulation. Used where
           no fused kernel applies (CUDA float32/float64, odd head dims) and as a
           readable statement of the math.
"""

from __future__ import annotations

import warnings

import torch

from lasp2.options import SOFTMAX_BACKENDS as BACKENDS
_aten = torch.ops.aten
_FUSED_FAILED: set = set()


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def resolve_backend(backend: str, q: torch.Tensor, v_head_dim: int, scale: float = 1.0) -> str:
    """The backend a call with these inputs uses ("auto" picks sdpa where it applies)."""
    # "sdpa" and "auto" both mean: the fused kernel where it applies, else "plain".
    # The fused causal kernels mask with a value that a scale <= 0 turns into NaN rows
    # (seen with the CPU flash kernel); such scales are valid, so they take "plain".
    if (backend != "plain" and scale > 0 and _fused_supported(q, v_head_dim)
            and (q.device.type, q.dtype) not in _FUSED_FAILED):
        return "sdpa"
    return "plain"


def _fused_supported(q: torch.Tensor, v_head_dim: int) -> bool:
    d = q.shape[-1]
    if d != v_head_dim:  # the flash kernels need one head dim for q, k and v
        return False
    if q.device.type == "cpu":
        return True
    if q.device.type == "cuda":
        return (q.dtype in (torch.float16, torch.bfloat16) and d % 8 == 0 and d <= 256
                and torch.backends.cuda.flash_sdp_enabled())
    return False


def _expand_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, S, Hkv, D] -> [B, H, S, D] with each K/V head repeated for its query group."""
    b, s, hkv, d = x.shape
    if hkv != heads:
        x = x[:, :, :, None, :].expand(b, s, hkv, heads // hkv, d).reshape(b, s, heads, d)
    return x.transpose(1, 2)


def _fold_heads(dx: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """[B, H, S, D] -> [B, S, Hkv, D], summing over each query group (GQA backward);
    [B, Hkv, S, D] (a kernel with native GQA) is only transposed."""
    b, h, s, d = dx.shape
    dx = dx.transpose(1, 2)
    if h != kv_heads:
        dx = dx.reshape(b, s, kv_heads, h // kv_heads, d).sum(3)
    return dx


# --------------------------------------------------------------------------- plain


def _plain_scores(q, k, scale, causal, acc):
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    qg = q.to(acc).reshape(b, tq, hkv, h // hkv, d)
    s = torch.einsum("bqhgd,bkhd->bhgqk", qg, k.to(acc)) * scale
    if causal:  # square block: query i sees keys 0..i
        tk = k.shape[1]
        s = s.masked_fill(torch.ones(tq, tk, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return s, qg


def _plain_forward(q, k, v, scale, causal):
    acc = acc_dtype(q.dtype)
    b, tq, h, _ = q.shape
    s, _ = _plain_scores(q, k, scale, causal, acc)
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, G, Tq]; every row sees >= 1 key
    p = torch.exp(s - lse[..., None])
    o = torch.einsum("bhgqk,bkhd->bqhgd", p, v.to(acc)).reshape(b, tq, h, v.shape[-1])
    return o, lse.reshape(b, h, tq)


def _plain_backward(do, q, k, v, o, lse, scale, causal):
    acc = acc_dtype(q.dtype)
    b, tq, h, d = q.shape
    hkv = k.shape[2]
    s, qg = _plain_scores(q, k, scale, causal, acc)
    p = torch.exp(s - lse.reshape(b, hkv, h // hkv, tq)[..., None])
    dog = do.to(acc).reshape(b, tq, hkv, h // hkv, -1)
    delta = (dog * o.to(acc).reshape(dog.shape)).sum(-1).permute(0, 2, 3, 1)  # [B, Hkv, G, Tq]
    dv = torch.einsum("bhgqk,bqhgd->bkhd", p, dog)
    dp = torch.einsum("bqhgd,bkhd->bhgqk", dog, v.to(acc))
    ds = p * (dp - delta[..., None])
    dq = torch.einsum("bhgqk,bkhd->bqhgd", ds, k.to(acc)).reshape(b, tq, h, d) * scale
    dk = torch.einsum("bhgqk,bqhgd->bkhd", ds, qg) * scale
    return dq, dk, dv


# --------------------------------------------------------------------------- fused


def _on_cpu(x: torch.Tensor) -> bool:
    """Which fused kernel family serves x (a seam for tests of the CUDA branch's plumbing)."""
    return x.device.type == "cpu"


def _kv_heads_for_kernel(x: torch.Tensor, heads: int) -> torch.Tensor:
    # the CPU kernel takes fewer K/V heads (GQA) natively; on CUDA they are repeated
    return x.transpose(1, 2) if _on_cpu(x) else _expand_heads(x, heads)


def _unit_stride(*xs: torch.Tensor):
    """The fused kernels read the last dim as contiguous (the CPU flash kernel silently
    misreads q[..., ::2]): copy the tensors that are not."""
    return tuple(x if x.stride(-1) == 1 else x.contiguous() for x in xs)


def _fused_forward(q, k, v, scale, causal):
    q, k, v = _unit_stride(q, k, v)
    h = q.shape[2]
    qh, kh, vh = q.transpose(1, 2), _kv_heads_for_kernel(k, h), _kv_heads_for_kernel(v, h)
    if _on_cpu(q):
        o, lse = _aten._scaled_dot_product_flash_attention_for_cpu(qh, kh, vh, 0.0, causal, scale=scale)
    else:
        o, lse, *_ = _aten._scaled_dot_product_flash_attention(
            qh.contiguous(), kh.contiguous(), vh.contiguous(), 0.0, causal, False, scale=scale)
    acc = acc_dtype(q.dtype)
    return o.transpose(1, 2).to(acc), lse.to(acc)


def _fused_backward(do, q, k, v, o, lse, scale, causal):
    do, q, k, v, o = _unit_stride(do, q, k, v, o)
    h, hkv = q.shape[2], k.shape[2]
    qh, kh, vh = q.transpose(1, 2), _kv_heads_for_kernel(k, h), _kv_heads_for_kernel(v, h)
    doh, oh = do.transpose(1, 2), o.transpose(1, 2)
    if _on_cpu(q):
        lse = lse.to(torch.float64 if q.dtype == torch.float64 else torch.float32).contiguous()
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_for_cpu_backward(
            doh, qh, kh, vh, oh, lse, 0.0, causal, scale=scale)
    else:
        # the forward's extra outputs are not kept (the op saves only tensors it owns):
        # without varlen and without dropout they are the block's lengths and two unused
        # RNG scalars, rebuilt here
        unused = torch.empty((), dtype=torch.int64)
        dq, dk, dv = _aten._scaled_dot_product_flash_attention_backward(
            doh.contiguous(), qh.contiguous(), kh.contiguous(), vh.contiguous(), oh.contiguous(),
            lse.float().contiguous(), None, None, qh.shape[2], kh.shape[2], 0.0, causal, unused, unused,
            scale=scale)
    acc = acc_dtype(q.dtype)
    return dq.transpose(1, 2).to(acc), _fold_heads(dk.to(acc), hkv), _fold_heads(dv.to(acc), hkv)


# --------------------------------------------------------------------------- dispatch


def block_forward(backend: str, q, k, v, scale: float, causal: bool):
    """(o [B, Tq, H, Dv], lse [B, H, Tq]) in the accumulation dtype."""
    if backend == "sdpa":
        try:
            return _fused_forward(q, k, v, scale, causal)
        except RuntimeError as exc:  # e.g. a GPU without the flash kernel
            if q.device.type == "cpu":
                raise
            _FUSED_FAILED.add((q.device.type, q.dtype))
            warnings.warn(f"lasp2.softmax_attention: the fused SDPA kernel failed ({exc}); "
                          "using the plain implementation for this device and dtype from now on")
    return _plain_forward(q, k, v, scale, causal)


def block_backward(backend: str, do, q, k, v, o, lse, scale: float, causal: bool):
    """(dq, dk, dv) of one block, given the *merged* output o and LSE of its query rows.
    The fused backward runs where the fused forward did (not after it failed here)."""
    if backend == "sdpa" and (q.device.type, q.dtype) not in _FUSED_FAILED:
        return _fused_backward(do, q, k, v, o, lse, scale, causal)
    return _plain_backward(do, q, k, v, o, lse, scale, causal)


def merge_into(o_acc: torch.Tensor, lse_acc: torch.Tensor, rows: slice, o_b: torch.Tensor, lse_b: torch.Tensor):
    """Online-softmax merge of a block's (o, lse) into the accumulators' rows (in place).

    The rows already hold their first block (copied in by the caller).
    """
    lse_a = lse_acc[:, :, rows]
    new = torch.logaddexp(lse_a, lse_b)
    w_a = torch.exp(lse_a - new).transpose(1, 2)[..., None]
    w_b = torch.exp(lse_b - new).transpose(1, 2)[..., None]
    o_view = o_acc[:, rows]
    o_view.copy_(o_view * w_a + o_b * w_b)
    lse_acc[:, :, rows] = new
