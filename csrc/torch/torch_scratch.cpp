#include "torch_scratch.h"

#include "tensor_views.h"

#ifdef LASP2_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>

#include "delta_rule/cuda/delta_cuda_backend.h"
#include "lasp2/scratch_allocator.h"
#endif

namespace lasp2::torch_binding {

#ifdef LASP2_WITH_CUDA
namespace {

// Stream-ordered like the caching allocator itself: a block freed after work was
// enqueued on `stream` is reused only by later work on that stream.
class TorchScratch final : public ScratchAllocator {
 public:
  void* allocate(size_t bytes, void* stream) const override {
    return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(
        bytes, static_cast<cudaStream_t>(stream));
  }
  void release(void* ptr, void* /*stream*/) const noexcept override {
    c10::cuda::CUDACachingAllocator::raw_delete(ptr);
  }
};

}  // namespace
#endif

const KernelBackend& kernel_backend_for(const at::Tensor& t) {
#ifdef LASP2_WITH_CUDA
  if (t.is_cuda()) {
    static const TorchScratch allocator;
    static const std::unique_ptr<KernelBackend> backend = make_cuda_backend(allocator);
    return *backend;
  }
#endif
  return backend_for(core_device(t));
}

const delta::DeltaKernelBackend& delta_kernel_backend_for(const at::Tensor& t) {
#ifdef LASP2_WITH_CUDA
  if (t.is_cuda()) {
    static const TorchScratch allocator;
    static const std::unique_ptr<delta::DeltaKernelBackend> backend =
        delta::make_delta_cuda_backend(allocator);
    return *backend;
  }
#endif
  return delta::delta_backend_for(core_device(t));
}

}  // namespace lasp2::torch_binding
