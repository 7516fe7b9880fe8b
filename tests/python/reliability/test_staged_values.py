"""The device values of the default per-call check (csrc/core/consistency_values.h, staged
by csrc/torch/group_check.cpp with one fused kernel on CUDA and a loop on the CPU): the
digest of `decay` equals its definition written independently here with torch ops (the
former kernels' definition), differs for a one-bit change, and the max slots hold the
float64 bits of torch.amax. Over a one-rank gloo group: GroupCheck.stage, then the entry
read back from the table of the exchange that sends it."""

import struct

import pytest
import torch
import torch.distributed as dist

from rel_helpers import assert_all_ok, run_world

ROW, LAGGED, DEPTH = 32, 4, 2


def digest_reference(t: torch.Tensor) -> int:
    """sum over i of (b ^ (b >> 29)) * ((i * 2654435761 + 40503) | 1), b the float64 bits of
    element i, in wrap-around int64 arithmetic (torch's int64 ops wrap)."""
    bits = t.detach().reshape(-1).to(torch.float64).view(torch.int64)
    weights = (torch.arange(bits.numel(), dtype=torch.int64) * 2654435761 + 40503) | 1
    return int(((bits ^ (bits >> 29)) * weights).sum())


def max_reference(t: torch.Tensor) -> int:
    return struct.unpack("<q", struct.pack("<d", float(t.to(torch.float64).amax())))[0]


def _staged(gc, values, kinds):
    """Stages `values` and sends them: the entry's LAGGED slots as the table shows them."""
    seq = gc.stage(values, kinds)
    assert gc.exchange([7, 0, 1], [seq], []) == -1
    return gc.table()[0, ROW - LAGGED:].tolist()


def _cases(rank, world, device):
    from lasp2._extension import _C

    gc = _C.GroupCheck(dist.group.WORLD, torch.device(device), ROW, LAGGED, DEPTH)
    gen = torch.Generator().manual_seed(3)
    decay = torch.rand(37, generator=gen, dtype=torch.float64).log()
    flipped = decay.clone()
    flipped.view(torch.int64)[20] ^= 1  # one bit of one element (the last bit of its mantissa)
    gate = torch.nn.functional.logsigmoid(torch.randn(2, 3000, 4, generator=gen))  # several thread blocks on CUDA
    out = {}
    for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
        d = decay.to(dtype)
        got = _staged(gc, [d.to(device)], [0])
        out[f"digest_{dtype}"] = (got[0], digest_reference(d), got[1:])
    out["flip"] = (_staged(gc, [decay.to(device)], [0])[0], _staged(gc, [flipped.to(device)], [0])[0])
    out["strided"] = (_staged(gc, [decay[::2].to(device)], [0])[0], digest_reference(decay[::2]))
    positive = gate.clone()
    positive[1, 2999, 3] = 0.5  # the last element
    with_nan = gate.clone()
    with_nan[0, 5, 1] = float("nan")
    flag = torch.tensor(True)
    got = _staged(gc, [gate.to(device), positive.to(device), with_nan.to(device), flag.to(device)], [1, 1, 1, 1])
    out["max"] = (got, [max_reference(gate), max_reference(positive), max_reference(with_nan),
                        max_reference(flag.double())])
    out["absent"] = _staged(gc, [None, torch.empty(0, device=device), decay.to(device)], [0, 1, 0])
    out["absent_want"] = [0, 0, digest_reference(decay), 0]
    # exchange_then_stage: the row agrees, then this call's values are staged for a later exchange
    col, seq = gc.exchange_then_stage([7, 0, 1], [], [], [decay.to(device)], [0])
    out["then_stage"] = (col, _sent(gc, seq), digest_reference(decay))
    return out


def _sent(gc, seq):
    assert gc.exchange([7, 0, 1], [seq], []) == -1
    return int(gc.table()[0, ROW - LAGGED])


def _check(out):
    for dtype in ("float64", "float32", "bfloat16", "float16"):
        got, want, rest = out[f"digest_torch.{dtype}"]
        assert got == want and rest == [0, 0, 0], (dtype, got, want, rest)
    a, b = out["flip"]
    assert a != b
    assert out["strided"][0] == out["strided"][1]
    got, want = out["max"]
    assert got[0] == want[0] and got[1] == want[1] and got[3] == want[3]
    nan = struct.unpack("<d", struct.pack("<q", got[2]))[0]
    assert nan != nan  # a NaN in the gate makes the max NaN, as torch.amax
    assert struct.unpack("<d", struct.pack("<q", got[1]))[0] == 0.5
    assert out["absent"] == out["absent_want"]
    col, sent, want = out["then_stage"]
    assert col == -1 and sent == want


def test_staged_values_cpu():
    (out,) = assert_all_ok(run_world(1, _cases, "cpu"))
    _check(out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the fused stage kernel)")
def test_staged_values_cuda():
    """The fused kernel computes the same bits as the CPU loop and the reference."""
    (out,) = assert_all_ok(run_world(1, _cases, "cuda:0", backend="nccl"))
    _check(out)
