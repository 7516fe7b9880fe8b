"""The torch.distributed collectives lasp2's Python-side algorithms call.

Single-tensor collectives go under the name this torch has: torch >= 2.13 renames
all_gather_into_tensor / reduce_scatter_tensor (and deprecates the old names).

`Collectives` bundles the calls LASP-2H (all-gather, reduce-scatter) and Ulysses
(all-to-all) make, so a caller can count, time or stub them through an SP context
(``build_sp_context(..., collectives=...)``) instead of replacing library globals.
"""

from dataclasses import dataclass
from typing import Callable

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass(frozen=True)
class Collectives:
    """Each field has the signature of the torch.distributed function it stands for
    (output tensor first, then input, then ``group=`` / ``async_op=`` / ``op=``)."""

    all_gather_single: Callable = all_gather_single
    reduce_scatter_single: Callable = reduce_scatter_single
    all_to_all_single: Callable = dist.all_to_all_single


TORCH_COLLECTIVES = Collectives()
