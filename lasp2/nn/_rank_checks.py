"""A module's own argument checks over an SP group: a rank whose checks fail still takes
part in the collective its peers enter next, so they raise too instead of waiting.

The ops do this for their arguments (lasp2/ops/_group_consistency.py,
report_local_failure). A module checks `x` and `cu_seqlens` before its first op, so a
rank that fails there never reached the op's check: its peers waited in that check's
all-gather until the group's timeout, or (a rank that went on with its next call) took
that call's row as this one's and raised a wrong error. The failure row sent here is
the one the op's check (or a module's own, as GatedDeltaNet's) reads as "rank(s) ...
rejected their arguments" on every other rank. The modules run their checks inside
lasp2.ops._group_consistency.raised_on_every_rank; this file holds what they check.
"""

from __future__ import annotations

from lasp2.distributed.context import SPContext


def module_group(default_group, sp_context):
    """The group a module's forward communicates over: its context's, else its own."""
    return sp_context.group if isinstance(sp_context, SPContext) else default_group


def check_sp_context(owner: str, sp_context):
    """None or an SPContext (inside a module's reported checks: the op's own check of it
    would run with no group to tell, the module's group being replaced by the context's)."""
    if sp_context is not None and not isinstance(sp_context, SPContext):
        raise ValueError(f"{owner}: `sp_context` must be an SPContext from lasp2.build_sp_context, "
                         f"got {type(sp_context).__name__}")

