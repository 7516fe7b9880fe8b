"""Bad input to lasp2.softmax_attention raises ValueError naming the argument."""

import pytest
import torch

import lasp2
from lasp2_testing.errors import ATTENTION_CASES, BadCall, call, expect_bad_call


def qkv(B=1, T=8, H=4, Hkv=2, D=4, dtype=torch.float32):
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype), \
        torch.randn(B, T, Hkv, D, dtype=dtype)


CASES = ATTENTION_CASES + [
    BadCall("sequence length mismatch", "`k` must match `q` in batch and sequence dims",
            lambda q, k, v: call(q, k[:, :4], v)),
    BadCall("batch mismatch", "`k` must match `q` in batch and sequence dims",
            lambda q, k, v: call(q, k[:1], v), inputs={"B": 2}),
    BadCall("head dim mismatch", "`k` must have the head dim of `q`", lambda q, k, v: call(q, k[..., :2], v)),
    BadCall("value shape", "`v` must match `k` in its first three dims", lambda q, k, v: call(q, k, v[:, :, :1])),
    BadCall("gqa heads must divide", r"`k` has 3 heads, which must divide the 4 heads of `q` \(GQA\)",
            lambda q, k, v: call(q, k, v), inputs={"H": 4, "Hkv": 3}),
    BadCall("k alone on meta", "`k` is on meta", lambda q, k, v: call(q, k.to("meta"), v)),
    BadCall("causal flag", "`causal` must be a bool", lambda q, k, v: call(q, k, v, causal="yes")),
    BadCall("backend name", "`backend` must be one of", lambda q, k, v: call(q, k, v, backend="flash")),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_raises_naming_the_argument(case):
    expect_bad_call(lasp2.softmax_attention, case, qkv)
