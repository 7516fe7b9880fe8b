// PTX wrappers for whole-tile copies (sm_90): mbarriers and tensor-map (TMA) copies. The
// "tma" state passes (delta_chunk_states.cu, delta_chunk_rstates.cu) use them: each
// chunk's full-width tiles arrive as two 64-column boxes each (128-byte swizzle) instead of 4 cp.async pieces a thread.
// Included by .cu files only (internal linkage).
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"

// The sm_80 pass of a multi-target build compiles these to nothing (the host launches
// the kernels that use them on sm_90 and later devices only).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define LASP2_ASM90(...) \
  do {                   \
  } while (0)
#else
#define LASP2_ASM90(...) asm volatile(__VA_ARGS__)
#endif

namespace lasp2::delta::gpu {
namespace {

using lasp2::cuda::smem_u32;

__device__ __forceinline__ void mbar_init(void* bar, uint32_t count) {
  LASP2_ASM90("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the async proxy (the copies' completions).
__device__ __forceinline__ void mbar_init_fence() { LASP2_ASM90("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
// One thread's set-up of a ring of NS barriers, one arrival each (that thread's own
// expect_tx), made visible to the copy engine; the block's __syncthreads publishes them.
template <int NS>
__device__ __forceinline__ void init_ring_barriers(uint64_t* bars) {
#pragma unroll
  for (int s = 0; s < NS; ++s) mbar_init(&bars[s], 1);
  mbar_init_fence();
}
// Orders the block's earlier (generic-proxy) accesses of shared memory, which a
// __syncthreads ordered before this thread, before the copy engine's later writes there:
// issued before a copy refills a tile the block has read.
__device__ __forceinline__ void fence_proxy_async_shared() { LASP2_ASM90("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Waits until the barrier's phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(void* bar, uint32_t parity) {
  const uint32_t a = smem_u32(bar);
  uint32_t done;
  do {
    done = 1;
    LASP2_ASM90(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(a), "r"(parity)
        : "memory");
  } while (done == 0);
}
// One plain arrival of this thread (release: its earlier shared-memory accesses are
// ordered before the phase completes for the threads that wait on it).
__device__ __forceinline__ void mbar_arrive(void* bar) {
  LASP2_ASM90("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// One arrival that also expects `bytes` of tensor copies in the barrier's current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(void* bar, uint32_t bytes) {
  LASP2_ASM90("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
// A box of a 2-d / 4-d tensor map (coordinates innermost first) to shared address dst
// (the box's 128-byte swizzle needs dst 1024-byte aligned), its bytes counted on barrier
// bar. Rows past the tensor's extent arrive as zeros (and count).
__device__ __forceinline__ void tma_box_2d(uint32_t dst, const void* map, int x, int y, void* bar) {
  LASP2_ASM90(
      "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
      : "memory");
}
__device__ __forceinline__ void tma_box_4d(uint32_t dst, const void* map, int x, int y, int z, int w, void* bar) {
  LASP2_ASM90(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
      " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_u32(bar))
      : "memory");
}

// ldmatrix from a 32-bit shared-memory address (the swizzled tiles' addresses are formed
// as such): four 8 x 8 matrices, plain or transposed.
__device__ __forceinline__ void ldsm_x4_at(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_t_at(uint32_t (&r)[4], uint32_t a) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

}  // namespace
}  // namespace lasp2::delta::gpu
