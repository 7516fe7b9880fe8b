"""Bad input to lasp2.linear_attention raises ValueError naming the argument."""

import pytest
import torch

import lasp2


def qkv(B=1, T=8, H=2, D=4, dtype=torch.float32):
    return tuple(torch.randn(B, T, H, D, dtype=dtype) for _ in range(3))


def expect_error(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        lasp2.linear_attention(*args, **kwargs)


def test_not_a_tensor():
    q, k, v = qkv()
    expect_error("`k` must be a torch.Tensor", q, k.tolist(), v)


def test_wrong_rank():
    q, k, v = qkv()
    expect_error("`q` must have 4 dimensions", q[0], k, v)


def test_shape_mismatch_k():
    q, k, v = qkv()
    expect_error("`k` must have the shape of `q`", q, k[:, :4], v)


def test_shape_mismatch_v():
    q, k, v = qkv()
    expect_error("`v` must match `q`", q, k, v[:, :, :1])


def test_dtype_mismatch():
    q, k, v = qkv()
    expect_error("`v` has dtype torch.float64", q, k, v.double())


def test_integer_dtype():
    q, k, v = qkv()
    expect_error("`q` has dtype torch.int64", q.long(), k.long(), v.long())


def test_head_dim_limit():
    q, k, v = qkv(D=300)
    expect_error("`q` head dim 300", q, k, v)


def test_layout_name():
    q, k, v = qkv()
    expect_error("`layout` must be one of", q, k, v, layout="bhtd")


def test_g_and_decay_together():
    q, k, v = qkv()
    expect_error("either `g`", q, k, v, g=torch.zeros(1, 8, 2), decay=torch.zeros(2))


def test_g_shape():
    q, k, v = qkv()
    expect_error("`g` must have shape", q, k, v, g=torch.zeros(1, 8, 3))


def test_g_shape_follows_layout():
    q, k, v = qkv()
    t = lambda x: x.transpose(0, 1)
    expect_error(r"`g` must have shape \[8, 1, 2\]", t(q), t(k), t(v), g=torch.zeros(1, 8, 2), layout="tbhd")


def test_decay_shape():
    q, k, v = qkv()
    expect_error("`decay` must have shape", q, k, v, decay=torch.zeros(3))


def test_scale_type():
    q, k, v = qkv()
    expect_error("`scale` must be a Python float", q, k, v, scale="0.5")
    expect_error("`scale` must be finite", q, k, v, scale=float("nan"))


def test_chunk_size():
    q, k, v = qkv()
    expect_error("`chunk_size` must be a positive int", q, k, v, chunk_size=0)


def test_split_name():
    q, k, v = qkv()
    expect_error("`split` must be one of", q, k, v, split="zigzag")


def test_group_type():
    q, k, v = qkv()
    expect_error("`group` must be a torch.distributed ProcessGroup", q, k, v, group="world")


def test_empty_sequence():
    q, k, v = qkv(T=0)
    expect_error("empty sequence", q, k, v)


def test_cuda_tensors_on_a_cpu_build_or_meta_device():
    q, k, v = (x.to("meta") for x in qkv())
    expect_error("`q` is on meta", q, k, v)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 5, 3, 8]), "non-decreasing"),
    (torch.tensor([0, 4, 7]), "must end at the global sequence length 8"),
    (torch.tensor([1, 4, 8]), "must start at 0"),
    (torch.tensor([0.0, 8.0]), "int32 or int64"),
    (torch.tensor([[0, 8]]), "1-D"),
])
def test_bad_cu_seqlens(cu, match):
    q, k, v = qkv()
    expect_error(match, q, k, v, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    q, k, v = qkv(B=2)
    expect_error("batch size 1", q, k, v, cu_seqlens=torch.tensor([0, 8]))
