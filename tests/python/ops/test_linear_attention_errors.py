"""Bad input to lasp2.linear_attention raises ValueError naming the argument."""

import pytest
import torch

import lasp2
from lasp2_testing.errors import ATTENTION_CASES, BadCall, call, expect_bad_call


def qkv(B=1, T=8, H=2, D=4, dtype=torch.float32):
    return tuple(torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))


def tbhd(x):
    return x.transpose(0, 1)


CASES = ATTENTION_CASES + [
    BadCall("k shape", "`k` must have the shape of `q`", lambda q, k, v: call(q, k[:, :4], v)),
    BadCall("v shape", "`v` must match `q`", lambda q, k, v: call(q, k, v[:, :, :1])),
    BadCall("g and decay together", "either `g`",
            lambda q, k, v: call(q, k, v, g=torch.zeros(1, 8, 2), decay=torch.zeros(2))),
    BadCall("g shape", "`g` must have shape", lambda q, k, v: call(q, k, v, g=torch.zeros(1, 8, 3))),
    BadCall("g shape follows layout", r"`g` must have shape \[8, 1, 2\]",
            lambda q, k, v: call(tbhd(q), tbhd(k), tbhd(v), g=torch.zeros(1, 8, 2), layout="tbhd")),
    BadCall("decay shape", "`decay` must have shape", lambda q, k, v: call(q, k, v, decay=torch.zeros(3))),
    BadCall("g with a trailing unit dim", "`g` must have 3 dimensions",
            lambda q, k, v: call(q, k, v, g=torch.zeros(1, 8, 2, 1))),
    BadCall("decay integer", "`decay` has dtype torch.int64",
            lambda q, k, v: call(q, k, v, decay=torch.zeros(2, dtype=torch.long))),
    # NaN passed the `> 0` test and turned every later output row NaN (CPU tensors)
    BadCall("g nan", "`g` contains NaN",
            lambda q, k, v: call(q, k, v, g=torch.tensor([-0.1, float("nan")]).repeat(8).view(1, 8, 2))),
    BadCall("decay nan", "`decay` contains NaN", lambda q, k, v: call(q, k, v, decay=torch.tensor([-0.1, float("nan")]))),
    BadCall("initial_state rows vs documents", r"`initial_state` must have shape \[3, 2, 4, 4\]",
            lambda q, k, v: call(q, k, v, initial_state=torch.zeros(2, 2, 4, 4), cu_seqlens=torch.tensor([0, 2, 4, 8]))),
    BadCall("decay 0-d", "`decay` must have 1 dimensions", lambda q, k, v: call(q, k, v, decay=torch.tensor(-0.1))),
    BadCall("decay on meta", "`decay` is on meta but `q` is on cpu",
            lambda q, k, v: call(q, k, v, decay=torch.zeros(2, device="meta"))),
    BadCall("g bool", "`g` has dtype torch.bool",
            lambda q, k, v: call(q, k, v, g=torch.zeros(1, 8, 2, dtype=torch.bool))),
    BadCall("initial_state on meta", "`initial_state` is on meta but `q` is on cpu",
            lambda q, k, v: call(q, k, v, initial_state=torch.zeros(1, 2, 4, 4, device="meta"))),
    BadCall("initial_state integer", "`initial_state` must be float32, float64 or the dtype of `q`",
            lambda q, k, v: call(q, k, v, initial_state=torch.zeros(1, 2, 4, 4, dtype=torch.long))),
    BadCall("output_final_state int", "`output_final_state` must be a bool",
            lambda q, k, v: call(q, k, v, output_final_state=1)),
    # a CPU-kernel detail, not an argument of the op
    BadCall("chunk size", "chunk_size", lambda q, k, v: call(q, k, v, chunk_size=4), error=TypeError),
]


@pytest.mark.parametrize("case", CASES, ids=str)
def test_bad_input_raises_naming_the_argument(case):
    expect_bad_call(lasp2.linear_attention, case, qkv)
