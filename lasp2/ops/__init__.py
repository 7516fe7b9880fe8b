from lasp2.ops.linear_attention import linear_attention

__all__ = ["linear_attention"]
