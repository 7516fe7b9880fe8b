"""The ops: lasp2.ops.linear_attention (LASP-2 and its providers) and
lasp2.ops.softmax_attention (LASP-2H), one module per op, each holding the public
function of its name (imported as lasp2.linear_attention / lasp2.softmax_attention)."""
