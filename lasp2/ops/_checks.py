"""Argument checks shared by the attention ops. Every failure names the argument."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from lasp2.options import LAYOUTS

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256
# dtypes as integers, for the cross-rank consistency check
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


def fail(op: str, message: str):
    raise ValueError(f"{op}: {message}")


def check_tensor(op: str, name: str, x, ndim: int, dtypes: Sequence[torch.dtype] = FLOAT_DTYPES):
    if not isinstance(x, torch.Tensor):
        fail(op, f"`{name}` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        fail(op, f"`{name}` must have {ndim} dimensions, got shape {list(x.shape)}")
    if x.dtype not in dtypes:
        fail(op, f"`{name}` has dtype {x.dtype}; supported: {', '.join(str(d) for d in dtypes)}")


def check_qkv(op: str, q, k, v, ndim: int = 4):
    """check_tensor for q, k and v, then check_same_device_dtype(k, v against q). The
    usual case (all three fine) is decided in one expression without a Python call per
    test (the ops' host time at small T); anything else runs those checks for their
    messages, so the errors are the same."""
    if (isinstance(q, torch.Tensor) and isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor)
            and q.dim() == ndim and k.dim() == ndim and v.dim() == ndim and q.dtype in FLOAT_DTYPES
            and k.dtype == q.dtype and v.dtype == q.dtype and k.device == q.device and v.device == q.device):
        return
    check_tensor(op, "q", q, ndim)
    check_tensor(op, "k", k, ndim)
    check_tensor(op, "v", v, ndim)
    check_same_device_dtype(op, "q", q, k=k, v=v)


def check_layout(op: str, layout: str):
    if layout not in LAYOUTS:
        fail(op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")


def check_same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, **others):
    for name, x in others.items():
        if x.device != ref.device:
            fail(op, f"`{name}` is on {x.device} but `{ref_name}` is on {ref.device}")
        if x.dtype != ref.dtype:
            fail(op, f"`{name}` has dtype {x.dtype} but `{ref_name}` has {ref.dtype}")


def check_nonempty(op: str, q: torch.Tensor, seq_dim: int):
    """No empty sequence, batch or head dimension (an empty call's backward has nothing
    valid to run on; the kernels' views need at least one row of each)."""
    if q.shape[seq_dim] < 1:
        fail(op, "`q` has an empty sequence dimension")
    if q.shape[1 - seq_dim] < 1:
        fail(op, "`q` has an empty batch dimension")
    if q.shape[2] < 1:
        fail(op, "`q` has 0 heads")


def check_head_dim(op: str, name: str, d: int):
    if d < 1 or d > MAX_HEAD_DIM:
        fail(op, f"`{name}` head dim {d} is outside [1, {MAX_HEAD_DIM}]")


def check_linear_qkv_shapes(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: str):
    """The linear families' q, k, v (4-d, checked before): k the shape of q, v the same in
    its first three dims, both head dims in [1, MAX_HEAD_DIM]."""
    if k.shape != q.shape:
        fail(op, f"`k` must have the shape of `q` {list(q.shape)}, got {list(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        fail(op, f"`v` must match `q` in its first three dims {list(q.shape[:3])} ({layout}), got {list(v.shape)}")
    check_head_dim(op, "q", q.shape[3])
    check_head_dim(op, "v", v.shape[3])


def check_device_supported(op: str, q: torch.Tensor, has_cuda_kernels: bool):
    # is_cuda / is_cpu: no torch.device object per test (the ops' host time at small T)
    if q.is_cuda:
        if not has_cuda_kernels:
            fail(op, "`q` is a CUDA tensor but this lasp2 build has no CUDA kernels; "
                     "rebuild with a CUDA torch and nvcc available")
        if q.dtype == torch.float64:
            fail(op, "`q` is float64 on CUDA; the CUDA kernels take float16, bfloat16 or float32")
    elif not q.is_cpu:
        fail(op, f"`q` is on {q.device}; lasp2 runs on CPU and CUDA devices")


def check_scale(op: str, scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, (torch.Tensor, bool)) or not isinstance(scale, (int, float)):
        fail(op, f"`scale` must be a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        fail(op, f"`scale` must be finite, got {scale}")
    return scale


def check_optional_bool(op: str, name: str, value):
    """True/False/None only: 'no' or 0 where a bool is due is a mistake, not a choice."""
    if value is not None and not isinstance(value, bool):
        fail(op, f"`{name}` must be True, False or None, got {value!r}")


def check_bool(op: str, name: str, value):
    if not isinstance(value, bool):
        fail(op, f"`{name}` must be a bool, got {value!r}")


def check_log_gates(op: str, name: str, x: Optional[torch.Tensor]):
    """Log gates / decays must be <= 0 (a gate of at most 1; -inf is a full reset), not NaN.

    On CPU tensors this is checked here. For CUDA tensors reading the values would
    cost a host sync per call, so they go to the per-call cross-rank consistency check
    instead (`positive=`: staged on the device and compared at the group's next
    exchange, or `positive_flag` below in the synchronous mode); a CUDA call
    without a group is not checked (docs/reliability.md).
    """
    if x is None or not x.is_cpu:
        return
    if not bool((x <= 0).all()):  # one pass; NaN fails `<= 0` too (it would poison every later token)
        if bool(x.isnan().any()):
            fail(op, f"`{name}` contains NaN ({int(x.isnan().sum())} entries); log gates/decays must be <= 0")
        bad = int((x > 0).sum())
        fail(op, f"`{name}` holds log gates/decays that must be <= 0 (gates in [0, 1]); "
                 f"{bad} entr{'y is' if bad == 1 else 'ies are'} positive (max {float(x.max())})")


def builds_backward(*inputs) -> int:
    """The cross-rank check's field "the call builds a backward": grad mode is on and some
    input requires grad. The ranks' backwards run collectives together, so a rank that
    builds none leaves its peers' backward waiting (gloo aborted at the next collective).
    Which inputs need gradients may differ per rank: every rank's backward runs the same
    collectives whatever it computes."""
    return int(torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in inputs))


def positive_flag(x: Optional[torch.Tensor]):
    """A device bool scalar: does x hold a positive entry (None: no flag)."""
    if x is None or x.device.type == "cpu":
        return None
    return (x > 0).any()


def guard_double_backward(op: str, grads: tuple) -> tuple:
    """Called at the end of an autograd backward. Under create_graph=True (grad mode on
    in backward) the gradients are returned with a graph whose backward raises a clear
    error: the ops' backward is not itself differentiable, and a gradient without its
    graph would silently drop e.g. a gradient penalty's second-order term."""
    if not torch.is_grad_enabled():
        return grads
    present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
    if not present:
        return grads
    err = torch._C._functions.DelayedError(
        f"{op}: double backward (create_graph=True through this op, e.g. a gradient penalty) is not "
        "supported; its backward is not differentiable".encode(), len(present))
    wrapped = err(*[grads[i].detach().requires_grad_() for i in present])
    wrapped = wrapped if isinstance(wrapped, tuple) else (wrapped,)
    out = list(grads)
    for i, w in zip(present, wrapped):
        out[i] = w
    return tuple(out)


def check_positive_int(owner: str, name: str, value, optional: bool = False):
    """Module constructors: sizes are ints >= 1 (not bools, not floats)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{owner}: `{name}` must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{owner}: `{name}` must be >= 1, got {value}")


def check_positive_float(owner: str, name: str, value):
    """Module constructors: normalisers / epsilons are finite numbers > 0."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{owner}: `{name}` must be a number, got {type(value).__name__}")
    if not (0 < float(value) < float("inf")):
        raise ValueError(f"{owner}: `{name}` must be finite and > 0, got {value}")


def check_module_input(owner: str, x, hidden_size: int, weight: torch.Tensor, seq_dim: Optional[int] = None):
    """Module forwards: x is a floating [*, *, hidden_size] tensor in the dtype of the
    module's parameters (unless autocast picks the dtypes), with a non-empty sequence
    and batch when `seq_dim` is given: errors name `x` instead of surfacing as an
    AttributeError or a matmul's dtype RuntimeError deep inside the projections."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{owner}: `x` must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or x.shape[-1] != hidden_size:
        raise ValueError(f"{owner}: `x` must be [*, *, {hidden_size}], got {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{owner}: `x` has dtype {x.dtype}; a floating-point dtype is needed")
    if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(f"{owner}: `x` has dtype {x.dtype} but the module's parameters are {weight.dtype}; "
                         "convert one to the other (or run under torch.autocast)")
    if torch.is_inference(x) and torch.is_grad_enabled() and weight.requires_grad:
        # autograd cannot save an inference tensor for the backward: torch raised that inside the
        # first projection, on this rank alone, while its peers waited in the module's check
        raise ValueError(f"{owner}: `x` was made under torch.inference_mode, but grad mode is on and the module's "
                         "parameters require grad (autograd cannot save it for the backward); clone it outside "
                         "inference mode, or call the module under torch.inference_mode() / torch.no_grad()")
    if seq_dim is not None:
        if x.shape[seq_dim] < 1:
            raise ValueError(f"{owner}: `x` has an empty sequence dimension, shape {list(x.shape)}")
        if x.shape[1 - seq_dim] < 1:
            raise ValueError(f"{owner}: `x` has an empty batch dimension, shape {list(x.shape)}")


class named_errors:  # noqa: N801 - used as a context manager
    """Prefixes a RuntimeError from the C++ core (e.g. a failed collective, which already
    names the collective and the group) with the op's name."""

    def __init__(self, op: str):
        self.op = op

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is not None and issubclass(kind, RuntimeError) and not str(exc).startswith(self.op):
            raise RuntimeError(f"{self.op}: {exc}") from exc
        return False


def reraise_named(op: str, exc: RuntimeError):
    """named_errors' rule for an `except RuntimeError as exc:` block (the eager paths use
    it: a try costs nothing when nothing is raised, the context manager three Python
    calls per call): raises `exc` prefixed with the op's name, or `exc` itself when it
    names the op already."""
    if not str(exc).startswith(op):
        raise RuntimeError(f"{op}: {exc}") from exc
    raise  # the exception being handled, unchanged
