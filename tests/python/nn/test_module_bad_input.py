"""Bad input at the nn modules' forward: a ValueError / TypeError naming the argument
(before: an AttributeError for a non-tensor `x`, a matmul's RuntimeError for an
integer or mismatched dtype, an IndexError for an empty sequence in GatedDeltaNet,
and an AttributeError / IndexError / NotImplementedError from its short convolution
for a bad `cu_seqlens`). Autocast keeps mixing dtypes: a bf16 `x` into fp32
parameters under torch.autocast is not refused."""

import pytest
import torch

import lasp2

HIDDEN, HEADS, T = 16, 2, 8


def make(name):
    torch.manual_seed(0)
    if name == "GatedDeltaNet":
        return lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=3)
    if name == "KDA":
        return lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, conv_size=3, per_key_gate=True)
    if name == "HybridStack":
        return lasp2.nn.HybridStack(HIDDEN, HEADS, pattern="LS")
    if name == "HybridBlock":
        return lasp2.nn.HybridBlock(HIDDEN, HEADS)
    return getattr(lasp2.nn, name)(HIDDEN, HEADS)


MODULES = ["LinearAttention", "SoftmaxAttention", "GatedDeltaNet", "KDA", "HybridBlock", "HybridStack"]
X = torch.randn(1, T, HIDDEN)

X_CASES = [  # (name, bad x, error, message)
    ("list", X.tolist(), TypeError, "`x` must be a torch.Tensor"),
    ("integer", X.long(), ValueError, "`x` has dtype torch.int64"),
    ("other float dtype", X.double(), ValueError, "`x` has dtype torch.float64 but the module's parameters"),
    ("2-D", X[0], ValueError, r"`x` must be \[\*, \*, 16\]"),
    ("hidden", X[..., :8], ValueError, r"`x` must be \[\*, \*, 16\]"),
]
EMPTY_CASES = [("empty sequence", X[:, :0], "`x` has an empty sequence dimension"),
               ("empty batch", X[:0], "`x` has an empty batch dimension")]


@pytest.mark.parametrize("module", MODULES)
@pytest.mark.parametrize("name, x, error, match", X_CASES, ids=[c[0] for c in X_CASES])
def test_bad_x_names_x(module, name, x, error, match):
    with pytest.raises(error, match=match):
        make(module)(x)


# HybridBlock has no layout of its own; its mixer refuses empty inputs (naming `q`)
@pytest.mark.parametrize("module", [m for m in MODULES if m != "HybridBlock"])
@pytest.mark.parametrize("name, x, match", EMPTY_CASES, ids=[c[0] for c in EMPTY_CASES])
def test_empty_x_names_x(module, name, x, match):
    with pytest.raises(ValueError, match=match):
        make(module)(x)


CU_CASES = [  # (name, cu_seqlens, error, message)
    ("list", [0, 4, 8], ValueError, "`cu_seqlens` must be a torch.Tensor"),
    ("meta", torch.tensor([0, 4, 8], device="meta"), ValueError, "`cu_seqlens` is on meta"),
    ("past the end", torch.tensor([0, 12, 8]), ValueError, "`cu_seqlens` must be non-decreasing"),
    ("short", torch.tensor([0, 4, 7]), ValueError, "`cu_seqlens` must end at the global sequence length 8"),
    ("long", torch.tensor([0, 4, 9]), ValueError, "`cu_seqlens` must end at the global sequence length 8"),
    ("not from 0", torch.tensor([1, 4, 8]), ValueError, "`cu_seqlens` must start at 0"),
    ("float", torch.tensor([0.0, 4.0, 8.0]), ValueError, "`cu_seqlens` must be int32 or int64"),
]


@pytest.mark.parametrize("module", MODULES[:4] + ["HybridStack"])
@pytest.mark.parametrize("name, cu, error, match", CU_CASES, ids=[c[0] for c in CU_CASES])
def test_bad_cu_seqlens_names_it(module, name, cu, error, match):
    with pytest.raises(error, match=match):
        make(module)(X, cu_seqlens=cu)


@pytest.mark.parametrize("module", ["GatedDeltaNet", "KDA"])
@pytest.mark.parametrize("cu", [[0, 4, 8, 8], [0, 4, 4, 8]], ids=["empty last", "empty inner"])
def test_empty_documents_name_cu_seqlens(module, cu):
    """The delta rule needs every document non-empty: its error, not the short
    convolution's IndexError (an empty last document's boundary indexed past the end)."""
    with pytest.raises(ValueError, match=r"`cu_seqlens` must be strictly increasing \(no empty documents\)"):
        make(module)(X, cu_seqlens=torch.tensor(cu))


@pytest.mark.parametrize("module", ["LinearAttention", "GatedDeltaNet", "HybridStack"])
def test_autocast_mixes_dtypes(module):
    """bf16 x into fp32 parameters under CPU autocast is a valid call (the dtype check
    must not refuse it); its output stays close to the fp32 call's."""
    layer = make(module)
    x = torch.randn(1, T, HIDDEN)
    with torch.no_grad():
        want = layer(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = layer(x.bfloat16())
    err = float((got.float() - want).abs().max() / want.abs().max())
    assert err < 5e-2, err


@pytest.mark.parametrize("module", ["LinearAttention", "GatedDeltaNet"])
def test_unknown_provider_names_it(module):
    cls = getattr(lasp2.nn, module)
    with pytest.raises(ValueError, match=rf"{module}: `provider` must be one of .*'lasp1'.*got 'ring'"):
        cls(HIDDEN, HEADS, provider="ring")


@pytest.mark.parametrize("value", ["no", 1, None])
def test_per_key_gate_must_be_a_bool(value):
    """Before: "no" raised int()'s "invalid literal" at the first forward, 1 and None built a
    layer (KDA / gated DeltaNet) without a word."""
    with pytest.raises(ValueError, match=rf"GatedDeltaNet: `per_key_gate` must be a bool, got {value!r}"):
        lasp2.nn.GatedDeltaNet(HIDDEN, HEADS, per_key_gate=value)
