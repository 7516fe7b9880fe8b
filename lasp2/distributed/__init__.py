"""Process-group plumbing: the per-batch SP context, communicators for SP groups,
the collectives of the Python-side algorithms, and sequence split helpers."""

from lasp2.distributed.collectives import TORCH_COLLECTIVES, Collectives
from lasp2.distributed.communicator import get_communicator, group_rank_and_size
from lasp2.distributed.context import SPContext, build_sp_context
from lasp2.distributed.sequence_split import (
    SPLITS,
    gather_sequence,
    global_token_index,
    split_sequence,
)

__all__ = [
    "Collectives",
    "SPContext",
    "SPLITS",
    "TORCH_COLLECTIVES",
    "build_sp_context",
    "gather_sequence",
    "get_communicator",
    "global_token_index",
    "group_rank_and_size",
    "split_sequence",
]
