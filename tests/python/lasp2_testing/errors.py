"""The one scaffold for bad-input tests: each op's error file is a table of `BadCall`
rows, run by `expect_bad_call`.

A row names the case, the error it must raise (ValueError unless told), a regular
expression the message must match (every message names the argument at fault), the
inputs to start from (overrides of the test file's `qkv` factory) and how to spoil
the call:

    BadCall("scale type", "`scale` must be a Python float", lambda q, k, v: call(q, k, v, scale="0.5"))

`ATTENTION_CASES` holds the rows every attention op taking (q, k, v, layout, scale,
split, group, cu_seqlens) shares; each op's file adds its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Tuple

import pytest
import torch


def call(*args, **kwargs) -> Tuple[tuple, dict]:
    """The arguments of one call, as a row's `spoil` returns them."""
    return args, kwargs


@dataclass(frozen=True)
class BadCall:
    name: str
    match: str
    spoil: Callable[..., Tuple[tuple, dict]]  # (q, k, v) -> call(...) of the bad call
    inputs: Dict[str, int] = field(default_factory=dict)  # overrides for the qkv factory
    error: type = ValueError

    def __str__(self) -> str:  # the pytest id
        return self.name.replace(" ", "-")


def expect_bad_call(op, case: BadCall, qkv) -> None:
    """Builds inputs with qkv(**case.inputs), spoils the call and checks `op` raises."""
    args, kwargs = case.spoil(*qkv(**case.inputs))
    with pytest.raises(case.error, match=case.match):
        op(*args, **kwargs)


def _bad_cu(what, cu, match):
    return BadCall(f"cu_seqlens {what}", match, lambda q, k, v: call(q, k, v, cu_seqlens=cu))


ATTENTION_CASES = [
    BadCall("not a tensor", "`k` must be a torch.Tensor", lambda q, k, v: call(q, k.tolist(), v)),
    BadCall("wrong rank", "`q` must have 4 dimensions", lambda q, k, v: call(q[0], k, v)),
    BadCall("dtype mismatch", "`v` has dtype torch.float64", lambda q, k, v: call(q, k, v.double())),
    BadCall("integer dtype", "`q` has dtype torch.int64", lambda q, k, v: call(q.long(), k.long(), v.long())),
    BadCall("meta device", "`q` is on meta", lambda q, k, v: call(q.to("meta"), k.to("meta"), v.to("meta"))),
    BadCall("head dim limit", "`q` head dim 300", lambda q, k, v: call(q, k, v), inputs={"D": 300}),
    BadCall("layout name", "`layout` must be one of", lambda q, k, v: call(q, k, v, layout="bhtd")),
    BadCall("scale type", "`scale` must be a Python float", lambda q, k, v: call(q, k, v, scale="0.5")),
    BadCall("scale nan", "`scale` must be finite", lambda q, k, v: call(q, k, v, scale=float("nan"))),
    BadCall("scale inf", "`scale` must be finite", lambda q, k, v: call(q, k, v, scale=float("inf"))),
    BadCall("scale -inf", "`scale` must be finite", lambda q, k, v: call(q, k, v, scale=float("-inf"))),
    # a bool is an int to Python, a 0-d tensor a number to float(): neither is a scale
    BadCall("scale bool", "`scale` must be a Python float or None, got bool",
            lambda q, k, v: call(q, k, v, scale=True)),
    BadCall("scale tensor", "`scale` must be a Python float or None, got Tensor",
            lambda q, k, v: call(q, k, v, scale=torch.tensor(0.5))),
    BadCall("bool dtype", "`q` has dtype torch.bool", lambda q, k, v: call(q > 0, k > 0, v > 0)),
    BadCall("complex dtype", "`q` has dtype torch.complex64",
            lambda q, k, v: call(q.to(torch.complex64), k.to(torch.complex64), v.to(torch.complex64))),
    BadCall("split name", "`split` must be one of", lambda q, k, v: call(q, k, v, split="zigzag")),
    BadCall("group type", "`group` must be a torch.distributed ProcessGroup",
            lambda q, k, v: call(q, k, v, group="world")),
    BadCall("empty sequence", "empty sequence", lambda q, k, v: call(q, k, v), inputs={"T": 0}),
    # an empty batch or no heads: refused up front (their backward had nothing valid to run on)
    BadCall("empty batch", "`q` has an empty batch dimension", lambda q, k, v: call(q, k, v), inputs={"B": 0}),
    BadCall("no heads", "has 0 heads", lambda q, k, v: call(q, k, v), inputs={"H": 0}),
    _bad_cu("decreasing", torch.tensor([0, 5, 3, 8]), "non-decreasing"),
    _bad_cu("short", torch.tensor([0, 4, 7]), "must end at the global sequence length 8"),
    _bad_cu("not from 0", torch.tensor([1, 4, 8]), "must start at 0"),
    _bad_cu("float", torch.tensor([0.0, 8.0]), "int32 or int64"),
    _bad_cu("2-D", torch.tensor([[0, 8]]), "1-D"),
    _bad_cu("a list", [0, 8], "`cu_seqlens` must be a torch.Tensor"),
    _bad_cu("on meta", torch.tensor([0, 4, 8], device="meta"), "`cu_seqlens` is on meta"),
    _bad_cu("negative", torch.tensor([0, -1, 8]), "non-decreasing"),
    _bad_cu("past the end", torch.tensor([0, 4, 9]), "must end at the global sequence length 8"),
    _bad_cu("0-d", torch.tensor(8), "1-D with at least 2 entries"),
    _bad_cu("empty", torch.tensor([], dtype=torch.int64), "1-D with at least 2 entries"),
    _bad_cu("one entry", torch.tensor([0]), "1-D with at least 2 entries"),
    _bad_cu("bool", torch.tensor([False, True]), "int32 or int64"),
    _bad_cu("uint8", torch.tensor([0, 4, 8], dtype=torch.uint8), "int32 or int64"),
    _bad_cu("a tuple", (0, 4, 8), "`cu_seqlens` must be a torch.Tensor"),
    # a float tensor that requires grad is still not a length table
    _bad_cu("float requiring grad", torch.tensor([0.0, 8.0], requires_grad=True), "int32 or int64"),
    BadCall("cu_seqlens needs batch one", "batch size 1",
            lambda q, k, v: call(q, k, v, cu_seqlens=torch.tensor([0, 8])), inputs={"B": 2}),
    BadCall("cu_seqlens needs batch one (tbhd)", "batch size 1",
            lambda q, k, v: call(*(x.transpose(0, 1) for x in (q, k, v)), cu_seqlens=torch.tensor([0, 8]),
                                 layout="tbhd"), inputs={"B": 2}),
]
