"""What a torch.compile graph over a group cannot hold, and the way such a call runs.

A compiled call over a group runs its op's cross-rank check inside the custom op, and
the op reaches the group's communication through an int handle that the graph holds as
a constant, looked up by the group's name (_delta_library.group_handle,
_softmax_library.collectives_handle). What an SPContext brings of its own (a
`communicator=` such as the benchmarks' timed one, `collectives=` that count or stub
the calls) has no name to look up, and a handle registered while tracing would be
unknown when the graph runs. Such a call, and one through a provider whose op does not
check the ranks itself, breaks the graph (torch._dynamo's Unsupported error with the
reason under fullgraph=True) and runs eagerly, check and all, outside the graph.
"""

from __future__ import annotations

from typing import Optional

import torch

from lasp2.distributed.collectives import TORCH_COLLECTIVES


def own_communication(ctx, communicator: bool = True) -> Optional[str]:
    """What of the SPContext a compiled graph cannot name (None: nothing).
    communicator=False: the op does not use the C++ communicator (softmax attention)."""
    if communicator and ctx.communicator is not None:
        return "an SPContext built with its own `communicator=`"
    if ctx.collectives is not TORCH_COLLECTIVES:
        return "an SPContext built with its own `collectives=`"
    return None


def outside_graph(owner: str, why: str, fn, *args, **kwargs):
    """Breaks the graph with `why` and runs fn(*args, **kwargs) eagerly (not compiling,
    so the eager entry point's Python check runs)."""
    torch._dynamo.graph_break(f"{owner}: {why} runs outside the compiled graph (fullgraph torch.compile over a "
                              "group takes the group's own communication and in-op cross-rank checks only)")
    return torch.compiler.disable(fn)(*args, **kwargs)
