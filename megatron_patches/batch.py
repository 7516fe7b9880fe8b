"""This CP rank's share of a batch, split the lasp2 way.

split="balanced" is exactly Megatron's get_batch_on_this_cp_rank (2P chunks, rank r
holds chunks r and 2P-1-r), so Megatron's own batch code and RoPE slicing need no
change; "contiguous" gives rank r tokens [r T/P, (r+1) T/P) and needs
megatron_patches.rope.use_lasp2_rope("contiguous") when the model uses RoPE.

Packed sequences (THD, batch 1): lasp2 cuts the *whole* packed sequence with the same
split and keeps the global cu_seqlens; documents may span ranks.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from lasp2.distributed.sequence_split import split_sequence
from megatron_patches.options import SPLITS, Lasp2ConfigError

__all__ = ["get_batch_on_this_sp_rank", "get_packed_batch_on_this_sp_rank", "restore_megatron_batches",
           "sp_rank_and_size", "use_lasp2_batches"]

# per key: the sequence dim (Megatron's batch dict convention)
_SEQ_DIM = {"attention_mask": 2}


def sp_rank_and_size(cp_group=None):
    """(rank, size) in cp_group, else in Megatron's context-parallel group, else (0, 1)."""
    if cp_group is not None:
        return cp_group.rank(), cp_group.size()
    try:
        from megatron.core import parallel_state
    except ImportError:  # pragma: no cover
        return 0, 1
    if not parallel_state.model_parallel_is_initialized():
        return 0, 1
    return parallel_state.get_context_parallel_rank(), parallel_state.get_context_parallel_world_size()


def get_batch_on_this_sp_rank(batch: Dict[str, Optional[torch.Tensor]], split: str = "balanced",
                              cp_group=None) -> Dict[str, Optional[torch.Tensor]]:
    """Slices tokens / labels / loss_mask / position_ids ([b, s]) and attention_mask
    ([b, 1, s, s], along its query dim, as Megatron does) for this CP rank.

    Returns a new dict; None values and non-tensors pass through. The group is
    Megatron's CP group unless cp_group is given.
    """
    if split not in SPLITS:
        raise Lasp2ConfigError(f"split must be one of {SPLITS}, got {split!r}")
    rank, size = sp_rank_and_size(cp_group)
    out = dict(batch)
    if size == 1:
        return out
    for key, value in batch.items():
        if not isinstance(value, torch.Tensor):
            continue
        dim = _SEQ_DIM.get(key, 1)
        if value.dim() <= dim:
            raise Lasp2ConfigError(f"batch[{key!r}] has shape {list(value.shape)}; expected a sequence "
                                   f"dim {dim} (tokens [b, s], attention_mask [b, 1, s, s])")
        if value.shape[dim] % (size * (2 if split == "balanced" else 1)):
            raise Lasp2ConfigError(
                f"batch[{key!r}]: sequence length {value.shape[dim]} must be divisible by "
                f"{'2 x ' if split == 'balanced' else ''}context-parallel size {size} for the {split!r} split")
        out[key] = split_sequence(value, split=split, dim=dim, rank=rank, world_size=size)
    return out


def get_packed_batch_on_this_sp_rank(batch: Dict[str, Optional[torch.Tensor]], cu_seqlens: torch.Tensor,
                                     split: str = "balanced", cp_group=None, max_seqlen: Optional[int] = None):
    """Packed (THD) batch of size 1: this rank's tokens and the PackedSeqParams for lasp2.

    batch holds [1, T] tensors of the whole packed sequence; cu_seqlens [n_docs + 1]
    are its global document boundaries (int32, 0 .. T). Returns (batch, packed_seq_params)
    where packed_seq_params carries the global cu_seqlens and is marked with the split
    (`lasp2_split`), which lasp2's core attentions check under context parallelism.
    position_ids, if present, are sliced like tokens (for learned position embeddings
    pass positions within documents; RoPE positions come from
    megatron_patches.rope.use_lasp2_rope).
    """
    from megatron.core.packed_seq_params import PackedSeqParams

    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise Lasp2ConfigError("cu_seqlens must be a 1-D tensor [n_docs + 1]")
    for key, value in batch.items():
        if isinstance(value, torch.Tensor) and key != "attention_mask" and value.shape[0] != 1:
            raise Lasp2ConfigError(f"packed batches have batch size 1, batch[{key!r}] has {list(value.shape)}")
    total = int(cu_seqlens[-1])
    tokens = batch.get("tokens")
    if tokens is not None and tokens.shape[1] != total:
        raise Lasp2ConfigError(f"cu_seqlens ends at {total} but tokens have length {tokens.shape[1]}")
    local = get_batch_on_this_sp_rank({k: v for k, v in batch.items() if k != "attention_mask"},
                                      split=split, cp_group=cp_group)
    cu = cu_seqlens.to(torch.int32)
    if max_seqlen is None:
        max_seqlen = int((cu[1:] - cu[:-1]).max())
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             max_seqlen_q=max_seqlen, max_seqlen_kv=max_seqlen)
    params.lasp2_split = split
    return local, params


# Where Megatron-LM's pretrain scripts take get_batch_on_this_cp_rank from (megatron.core.utils;
# megatron.training.utils in releases before it moved to the core); filled by use_lasp2_batches.
_BATCH_MODULES = ("megatron.core.utils", "megatron.training.utils")
_ORIGINAL_BATCH_FNS: Dict[str, object] = {}


def use_lasp2_batches(split: str) -> None:
    """Makes Megatron's get_batch_on_this_cp_rank slice batches with `split` (a script that imports
    it afterwards gets this one), for Megatron-LM's own pretrain_gpt.py under `--sp-split
    contiguous`: its get_batch cuts the zig-zag layout, which lasp2's layers and RoPE slicing for
    the contiguous split would read as contiguous tokens, training wrong numbers without an
    error. Packed (THD) batches are not cut by it: lasp2's layers refuse packed batches not
    marked by get_packed_batch_on_this_sp_rank."""
    import importlib

    if split not in SPLITS:
        raise Lasp2ConfigError(f"split must be one of {SPLITS}, got {split!r}")

    def get_batch_on_this_cp_rank(batch, cp_group=None):
        return get_batch_on_this_sp_rank(batch, split=split, cp_group=cp_group)

    for name in _BATCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:  # megatron.training is not in the megatron-core wheel
            continue
        if hasattr(module, "get_batch_on_this_cp_rank"):
            _ORIGINAL_BATCH_FNS.setdefault(name, module.get_batch_on_this_cp_rank)
            module.get_batch_on_this_cp_rank = get_batch_on_this_cp_rank


def restore_megatron_batches() -> None:
    """Puts Megatron's own get_batch_on_this_cp_rank back where use_lasp2_batches replaced it."""
    import importlib

    for name, fn in _ORIGINAL_BATCH_FNS.items():
        importlib.import_module(name).get_batch_on_this_cp_rank = fn
    _ORIGINAL_BATCH_FNS.clear()
