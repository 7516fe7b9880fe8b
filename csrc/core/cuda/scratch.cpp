#include "scratch.h"

#include "env_knob.h"
#include "route.h"

namespace lasp2::cuda {
namespace {

// The buffers in allocation order, each starting on a 256-byte boundary.
constexpr int64_t ScratchLayout::*kSizes[] = {
    &ScratchLayout::meta,       &ScratchLayout::weights,     &ScratchLayout::seg_log_decay,
    &ScratchLayout::seg_states, &ScratchLayout::seg_dg_sums, &ScratchLayout::block_states,
    &ScratchLayout::sub_states, &ScratchLayout::sub_flags};
constexpr float* ScratchBuffers::*kPointers[] = {
    &ScratchBuffers::meta,       &ScratchBuffers::weights,     &ScratchBuffers::seg_log_decay,
    &ScratchBuffers::seg_states, &ScratchBuffers::seg_dg_sums, &ScratchBuffers::block_states,
    &ScratchBuffers::sub_states, &ScratchBuffers::sub_flags};
static_assert(sizeof(kSizes) / sizeof(kSizes[0]) == sizeof(kPointers) / sizeof(kPointers[0]),
              "one pointer per named size");

int64_t layout_bytes(const ScratchLayout& layout) {
  int64_t bytes = 0;
  for (auto size : kSizes) bytes += aligned_bytes(layout.*size);
  return bytes;
}

}  // namespace

int64_t aligned_bytes(int64_t floats) { return (floats * 4 + 255) / 256 * 256; }

// Why a pool of lasp2's own: the device's default pool has a release threshold of 0, so every
// synchronization gave the scratch back to the system and the next call mapped it again.
// Session 24 measured that on an H100 (bench_lasp2, 64K tokens, H = 16, D = 128, gates):
// the host time of one eager lasp2_forward was 130.5 us and of lasp2_backward 291.8 us, against
// 51.0 and 77.1 us with the memory kept. The eager forward took 0.552 ms against the graph
// replay's 0.453 ms; with the memory kept, 0.461 ms. With this pool, on an H200: 0.432-0.437 ms
// against 0.483-0.511 ms with LASP2_CUDA_SCRATCH_KEEP_MB=0. The default pool's threshold is
// the process's, so lasp2 does not change it; this pool keeps up to LASP2_CUDA_SCRATCH_KEEP_MB
// (read when the device's pool is made; default 256 MiB, about the scratch of a 1M-token call at
// H = 16) across synchronizations; 0 takes the default pool, as before session 24.
// Callers that own the device's memory pass a ScratchAllocator instead (the PyTorch binding:
// its caching allocator).
cudaMemPool_t scratch_pool() {
  return per_device([](int dev) {
    cudaMemPool_t pool = nullptr;
    const int keep_mb = env_int("LASP2_CUDA_SCRATCH_KEEP_MB", 256, 0, INT_MAX);
    if (keep_mb > 0 && device_info().pools) {
      cudaMemPoolProps props = {};
      props.allocType = cudaMemAllocationTypePinned;
      props.location.type = cudaMemLocationTypeDevice;
      props.location.id = dev;
      cuda_check(cudaMemPoolCreate(&pool, &props), "cudaMemPoolCreate of the scratch pool");
      uint64_t keep = static_cast<uint64_t>(keep_mb) << 20;
      cuda_check(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep),
                 "the scratch pool's release threshold");
    }
    return pool;
  });
}

DeviceBlock::DeviceBlock(int64_t bytes, const ScratchAllocator* allocator, cudaStream_t stream)
    : allocator_(allocator), stream_(stream) {
  if (bytes == 0) return;
  if (allocator_ != nullptr) {
    base_ = allocator_->allocate(static_cast<size_t>(bytes), stream_);
    LASP2_CHECK(base_ != nullptr, "the scratch allocator returned null");
  } else if (device_info().pools) {
    if (cudaMemPool_t pool = scratch_pool())
      cuda_check(cudaMallocFromPoolAsync(&base_, bytes, pool, stream_), "cudaMallocFromPoolAsync of the scratch buffer");
    else
      cuda_check(cudaMallocAsync(&base_, bytes, stream_), "cudaMallocAsync of the scratch buffer");
    async_ = true;
  } else {
    cuda_check(cudaMalloc(&base_, bytes), "cudaMalloc of the scratch buffer");
  }
}

DeviceBlock::~DeviceBlock() {
  if (base_ == nullptr) return;
  if (allocator_ != nullptr) {
    allocator_->release(base_, stream_);
  } else if (async_) {
    cudaFreeAsync(base_, stream_);
  } else {
    cudaStreamSynchronize(stream_);  // only on devices without memory pools
    cudaFree(base_);
  }
}

ScratchLayout ScratchLayout::for_walk(const Geom& g, bool state_weights) {
  ScratchLayout l;
  l.meta = g.bh() * g.nchunks * kChunk * 2;
  l.weights = state_weights ? l.meta : 0;
  l.seg_log_decay = g.bh() * g.nseg;
  return l;
}

Scratch::Scratch(const ScratchLayout& layout, const ScratchAllocator* allocator,
                 cudaStream_t stream)
    : block_(layout_bytes(layout), allocator, stream) {
  char* p = block_.data();
  if (p == nullptr) return;
  for (size_t i = 0; i < sizeof(kSizes) / sizeof(kSizes[0]); ++i) {
    const int64_t floats = layout.*kSizes[i];
    if (floats > 0) buffers_.*kPointers[i] = reinterpret_cast<float*>(p);
    p += aligned_bytes(floats);
  }
}

}  // namespace lasp2::cuda
