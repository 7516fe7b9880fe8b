"""Rotary embeddings under context parallelism, for the layouts Megatron does not slice.

Megatron's RoPE slicing (rope_utils.get_pos_emb_on_this_cp_rank) assumes the zig-zag
layout = lasp2's split="balanced": with the balanced split and unpacked batches
nothing needs changing. Two cases do:

  * split="contiguous": rank r holds positions [r T/P, (r+1) T/P);
  * packed (THD) batches with CP > 1: Megatron's THD RoPE assumes TE's per-document
    zig-zag partition, lasp2 cuts the whole packed sequence (global cu_seqlens).

`use_lasp2_rope(split)` replaces the two megatron-core functions (three names) that
slice RoPE per CP rank with versions that take each local token's position from
lasp2's SP context (lasp2.distributed.context: the global index and, packed, the position
within the token's document). It is
opt-in, process-wide, idempotent, device-agnostic (no pin_memory / .cuda()), and with
CP = 1 computes exactly what Megatron computes. `restore_megatron_rope()` undoes it.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_patches._compat import check_megatron_core_version

check_megatron_core_version()

from megatron.core.models.common.embeddings import rope_utils, rotary_pos_embedding  # noqa: E402

from lasp2.distributed.context import layout_context  # noqa: E402
from megatron_patches.options import SPLITS, Lasp2ConfigError  # noqa: E402

__all__ = ["lasp2_rope_positions", "restore_megatron_rope", "use_lasp2_rope"]

_ORIGINAL = {
    "rope_utils.get_pos_emb_on_this_cp_rank": rope_utils.get_pos_emb_on_this_cp_rank,
    "rotary_pos_embedding.get_pos_emb_on_this_cp_rank": rotary_pos_embedding.get_pos_emb_on_this_cp_rank,
    "rope_utils._apply_rotary_pos_emb_thd": rope_utils._apply_rotary_pos_emb_thd,
}
_active_split: Optional[str] = None


def lasp2_rope_positions(local_len: int, cp_rank: int, cp_size: int, split: str,
                         cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 positions of this rank's tokens: global positions under `split`, or with
    cu_seqlens (global, packed) the position within each token's document."""
    return layout_context(cp_rank, cp_size, split, local_len * cp_size, cu_seqlens).positions


def _make_get_pos_emb(split: str):
    def get_pos_emb_on_this_cp_rank(pos_emb, seq_dim, cp_group):
        """lasp2 version: the rows of pos_emb at this rank's global positions."""
        if cp_group is None:
            raise ValueError("cp_group must be provided to get positional embedding per CP rank")
        size, rank = cp_group.size(), cp_group.rank()
        total = pos_emb.shape[seq_dim]
        parts = size * (2 if split == "balanced" else 1)
        if total % parts:
            raise Lasp2ConfigError(f"RoPE length {total} is not divisible into {parts} parts ({split!r} split)")
        index = layout_context(rank, size, split, total, device=pos_emb.device).global_index
        return pos_emb.index_select(seq_dim, index)

    get_pos_emb_on_this_cp_rank.lasp2_split = split
    return get_pos_emb_on_this_cp_rank


def _make_apply_thd(split: str):
    def _apply_rotary_pos_emb_thd(t, cu_seqlens, freqs, rotary_interleaved=False,
                                  multi_latent_attention=False, mscale=1.0, cp_group=None):
        """lasp2 version: t [t_local, h, d] is this rank's share of the whole packed
        sequence (global cu_seqlens); each token is rotated by its position in its
        document (by its global position if freqs covers the whole packed sequence)."""
        size = cp_group.size() if cp_group is not None else 1
        rank = cp_group.rank() if cp_group is not None else 0
        exact = freqs.dim() >= 1 and freqs.size(0) == int(cu_seqlens[-1])
        pos = lasp2_rope_positions(t.shape[0], rank, size, split, None if exact else cu_seqlens)
        return rope_utils._apply_rotary_pos_emb_bshd(
            t.unsqueeze(1), freqs[pos.to(freqs.device)], rotary_interleaved=rotary_interleaved,
            multi_latent_attention=multi_latent_attention, mscale=mscale).squeeze(1)

    _apply_rotary_pos_emb_thd.lasp2_split = split
    return _apply_rotary_pos_emb_thd


def use_lasp2_rope(split: str) -> None:
    """Slices RoPE the lasp2 way for `split` (see the module docstring).

    Not needed for split="balanced" without packed sequences (Megatron's own slicing is
    the same layout). With packed batches under CP keep config.apply_rope_fusion off:
    TE's fused THD RoPE does its own per-document slicing and bypasses this patch.
    """
    global _active_split
    if split not in SPLITS:
        raise Lasp2ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    get_pos = _make_get_pos_emb(split)
    rope_utils.get_pos_emb_on_this_cp_rank = get_pos
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = get_pos
    rope_utils._apply_rotary_pos_emb_thd = _make_apply_thd(split)
    _active_split = split


def restore_megatron_rope() -> None:
    """Puts Megatron's own RoPE slicing back."""
    global _active_split
    rope_utils.get_pos_emb_on_this_cp_rank = _ORIGINAL["rope_utils.get_pos_emb_on_this_cp_rank"]
    rotary_pos_embedding.get_pos_emb_on_this_cp_rank = _ORIGINAL["rotary_pos_embedding.get_pos_emb_on_this_cp_rank"]
    rope_utils._apply_rotary_pos_emb_thd = _ORIGINAL["rope_utils._apply_rotary_pos_emb_thd"]
    _active_split = None


def _set_megatron_default_get_pos_emb(fn) -> None:
    """Replaces what counts as Megatron's own CP slicing (megatron_patches.cpu installs a
    device-agnostic copy of it); installed now unless use_lasp2_rope is active."""
    _ORIGINAL["rope_utils.get_pos_emb_on_this_cp_rank"] = fn
    _ORIGINAL["rotary_pos_embedding.get_pos_emb_on_this_cp_rank"] = fn
    if _active_split is None:
        rope_utils.get_pos_emb_on_this_cp_rank = fn
        rotary_pos_embedding.get_pos_emb_on_this_cp_rank = fn


def active_rope_split() -> Optional[str]:
    """The split use_lasp2_rope installed, None for Megatron's own slicing."""
    return _active_split
