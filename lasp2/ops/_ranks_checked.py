"""The proof that a call's cross-rank check already ran: what lets a short convolution or
a delta-rule op skip its own check (one all-gather a call).

A bare `ranks_checked=True` used to be taken on trust. A rank passing it while its peers
did not skipped the check's all-gather and went straight to the schedule's collectives
while they waited in the check: gloo aborted the process on the size mismatch, or, where
the sizes met, a check row was read as state summaries. Only a successful check can make
a RanksChecked (lasp2.nn.short_conv.check_conv_ranks, which every rank runs at the same
point, or raises on every rank), so a call given one skips its check on every rank
together; anything else (True included) checks, on every rank together too.
"""

from __future__ import annotations

from typing import Optional

import torch


class RanksChecked:
    """One successful cross-rank check over `group`. cu_seqlens: the documents it checked,
    on the host (None: none); op: the delta-rule op whose own check it covered too
    ("lasp2.gated_delta_rule" / "lasp2.kda"; None: the convolution's alone); backward: the
    call builds a backward (the check's field, so the same on every rank)."""

    __slots__ = ("group", "cu_seqlens", "op", "backward")

    def __init__(self, group, cu_seqlens: Optional[torch.Tensor], op: Optional[str] = None, backward: bool = True):
        self.group, self.cu_seqlens, self.op = group, cu_seqlens, op
        # the checked field "building a backward", equal on every rank: where it is set, every
        # rank's convolutions record their halo's backward (short_conv.causal_conv_sp)
        self.backward = backward

    def __repr__(self):
        return f"RanksChecked(op={self.op!r})"


def check_ranks_checked(owner: str, ranks_checked):
    """A bool or a RanksChecked (the old flag stays accepted: True checks as False does)."""
    if not isinstance(ranks_checked, (bool, RanksChecked)):
        raise ValueError(f"{owner}: `ranks_checked` must be a RanksChecked from the module's check "
                         f"(or a bool, which runs the check), got {type(ranks_checked).__name__}")


def covers(ranks_checked, group, op: Optional[str] = None) -> bool:
    """Does ranks_checked prove a check of this call over `group` (and of the op `op`)?"""
    return (isinstance(ranks_checked, RanksChecked) and group is not None and ranks_checked.group is group
            and (op is None or ranks_checked.op == op))
