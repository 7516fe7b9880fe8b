// PTX wrappers for whole-tile copies (sm_90): mbarriers, tensor-map (TMA) copies, plain
// or multicast to the blocks of a thread-block cluster, cluster barriers. The "tma" and
// "tma2" forward state passes of delta_chunk.cu use them: each chunk's w and K tiles
// arrive as two 64-column boxes each (128-byte swizzle) instead of 4 cp.async pieces a
// thread, and with a cluster of 2 column blocks each block copies half of the rows into
// both (one L2 read a cluster). Included by .cu files only (internal linkage).
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
// Makes the initialised barriers visible to the cluster (and to the async proxy).
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
// One arrival that also expects `bytes` of tensor copies in the barrier's current phase.
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

// A box of a 2-d / 4-d tensor map (coordinates innermost first) to shared address dst
// (the box's swizzle needs dst 1024-byte aligned), its bytes counted on barrier bar; with
// kMulticast into the same offset of every block of `mask` (each block's barrier at
// bar's offset receiving the bytes). Rows past the tensor's extent arrive as zeros.
template <bool kMulticast>
__device__ __forceinline__ void tma_box_2d(uint32_t dst, const void* map, int x, int y, void* bar, uint16_t mask) {
  if constexpr (kMulticast) {
    LASP2_ASM90(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar)), "h"(mask)
        : "memory");
  } else {
    LASP2_ASM90(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
        : "memory");
  }
}
template <bool kMulticast>
__device__ __forceinline__ void tma_box_4d(uint32_t dst, const void* map, int x, int y, int z, int w, void* bar,
                                           uint16_t mask) {
  if constexpr (kMulticast) {
    LASP2_ASM90(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
        " [%0], [%1, {%2, %3, %4, %5}], [%6], %7;\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_u32(bar)), "h"(mask)
        : "memory");
  } else {
    LASP2_ASM90(
        "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(dst),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(smem_u32(bar))
        : "memory");
  }
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
