// Device helpers shared by the CUDA kernels: element conversion, the per-token
// decay bookkeeping ("meta") accessors, and the inline-PTX wrappers for cp.async,
// ldmatrix, movmatrix and mma.sync (sm_80+).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "launch.h"

namespace lasp2::cuda {

// ---- element types -----------------------------------------------------------
template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Two 16-bit values in one register: `lo` at the lower address / lower half.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t x);
template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(uint32_t x) {
  return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
}
template <>
__device__ __forceinline__ float2 unpack2<__half>(uint32_t x) {
  return __half22float2(*reinterpret_cast<__half2*>(&x));
}
template <typename T>
__device__ __forceinline__ uint32_t scale2(uint32_t x, float s0, float s1) {
  const float2 f = unpack2<T>(x);
  return pack2<T>(f.x * s0, f.y * s1);
}

// ---- per-(b, h) addressing ---------------------------------------------------
// The (segment, batch, head) of a pass's thread block, numbered bh * nseg + seg (kernels
// that form the chunk range themselves take this alone: see generic_kernels.cu).
struct SegmentPlace {
  int seg;
  int64_t bh;
  int b, h;
};
__device__ __forceinline__ SegmentPlace segment_place(const Geom& g) {
  SegmentPlace s;
  s.seg = blockIdx.x % g.nseg;
  s.bh = blockIdx.x / g.nseg;
  s.b = static_cast<int>(s.bh / g.heads);
  s.h = static_cast<int>(s.bh % g.heads);
  return s;
}
// The place and the segment's chunks [c_begin, c_end) (empty past the part's last chunk).
struct SegmentBlock : SegmentPlace {
  int c_begin, c_end;
};
__device__ __forceinline__ SegmentBlock segment_block(const Geom& g) {
  SegmentBlock s;
  static_cast<SegmentPlace&>(s) = segment_place(g);
  s.c_begin = s.seg * g.seg_chunks;
  s.c_end = min(g.nchunks, s.c_begin + g.seg_chunks);
  return s;
}

template <typename T>
__device__ __forceinline__ T* head_base(const View& v, int b, int h, int64_t begin) {
  return static_cast<T*>(v.ptr) + b * v.sb + h * v.sh + begin * v.st;
}
// Index of token t (local) of (b, h) in a [B, T, H] fp32 contiguous scalar array.
__device__ __forceinline__ int64_t bth(const Geom& g, int b, int64_t t, int h) {
  return (static_cast<int64_t>(b) * g.seqlen + t) * g.heads + h;
}
// The per-token meta of (b, h) (launch.h: meta and wmeta are [bh][nchunks * 64][2]).
__device__ __forceinline__ const float* head_meta(const float* meta, const Geom& g, int64_t bh) {
  return meta + bh * g.nchunks * kChunk * 2;
}
// Segment seg's state of (b, h) in a buffer at bh * bh_stride + seg * seg_stride; null
// (nothing enters or leaves) stays null. The buffer and strides by reference: so the
// kernel's parameter loads keep their place and the PTX is that of the expression written
// out (by value, nvcc ordered the loads differently).
__device__ __forceinline__ const float* seg_state(const float* const& base, int64_t bh, int seg,
                                                  const int64_t& bh_stride, const int64_t& seg_stride) {
  return base != nullptr ? base + bh * bh_stride + seg * seg_stride : nullptr;
}

// ---- decay weights from a chunk's meta (G = cumulative log decay, s = docs) -----
// Pair weight of key y in the output of query x (both in one chunk).
__device__ __forceinline__ float pair_weight(int x, int y, float Gx, float sx, float Gy, float sy) {
  return (y <= x && sx == sy) ? __expf(Gx - Gy) : 0.f;
}


// ---- PTX wrappers --------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
// 16-byte async copy; when !valid the destination is zero-filled and nothing is read.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
  asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
// Waits until at most the newest committed group is still in flight.
__device__ __forceinline__ void cp_async_wait_group1() {
  asm volatile("cp.async.wait_group 1;\n" ::: "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
// Transposes an 8x8 matrix of 16-bit values held one pair per thread (row t/4,
// columns 2(t%4), 2(t%4)+1).
__device__ __forceinline__ uint32_t movm_trans(uint32_t x) {
  uint32_t r;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(r) : "r"(x));
  return r;
}

// d += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1);
template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                 uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Fragment addressing for ldmatrix.x4 (lane = thread's lane). Shared-memory tiles
// are row-major with `ld` elements per row.
//  A operand 16x16 at (m0, k0), stored A[m][k]:            non-trans
__device__ __forceinline__ int frag_a_rowmajor(int lane, int m0, int k0, int ld) {
  return (m0 + (lane & 15)) * ld + k0 + (lane >> 4) * 8;
}
//  A operand 16x16 at (m0, k0), stored As[k][m]:           trans
__device__ __forceinline__ int frag_a_colmajor(int lane, int m0, int k0, int ld) {
  const int mi = lane >> 3, r = lane & 7;
  return (k0 + (mi >> 1) * 8 + r) * ld + m0 + (mi & 1) * 8;
}
//  B operand k16 x n16 (two n8 tiles) at (k0, n0), stored Bs[n][k]: non-trans;
//  regs {0,1} = n-tile n0, regs {2,3} = n-tile n0 + 8
__device__ __forceinline__ int frag_b_nk(int lane, int k0, int n0, int ld) {
  const int mi = lane >> 3, r = lane & 7;
  return (n0 + (mi >> 1) * 8 + r) * ld + k0 + (mi & 1) * 8;
}
//  B operand k16 x n16 at (k0, n0), stored Bs[k][n]:       trans
__device__ __forceinline__ int frag_b_kn(int lane, int k0, int n0, int ld) {
  const int mi = lane >> 3, r = lane & 7;
  return (k0 + (mi & 1) * 8 + r) * ld + n0 + (mi >> 1) * 8;
}

// Warp sums.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

}  // namespace lasp2::cuda
