// The kernel backend for a tensor's device. On CUDA its temporary buffers come
// from PyTorch's caching allocator on the current stream (no cudaMalloc per call,
// counted in torch.cuda's memory statistics, captured into a CUDA graph's pool).
#pragma once

#include <ATen/ATen.h>

#include "delta_rule/delta_backend.h"
#include "lasp2/kernel_backend.h"

namespace lasp2::torch_binding {

const KernelBackend& kernel_backend_for(const at::Tensor& t);
// The delta-rule family's backend for a tensor's device (scratch as above).
const delta::DeltaKernelBackend& delta_kernel_backend_for(const at::Tensor& t);

}  // namespace lasp2::torch_binding
