// Temporary device memory for a KernelBackend, supplied by the framework that owns
// the device's memory (PyTorch's caching allocator in the binding), so that the
// kernels' scratch shows up in the framework's memory statistics, is reused without
// a device allocation per call, and lands in a CUDA graph's private pool when the
// call is captured.
#pragma once

#include <cstddef>
#include <memory>

#include "lasp2/kernel_backend.h"

namespace lasp2 {

class ScratchAllocator {
 public:
  virtual ~ScratchAllocator() = default;
  // `bytes` of device memory (256-byte aligned) for work enqueued on `stream` from now on.
  virtual void* allocate(size_t bytes, void* stream) const = 0;
  // Returns memory from allocate(); stream-ordered: work enqueued on `stream` before
  // this call may still use it, later work may reuse it. Must not throw.
  virtual void release(void* ptr, void* stream) const noexcept = 0;
};

#ifdef LASP2_WITH_CUDA
// A CUDA backend whose temporary buffers come from `allocator` (which must outlive
// it). cuda_backend() takes its scratch from a stream-ordered pool of lasp2's own that keeps
// up to LASP2_CUDA_SCRATCH_KEEP_MB (default 256) across synchronizations (0: the device's
// default pool, which gives it back at each one).
std::unique_ptr<KernelBackend> make_cuda_backend(const ScratchAllocator& allocator);
#endif

}  // namespace lasp2
