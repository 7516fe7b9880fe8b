"""Modules built on the lasp2 ops."""

from lasp2.nn.gated_deltanet import GatedDeltaNet
from lasp2.nn.hybrid import HybridBlock, HybridStack
from lasp2.nn.linear_attention import LinearAttention
from lasp2.nn.norms import RMSNorm
from lasp2.nn.short_conv import ShortConvolution
from lasp2.nn.softmax_attention import SoftmaxAttention

__all__ = ["GatedDeltaNet", "HybridBlock", "HybridStack", "LinearAttention", "RMSNorm", "ShortConvolution",
           "SoftmaxAttention"]
