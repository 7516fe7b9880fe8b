// The temporary buffers of one CUDA backend call, by name. Each pass fills in the
// sizes it needs (fp32 elements, 0 = not needed); Scratch carves them from one
// allocation (the caller's ScratchAllocator, else the stream-ordered CUDA allocator)
// and gives the memory back, stream-ordered, when the call returns.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"
#include "lasp2/scratch_allocator.h"

namespace lasp2::cuda {

// Bytes of `floats` fp32 elements rounded up to 256, so that buffers carved one after
// another from one allocation each start on a 256-byte boundary.
int64_t aligned_bytes(int64_t floats);

// The current device's stream-ordered pool for scratch that no ScratchAllocator supplies:
// lasp2's own, which keeps up to LASP2_CUDA_SCRATCH_KEEP_MB (default 256) across
// synchronizations; null (the device's default pool) where that is 0 or the device has no
// memory pools. Made once per device.
cudaMemPool_t scratch_pool();

// One device allocation of `bytes` for a backend call: from `allocator` when given,
// else from scratch_pool() on `stream` (cudaMalloc where the device has no memory pools);
// given back, stream-ordered, on destruction. bytes == 0: none (data() is null).
// Both kernel families carve their scratch from one.
class DeviceBlock {
 public:
  DeviceBlock(int64_t bytes, const ScratchAllocator* allocator, cudaStream_t stream);
  ~DeviceBlock();
  DeviceBlock(const DeviceBlock&) = delete;
  DeviceBlock& operator=(const DeviceBlock&) = delete;

  char* data() const { return static_cast<char*>(base_); }

 private:
  const ScratchAllocator* allocator_;
  cudaStream_t stream_;
  void* base_ = nullptr;
  bool async_ = false;
};

// Sizes (fp32 elements) of the named buffers.
struct ScratchLayout {
  int64_t meta = 0;           // [bh][nchunks * 64][2]: per token {G, s} (MetaArgs::meta)
  int64_t weights = 0;        // [bh][nchunks * 64][2]: per token {w_entry, w_exit} (MetaArgs::wmeta)
  int64_t seg_log_decay = 0;  // [bh][nseg]: log of each segment's total decay
  int64_t seg_states = 0;     // [bh][nseg][dk * dv]: segment states, then their scan
  int64_t seg_dg_sums = 0;    // [bh][nseg]: each segment's sum of dg terms (dk/dv pass)
  int64_t block_states = 0;   // generic path: per-block running state when smem is too small
  int64_t sub_states = 0;     // split state walks: [bh][nseg][nsub - 1][dk * dv] (StateArgs)
  int64_t sub_flags = 0;      // split state walks: [bh][nseg][nsub - 1] (StateArgs)

  // The common part of every pass over a part: meta and segment log decays, plus
  // the per-token weights when the segment states run on tensor cores.
  static ScratchLayout for_walk(const Geom& g, bool state_weights);
};

struct ScratchBuffers {
  float* meta = nullptr;
  float* weights = nullptr;
  float* seg_log_decay = nullptr;
  float* seg_states = nullptr;
  float* seg_dg_sums = nullptr;
  float* block_states = nullptr;
  float* sub_states = nullptr;
  float* sub_flags = nullptr;
};

class Scratch {
 public:
  // allocator == nullptr: cudaMallocAsync on `stream` (cudaMalloc where the device
  // has no memory pools).
  Scratch(const ScratchLayout& layout, const ScratchAllocator* allocator, cudaStream_t stream);

  const ScratchBuffers& buffers() const { return buffers_; }

 private:
  DeviceBlock block_;
  ScratchBuffers buffers_;
};

}  // namespace lasp2::cuda
