"""Run megatron-core 0.16.1 on CPU-only torch (gloo): for tests and examples only.

megatron-core assumes CUDA in a few places that a tiny CPU model reaches. Each
patch below names the place (megatron-core 0.16.1 line numbers) and is needed only
on a machine without a GPU; `enable_cpu_execution()` refuses to run where CUDA is
available unless force=True, and nothing in this package applies it implicitly.

  current_device  torch.cuda.current_device -> "cpu": device=torch.cuda.current_device()
                  in RotaryEmbedding (rotary_pos_embedding.py:162), GlobalMemoryBuffer
                  (utils.py:631) and the DDP grad buffers (param_and_grad_buffer.py:806)
  rng_tracker     CudaRNGStatesTracker backed by the CPU generator (random.py:161;
                  model_parallel_cuda_manual_seed and get_cuda_rng_tracker().fork())
  cuda_rng_state  _get_cuda_rng_state / _set_cuda_rng_state (random.py:55, used by activation
                  recompute, tensor_parallel.checkpoint) read / write the CPU generator
  causal_mask     get_default_causal_mask builds its mask on "cuda" (transformer/utils.py:35)
  rope_cp_slice   get_pos_emb_on_this_cp_rank uses pin_memory() and .cuda()
                  (rope_utils.py:62): the same zig-zag slicing, on the tensor's device
  synchronize     torch.cuda.synchronize -> no-op (dist_checkpointing save,
                  strategies/filesystem_async.py:230; also needs psutil installed)
  schedules       pipeline_parallel.schedules allocates torch.zeros(device="cuda")
                  (schedules.py:596): that module sees a torch whose zeros maps cuda -> cpu

Not covered: get_megatron_optimizer (FP32Optimizer allocates on cuda, optimizer.py:907);
use a torch.optim optimizer over DDP's main_grad on CPU (see examples/megatron_hybrid_gpt.py).
"""

from __future__ import annotations

import contextlib
import functools
import types
from typing import List

import torch

from megatron_patches._compat import check_megatron_core_version

__all__ = ["cpu_execution_enabled", "enable_cpu_execution"]

_APPLIED: List[str] = []


def cpu_execution_enabled() -> bool:
    return bool(_APPLIED)


def enable_cpu_execution(force: bool = False) -> List[str]:
    """Applies the CPU patches (idempotent); returns their names."""
    if _APPLIED:
        return list(_APPLIED)
    if torch.cuda.is_available() and not force:
        raise RuntimeError("enable_cpu_execution() is for CPU-only runs; CUDA is available here, where "
                           "megatron-core's own CUDA code paths are the right ones (force=True overrides)")
    check_megatron_core_version()
    from megatron.core.fusions import fused_softmax
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mrandom
    from megatron.core.transformer import utils as tutils

    from megatron_patches import rope

    torch.cuda.current_device = lambda: "cpu"
    _APPLIED.append("current_device")

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """The tracker's named RNG states live in the CPU generator."""

        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom.CudaRNGStatesTracker = CPURNGStatesTracker  # initialize_rng_tracker() looks it up here
    mrandom._CUDA_RNG_STATE_TRACKER = None
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = False
    _APPLIED.append("rng_tracker")

    # activation recompute (tensor_parallel.checkpoint) saves and restores the "cuda" RNG state
    mrandom._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    _APPLIED.append("cuda_rng_state")

    @functools.lru_cache(maxsize=None)
    def get_default_causal_mask(sq: int) -> torch.Tensor:
        return torch.triu(torch.ones(sq, sq, dtype=torch.bool), diagonal=1)

    tutils.get_default_causal_mask = get_default_causal_mask
    fused_softmax.get_default_causal_mask = get_default_causal_mask
    _APPLIED.append("causal_mask")

    rope._set_megatron_default_get_pos_emb(rope._make_get_pos_emb("balanced"))
    _APPLIED.append("rope_cp_slice")

    torch.cuda.synchronize = lambda *args, **kwargs: None
    _APPLIED.append("synchronize")

    class _TorchForSchedules(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = _TorchForSchedules("torch")

    def zeros(*args, device=None, **kwargs):
        if device == "cuda" or (isinstance(device, torch.device) and device.type == "cuda"):
            device = "cpu"
        return torch.zeros(*args, device=device, **kwargs)

    proxy.zeros = zeros
    schedules.torch = proxy
    _APPLIED.append("schedules")
    return list(_APPLIED)
