#include "scratch.h"

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

DeviceBlock::DeviceBlock(int64_t bytes, const ScratchAllocator* allocator, cudaStream_t stream)
    : allocator_(allocator), stream_(stream) {
  if (bytes == 0) return;
  if (allocator_ != nullptr) {
    base_ = allocator_->allocate(static_cast<size_t>(bytes), stream_);
    LASP2_CHECK(base_ != nullptr, "the scratch allocator returned null");
  } else if (device_info().pools) {
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
