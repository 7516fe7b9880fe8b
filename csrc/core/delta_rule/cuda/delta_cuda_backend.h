// The delta-rule kernel backend for CUDA device pointers (delta_backend.h). Each
// call enqueues its kernels on the given stream (void* = cudaStream_t) and returns
// without synchronizing the host; temporary buffers come from the ScratchAllocator
// the backend was made with, else from the stream-ordered CUDA allocator.
#pragma once

#include <memory>

#include "delta_rule/delta_backend.h"
#include "lasp2/scratch_allocator.h"

namespace lasp2::delta {

// Scratch from cudaMallocAsync (what delta_backend_for(Device::kCUDA) returns).
const DeltaKernelBackend& delta_cuda_backend();
// Scratch from `allocator`, which must outlive the backend (the binding's: PyTorch's
// caching allocator).
std::unique_ptr<DeltaKernelBackend> make_delta_cuda_backend(const ScratchAllocator& allocator);

}  // namespace lasp2::delta
