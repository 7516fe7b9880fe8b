// PTX wrappers for thread-block clusters (sm_90): mbarriers, bulk copies multicast to
// every block of a cluster, cluster barriers. The state passes of delta_chunk.cu use
// them so that the column blocks of one (b, h) read each chunk's w and K from L2 once
// (one slice a block, copied into all of them) instead of once a block. Included by
// .cu files only (internal linkage).
#pragma once

#include <cstdint>

#include "cuda/device_utils.cuh"

// The sm_80 pass of a multi-target build compiles these to nothing (the host launches
// the cluster kernels on sm_90 and later devices only).
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
// Makes the initialised barriers visible to the cluster (before the first cluster_sync).
__device__ __forceinline__ void mbar_init_fence() { LASP2_ASM90("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }

// Every thread of every block of the cluster (all threads must call it).
__device__ __forceinline__ void cluster_sync() {
  LASP2_ASM90("barrier.cluster.arrive.release;\nbarrier.cluster.wait.acquire;\n" ::: "memory");
}
__device__ __forceinline__ uint32_t cluster_rank() {
  uint32_t r = 0;
  LASP2_ASM90("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ uint32_t cluster_blocks() {
  uint32_t r = 0;
  LASP2_ASM90("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(r));
  return r;
}

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
// One arrival that also expects `bytes` of bulk copies in the barrier's current phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(void* bar, uint32_t bytes) {
  LASP2_ASM90("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}
// One arrival on the barrier at the same offset in block `cta` of the cluster (release:
// this block's reads of the buffer it guards are done before the arrival is seen).
__device__ __forceinline__ void mbar_arrive_remote(void* bar, uint32_t cta) {
  LASP2_ASM90(
      "{\n.reg .b32 ra;\nmapa.shared::cluster.u32 ra, %0, %1;\n"
      "mbarrier.arrive.release.cluster.shared::cluster.b64 _, [ra];\n}\n" ::"r"(smem_u32(bar)),
      "r"(cta)
      : "memory");
}
// An arrival (not counted in advance: the barrier's count includes it) once every
// cp.async this thread issued before has landed.
__device__ __forceinline__ void mbar_arrive_cp_async(void* bar) {
  LASP2_ASM90("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}
// `bytes` (a multiple of 16, both addresses 16-byte aligned) from global memory to the
// same shared-memory offset `dst` in every block of `mask`, each block's barrier at
// `bar`'s offset receiving the bytes.
__device__ __forceinline__ void bulk_copy_multicast(void* dst, const void* src, uint32_t bytes, void* bar,
                                                    uint16_t mask) {
  LASP2_ASM90(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster [%0], [%1], %2, [%3], "
      "%4;\n" ::"r"(smem_u32(dst)),
      "l"(src), "r"(bytes), "r"(smem_u32(bar)), "h"(mask)
      : "memory");
}

}  // namespace
}  // namespace lasp2::delta::gpu
