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
                  (schedules.py:596): that module sees a torch whose factories map cuda -> cpu
  optimizer       the same for the optimizers (FP32Optimizer's scale, optimizer.py:907; the
                  distributed optimizer, gradient clipping and its local l2 norm in utils.py,
                  the loss scaler, finalize_model_grads, the DDP buffers); and their two checks
                  of CUDA type names (distrib_optimizer.py:420, clip_grads.py:167) see a CPU
                  tensor's type under its CUDA name, as does the bf16 optimizer's sorting of the
                  parameters (optimizer.py:671, DDP --bf16); the distributed optimizer's checkpoint
                  gather / scatter (.cuda() copies, distrib_optimizer.py:1089) runs in place
  tied_embedding  PP: the last stage's copy of the tied embedding weight is moved with .cuda()
                  (language_module.py:244); there .cuda() leaves CPU tensors in place
  torch_fsdp_mesh TorchFullyShardedDataParallel (--use-torch-fsdp2) builds its DeviceMesh with
                  DeviceMesh.from_group(group, "cuda") (torch_fully_sharded_data_parallel.py:81);
                  that module sees a DeviceMesh whose from_group builds it on "cpu"
  moe_alltoall    MoEAlltoAllTokenDispatcher (--moe-token-dispatcher-type alltoall) opens a
                  torch.cuda.Stream for its device-to-host copies of the split sizes
                  (token_dispatcher.py:445) and waits on it through an event (:871-899); that
                  module sees a torch.cuda whose stream and event do nothing (on the CPU every op
                  has finished when it returns), and its copies (maybe_move_tensor_to_cpu, which
                  leaves host tensors as they are) turn the split sizes into numpy arrays as they
                  do from a GPU: all_to_all_single takes sequences of ints, not tensors. The
                  dispatch itself (permute, all_to_all_single over the EP group, sort by local
                  expert, and back) is megatron-core's, on gloo
  shared_expert_overlap
                  --moe-shared-expert-overlap: SharedExpertMLP opens a torch.cuda.Stream when built
                  (shared_experts.py:123) and runs its pieces on it, waiting through
                  wait_stream (:162, :277); it sees the same torch as moe_alltoall. On the CPU the
                  side-stream work runs in the order the dispatcher calls it, so the overlapped
                  path (its explicit TP gather / reduce-scatter, the output added in the combine)
                  computes what the plain path does (test_megatron_moe_shared.py compares them)
  uneven_all_gather
                  at TP > 1 the same dispatcher gathers each TP rank's tokens, a different number
                  per rank, with torch.distributed.all_gather into a list of unequal slices
                  (mappings.py:150, token_dispatcher.py:696), which NCCL runs and gloo refuses
                  ("invalid tensor size"); tensor_parallel.mappings sees a torch.distributed whose
                  all_gather pads each rank's rows to the longest, gathers, and copies each
                  rank's own rows out (equal slices go to torch's all_gather as they are). The
                  backward's uneven reduce_scatter (mappings.py:193) gloo runs as it is
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

    # Modules that allocate with device="cuda" (the pipeline schedules, the optimizers and their
    # gradient clipping / loss scaling): each sees a torch whose factories map cuda -> cpu.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, grad_scaler
    from megatron.core import utils as mutils
    from megatron.core.distributed import finalize_model_grads, param_and_grad_buffer
    from megatron.core.optimizer import optimizer as moptimizer

    proxy = _cpu_torch()
    for module in (schedules, moptimizer, distrib_optimizer, clip_grads, grad_scaler, mutils,
                   finalize_model_grads, param_and_grad_buffer):
        module.torch = proxy
    _APPLIED.append("schedules")
    # Type checks that spell the CUDA names ('torch.cuda.FloatTensor'): the distributed optimizer's
    # parameter grouping (distrib_optimizer.py:420) and gradient clipping (clip_grads.py:167).
    build_groups = distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups.__func__
    distrib_optimizer.DistributedOptimizer._build_model_and_main_param_groups = classmethod(
        _as_on_cuda(build_groups))
    moptimizer.clip_grad_by_total_norm_fp32 = _as_on_cuda(clip_grads.clip_grad_by_total_norm_fp32)
    # bf16 parameters (DDP --bf16): the bf16 optimizer sorts them by CUDA type name (optimizer.py:671)
    moptimizer.Float16OptimizerWithFloat16Params.__init__ = _as_on_cuda(
        moptimizer.Float16OptimizerWithFloat16Params.__init__)
    # Its checkpoint state is gathered and scattered over the DP group with .cuda() copies
    # (distrib_optimizer.py:1089 and the matching load paths).
    for name in ("sharded_state_dict", "load_state_dict"):
        method = getattr(distrib_optimizer.DistributedOptimizer, name)
        setattr(distrib_optimizer.DistributedOptimizer, name, _as_on_cuda(method))
    _APPLIED.append("optimizer")

    # Pipeline parallelism: the last stage's copy of the tied embedding is moved with .cuda()
    # before the all-reduce that initialises it (language_module.py:244).
    from megatron.core.models.common.language_module.language_module import LanguageModule

    LanguageModule.setup_embeddings_and_output_layer = _as_on_cuda(LanguageModule.setup_embeddings_and_output_layer)
    _APPLIED.append("tied_embedding")

    from megatron.core.transformer.moe import token_dispatcher

    token_dispatcher.torch = _torch_with_host_streams()
    token_dispatcher.maybe_move_tensor_to_cpu = _host_copy
    _APPLIED.append("moe_alltoall")

    from megatron.core.transformer.moe import shared_experts

    shared_experts.torch = token_dispatcher.torch
    _APPLIED.append("shared_expert_overlap")

    from megatron.core.tensor_parallel import mappings

    mappings.torch = _torch_with_uneven_all_gather()
    _APPLIED.append("uneven_all_gather")

    try:  # a megatron-core without the FSDP2 wrapper (or a torch without FSDP2) just lacks --use-torch-fsdp2
        from megatron.core.distributed import torch_fully_sharded_data_parallel as torch_fsdp
    except ImportError:
        torch_fsdp = None
    if getattr(torch_fsdp, "DeviceMesh", None) is not None:
        torch_fsdp.DeviceMesh = _CpuDeviceMesh
        _APPLIED.append("torch_fsdp_mesh")
    return list(_APPLIED)


class _CpuDeviceMesh:
    """What torch_fully_sharded_data_parallel uses of DeviceMesh, with its meshes on the CPU."""

    @staticmethod
    def from_group(group, device_type, *args, **kwargs):
        from torch.distributed.device_mesh import DeviceMesh

        return DeviceMesh.from_group(group, "cpu", *args, **kwargs)


def _cpu_torch() -> types.ModuleType:
    """A stand-in for the torch module whose tensor factories put device="cuda" on the CPU."""

    class _CpuTorch(types.ModuleType):
        def __getattr__(self, name):
            return getattr(torch, name)

    proxy = _CpuTorch("torch")

    def on_cpu(factory):
        @functools.wraps(factory)
        def make(*args, device=None, **kwargs):
            if device is not None and torch.device(device).type == "cuda":
                device = "cpu"
            return factory(*args, device=device, **kwargs)

        return make

    for name in ("tensor", "zeros", "ones", "empty", "full", "arange", "zeros_like", "empty_like", "ones_like"):
        setattr(proxy, name, on_cpu(getattr(torch, name)))
    return proxy


class _HostStream:
    """A CUDA stream's interface for work that is already done when issued (CPU ops)."""

    def wait_stream(self, stream):
        pass

    def record_event(self):
        return _DoneEvent()


class _DoneEvent:
    def synchronize(self):
        pass


def _host_copy(tensor, as_numpy=False, record_stream=False):
    """moe_utils.maybe_move_tensor_to_cpu for tensors already on the host: as_numpy as from a GPU."""
    return tensor.numpy() if as_numpy and torch.is_tensor(tensor) else tensor


class _Proxy(types.ModuleType):
    """A module that is `real` except for the attributes set on it."""

    def __init__(self, name, real):
        super().__init__(name)
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)


def _torch_with_host_streams() -> types.ModuleType:
    """A stand-in for the torch module whose torch.cuda has no-op streams and events (the rest of
    torch.cuda, and of torch, as they are)."""

    current = _HostStream()
    cuda = _Proxy("torch.cuda", torch.cuda)
    cuda.Stream = _HostStream
    cuda.current_stream = lambda *args, **kwargs: current
    cuda.stream = lambda stream: contextlib.nullcontext()
    proxy = _Proxy("torch", torch)
    proxy.cuda = cuda
    return proxy


def _all_gather_padded(tensor_list, tensor, group=None, async_op=False):
    """torch.distributed.all_gather for slices that differ in their first dimension (gloo's
    needs equal shapes): every rank's rows padded to the longest slice, gathered, and each
    rank's own rows copied into its slice. async_op goes to torch's as it is (megatron-core's
    uneven gathers are synchronous)."""
    rows = [t.shape[0] for t in tensor_list]
    if len(set(rows)) <= 1 or async_op:
        return torch.distributed.all_gather(tensor_list, tensor, group=group, async_op=async_op)
    padded = tensor.new_zeros((max(rows),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in tensor_list]
    torch.distributed.all_gather(parts, padded, group=group)
    for out, part, n in zip(tensor_list, parts, rows):
        out.copy_(part[:n])
    return None


def _torch_with_uneven_all_gather() -> types.ModuleType:
    """A stand-in for the torch module whose torch.distributed.all_gather takes unequal slices
    (the rest of torch.distributed, and of torch, as they are)."""
    distributed = _Proxy("torch.distributed", torch.distributed)
    distributed.all_gather = _all_gather_padded
    proxy = _Proxy("torch", torch)
    proxy.distributed = distributed
    return proxy


def _as_on_cuda(fn):
    """fn, during which CPU tensors pass megatron-core's CUDA assumptions: .type() reads
    'torch.cuda.<T>Tensor' and .cuda() leaves the tensor where it is."""
    original_type, original_cuda = torch.Tensor.type, torch.Tensor.cuda

    def cuda_named_type(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original_type(self).replace("torch.", "torch.cuda.", 1)
        return original_type(self, dtype, non_blocking, **kwargs)

    def stay(self, *args, **kwargs):
        return self

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        torch.Tensor.type, torch.Tensor.cuda = cuda_named_type, stay
        try:
            return fn(*args, **kwargs)
        finally:
            torch.Tensor.type, torch.Tensor.cuda = original_type, original_cuda

    return wrapped
