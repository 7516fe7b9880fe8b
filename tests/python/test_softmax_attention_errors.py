"""Bad input to lasp2.softmax_attention raises ValueError naming the argument."""

import pytest
import torch

import lasp2


def qkv(B=1, T=8, H=4, Hkv=2, D=4, dtype=torch.float32):
    return torch.randn(B, T, H, D, dtype=dtype), torch.randn(B, T, Hkv, D, dtype=dtype), \
        torch.randn(B, T, Hkv, D, dtype=dtype)


def expect_error(match, *args, **kwargs):
    with pytest.raises(ValueError, match=match):
        lasp2.softmax_attention(*args, **kwargs)


def test_not_a_tensor():
    q, k, v = qkv()
    expect_error("`k` must be a torch.Tensor", q, k.tolist(), v)


def test_wrong_rank():
    q, k, v = qkv()
    expect_error("`q` must have 4 dimensions", q[0], k, v)


def test_sequence_length_mismatch():
    q, k, v = qkv()
    expect_error("`k` must match `q` in batch and sequence dims", q, k[:, :4], v)


def test_batch_mismatch():
    q, k, v = qkv(B=2)
    expect_error("`k` must match `q` in batch and sequence dims", q, k[:1], v)


def test_head_dim_mismatch():
    q, k, v = qkv()
    expect_error("`k` must have the head dim of `q`", q, k[..., :2], v)


def test_value_shape():
    q, k, v = qkv()
    expect_error("`v` must match `k` in its first three dims", q, k, v[:, :, :1])


def test_gqa_heads_must_divide():
    q, k, v = qkv(H=4, Hkv=3)
    expect_error(r"`k` has 3 heads, which must divide the 4 heads of `q` \(GQA\)", q, k, v)


def test_dtype_mismatch():
    q, k, v = qkv()
    expect_error("`v` has dtype torch.float64", q, k, v.double())


def test_integer_dtype():
    q, k, v = qkv()
    expect_error("`q` has dtype torch.int64", q.long(), k.long(), v.long())


def test_device_mismatch_or_unsupported_device():
    q, k, v = qkv()
    expect_error("`k` is on meta", q, k.to("meta"), v)
    expect_error("`q` is on meta", q.to("meta"), k.to("meta"), v.to("meta"))


def test_head_dim_limit():
    q, k, v = qkv(D=300)
    expect_error("`q` head dim 300", q, k, v)


def test_layout_name():
    q, k, v = qkv()
    expect_error("`layout` must be one of", q, k, v, layout="bhtd")


def test_scale():
    q, k, v = qkv()
    expect_error("`scale` must be a Python float", q, k, v, scale="0.5")
    expect_error("`scale` must be finite", q, k, v, scale=float("inf"))


def test_split_name():
    q, k, v = qkv()
    expect_error("`split` must be one of", q, k, v, split="zigzag")


def test_causal_flag():
    q, k, v = qkv()
    expect_error("`causal` must be a bool", q, k, v, causal="yes")


def test_backend_name():
    q, k, v = qkv()
    expect_error("`backend` must be one of", q, k, v, backend="flash")


def test_group_type():
    q, k, v = qkv()
    expect_error("`group` must be a torch.distributed ProcessGroup", q, k, v, group="world")


def test_empty_sequence():
    q, k, v = qkv(T=0)
    expect_error("empty sequence", q, k, v)


@pytest.mark.parametrize("cu, match", [
    (torch.tensor([0, 5, 3, 8]), "non-decreasing"),
    (torch.tensor([0, 4, 7]), "must end at the global sequence length 8"),
    (torch.tensor([1, 4, 8]), "must start at 0"),
    (torch.tensor([0.0, 8.0]), "int32 or int64"),
    (torch.tensor([[0, 8]]), "1-D"),
    ([0, 8], "`cu_seqlens` must be a torch.Tensor"),
])
def test_bad_cu_seqlens(cu, match):
    q, k, v = qkv()
    expect_error(match, q, k, v, cu_seqlens=cu)


def test_cu_seqlens_needs_batch_one():
    q, k, v = qkv(B=2)
    expect_error("batch size 1", q, k, v, cu_seqlens=torch.tensor([0, 8]))
    t = lambda x: x.transpose(0, 1)
    expect_error("batch size 1", t(q), t(k), t(v), cu_seqlens=torch.tensor([0, 8]), layout="tbhd")
