// The poisoning kernel of a LASP-2 forward whose ranks' device values fail
// (call_check_kernels.h). It runs once per armed call: what matters is that a
// consistent call costs one launch of blocks that exit at once.
#include "call_check_kernels.h"
#include "consistency_values.h"
#include "launch.h"
#include "lasp2/types.h"

namespace lasp2::cuda {

namespace {

constexpr int kPoisonThreads = 256;
constexpr int kPoisonBlocks = 64;  // a grid-stride loop: enough to fill outputs fast when it must

__device__ void write_nan(char* p, int dtype) {
  switch (static_cast<ScalarType>(dtype)) {
    case ScalarType::kFloat32: *reinterpret_cast<uint32_t*>(p) = 0x7FC00000u; break;
    case ScalarType::kFloat64: *reinterpret_cast<uint64_t*>(p) = 0x7FF8000000000000ull; break;
    case ScalarType::kFloat16: *reinterpret_cast<uint16_t*>(p) = 0x7E00u; break;
    case ScalarType::kBFloat16: *reinterpret_cast<uint16_t*>(p) = 0x7FC0u; break;
  }
}

__global__ void poison_kernel(PoisonArgs a) {
  __shared__ int fails;
  if (threadIdx.x == 0) {
    fails = consistency::words_fail(a.gathered, a.rank_stride, a.world, a.words, a.max_mask) ? 1 : 0;
  }
  __syncthreads();
  if (!fails) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int k = 0; k < a.count; ++k) {
    const PoisonView& v = a.v[k];
    const int64_t n = v.batch * v.seqlen * v.heads * v.dim;
    for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step) {
      int64_t rest = i / v.dim;
      const int64_t d = i - rest * v.dim;
      const int64_t h = rest % v.heads;
      rest /= v.heads;
      const int64_t t = rest % v.seqlen;
      const int64_t b = rest / v.seqlen;
      write_nan(static_cast<char*>(v.ptr) + (b * v.sb + t * v.st + h * v.sh + d) * v.elem_bytes, v.dtype);
    }
  }
}

}  // namespace

void launch_poison(const PoisonArgs& a, cudaStream_t stream) {
  if (a.world < 1 || a.words < 0 || a.words > 32 || a.count < 0 || a.count > kMaxPoisonViews) {
    fail("lasp2 (CUDA): launch_poison: bad arguments");
  }
  poison_kernel<<<kPoisonBlocks, kPoisonThreads, 0, stream>>>(a);
  check_launch("the consistency check's poison kernel");
}

}  // namespace lasp2::cuda
