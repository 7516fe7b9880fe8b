"""Process-group plumbing: communicators for SP groups and sequence split helpers."""

from lasp2.distributed.communicator import get_communicator, group_rank_and_size
from lasp2.distributed.sequence_split import (
    SPLITS,
    global_token_index,
    split_sequence,
    gather_sequence,
)

__all__ = [
    "SPLITS",
    "gather_sequence",
    "get_communicator",
    "global_token_index",
    "group_rank_and_size",
    "split_sequence",
]
