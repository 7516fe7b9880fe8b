"""Argument checks shared by the attention ops. Every failure names the argument."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

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


def check_layout(op: str, layout: str):
    if layout not in LAYOUTS:
        fail(op, f"`layout` must be one of {LAYOUTS}, got {layout!r}")


def check_same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, **others):
    for name, x in others.items():
        if x.device != ref.device:
            fail(op, f"`{name}` is on {x.device} but `{ref_name}` is on {ref.device}")
        if x.dtype != ref.dtype:
            fail(op, f"`{name}` has dtype {x.dtype} but `{ref_name}` has {ref.dtype}")


def check_head_dim(op: str, name: str, d: int):
    if d < 1 or d > MAX_HEAD_DIM:
        fail(op, f"`{name}` head dim {d} is outside [1, {MAX_HEAD_DIM}]")


def check_device_supported(op: str, q: torch.Tensor, has_cuda_kernels: bool):
    if q.device.type == "cuda":
        if not has_cuda_kernels:
            fail(op, "`q` is a CUDA tensor but this lasp2 build has no CUDA kernels; "
                     "rebuild with a CUDA torch and nvcc available")
        if q.dtype == torch.float64:
            fail(op, "`q` is float64 on CUDA; the CUDA kernels take float16, bfloat16 or float32")
    elif q.device.type != "cpu":
        fail(op, f"`q` is on {q.device}; lasp2 runs on CPU and CUDA devices")


def check_group(op: str, group):
    if group is None:
        return
    if not isinstance(group, dist.ProcessGroup):
        fail(op, f"`group` must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
    if not dist.is_initialized():
        fail(op, "`group` was given but torch.distributed is not initialized")
    if dist.get_rank(group) < 0:
        fail(op, "`group` does not contain this process (dist.get_rank(group) < 0)")


def check_scale(op: str, scale) -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)):
        fail(op, f"`scale` must be a Python float or None, got {type(scale).__name__}")
    scale = float(scale)
    if scale != scale or scale in (float("inf"), float("-inf")):
        fail(op, f"`scale` must be finite, got {scale}")
    return scale
