// The per-call consistency check's kernels (consistency_kernels.h). Both are tiny and run
// once per op call: what matters is one launch each, not their speed.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>

#include "consistency_kernels.h"
#include "consistency_values.h"
#include "launch.h"
#include "lasp2/types.h"

namespace lasp2::cuda {

namespace {

constexpr int kStageThreads = 256;

__device__ double load_as_double(const StagedValue& v, int64_t i) {
  switch (static_cast<StagedElem>(v.elem)) {
    case StagedElem::kF32: return static_cast<const float*>(v.ptr)[i];
    case StagedElem::kF64: return static_cast<const double*>(v.ptr)[i];
    case StagedElem::kF16: return __half2float(static_cast<const __half*>(v.ptr)[i]);
    case StagedElem::kBF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(v.ptr)[i]);
    default: return static_cast<const uint8_t*>(v.ptr)[i] != 0 ? 1.0 : 0.0;
  }
}

// the combine of two partial results of one value's kind, as int64 bits
__device__ int64_t combine(int kind, int64_t a, int64_t b) {
  if (kind == consistency::kDigest) return static_cast<int64_t>(static_cast<uint64_t>(a) + static_cast<uint64_t>(b));
  return consistency::double_bits(consistency::max_step(__longlong_as_double(a), __longlong_as_double(b)));
}

// grid (blocks, values): each block reduces a grid-stride share of its value into a partial;
// the last block to finish (a counter in the scratch) combines the partials of every value
// and writes the entry, then resets the counter for the entry's next use.
__global__ void stage_values_kernel(StageArgs a) {
  const int y = blockIdx.y;
  const StagedValue v = a.v[y];
  const int64_t identity = v.kind == consistency::kDigest ? 0 : consistency::double_bits(-INFINITY);
  int64_t acc = identity;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < v.n; i += stride) {
    const double x = load_as_double(v, i);
    acc = v.kind == consistency::kDigest
              ? static_cast<int64_t>(static_cast<uint64_t>(acc) + consistency::digest_term(x, i))
              : combine(v.kind, acc, consistency::double_bits(x));
  }
  for (int o = 16; o > 0; o >>= 1) acc = combine(v.kind, acc, __shfl_down_sync(0xffffffffu, acc, o));
  __shared__ int64_t warp_acc[kStageThreads / 32];
  __shared__ bool last;
  if (threadIdx.x % 32 == 0) warp_acc[threadIdx.x / 32] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kStageThreads / 32; ++w) acc = combine(v.kind, acc, warp_acc[w]);
    a.scratch[y * kStageBlocks + blockIdx.x] = acc;
    __threadfence();
    unsigned int* counter = reinterpret_cast<unsigned int*>(a.scratch + kMaxStagedValues * kStageBlocks);
    last = atomicAdd(counter, 1u) == gridDim.x * gridDim.y - 1;
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const int s = threadIdx.x;
  if (s < a.slots) {
    int64_t value = 0;
    if (s < a.count && a.v[s].n > 0) {
      const volatile int64_t* partial = a.scratch + s * kStageBlocks;
      value = partial[0];
      for (unsigned int b = 1; b < gridDim.x; ++b) value = combine(a.v[s].kind, value, partial[b]);
    }
    a.out[s] = value;
  }
  if (s == 0) *reinterpret_cast<unsigned int*>(a.scratch + kMaxStagedValues * kStageBlocks) = 0;
}

__global__ void write_row_kernel(RowArgs a) {
  const int s = threadIdx.x;
  if (s >= a.row) return;
  if (s < a.first) {
    a.mine[s] = a.head[s];
  } else {
    const int i = (s - a.first) / a.lagged;
    a.mine[s] = a.ring[a.entries[i] * a.ring_stride + (s - a.first) % a.lagged];
  }
}

}  // namespace

void launch_stage_values(const StageArgs& a, cudaStream_t stream) {
  if (a.count < 1 || a.count > kMaxStagedValues || a.slots < a.count || a.slots > kStageThreads) {
    fail("lasp2 (CUDA): launch_stage_values: 1..8 values, slots in [count, 256]");
  }
  int64_t most = 0;
  for (int i = 0; i < a.count; ++i) most = a.v[i].n > most ? a.v[i].n : most;
  const int64_t per_block = kStageThreads * 8;  // a few elements per thread before a new block pays off
  const int blocks = static_cast<int>(most / per_block + 1 < kStageBlocks ? most / per_block + 1 : kStageBlocks);
  stage_values_kernel<<<dim3(blocks, a.count), kStageThreads, 0, stream>>>(a);
  check_launch("the consistency check's stage_values kernel");
}

void launch_write_row(const RowArgs& a, cudaStream_t stream) {
  if (a.row < 1 || a.row > kMaxCheckRow || a.first < 0 || a.first > a.row || a.sends < 0 ||
      a.sends > kMaxCheckSends || (a.sends > 0 && a.lagged < 1) || a.first + a.sends * a.lagged != a.row) {
    fail("lasp2 (CUDA): launch_write_row: a bad row layout");
  }
  write_row_kernel<<<1, a.row, 0, stream>>>(a);
  check_launch("the consistency check's write_row kernel");
}

}  // namespace lasp2::cuda
