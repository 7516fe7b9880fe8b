"""Modules built on the lasp2 ops."""

from lasp2.nn.linear_attention import LinearAttention
from lasp2.nn.norms import HeadRMSNorm

__all__ = ["HeadRMSNorm", "LinearAttention"]
