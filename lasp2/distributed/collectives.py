"""Single-tensor collectives under the name this torch has: torch >= 2.13 renames
all_gather_into_tensor / reduce_scatter_tensor (and deprecates the old names)."""

import torch.distributed as dist

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
