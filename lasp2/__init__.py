"""lasp2: sequence parallelism for linear attention (LASP-2) and hybrid models (LASP-2H).

    import lasp2
    o = lasp2.linear_attention(q, k, v, g=g, group=cp_group)   # [B, T_local, H, D]

    ctx = lasp2.build_sp_context(cp_group, "balanced", cu_seqlens, seqlen=T)  # once per batch
    o = lasp2.linear_attention(q, k, v, g=g, sp_context=ctx)
"""

from lasp2._extension import Lasp2Error, has_cuda_kernels
from lasp2.distributed import SPContext, build_sp_context, gather_sequence, global_token_index, split_sequence
from lasp2.ops.gated_delta_rule import gated_delta_rule, kda
from lasp2.ops.linear_attention import linear_attention
from lasp2.ops.softmax_attention import softmax_attention
from lasp2.ops._group_consistency import settle_consistency_checks
from lasp2 import nn, options

__version__ = "0.1.0"

__all__ = [
    "Lasp2Error",
    "SPContext",
    "build_sp_context",
    "gather_sequence",
    "gated_delta_rule",
    "global_token_index",
    "has_cuda_kernels",
    "kda",
    "linear_attention",
    "nn",
    "options",
    "settle_consistency_checks",
    "softmax_attention",
    "split_sequence",
]
