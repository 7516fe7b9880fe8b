// Shared device helpers of the chunked delta-rule kernels (delta_chunk_prep.cu,
// delta_chunk_states.cu, delta_chunk_rstates.cu, delta_chunk_scores.cu,
// delta_chunk_bwd.cu): tile loads of a 64-token chunk, the chunk's position in the part
// and the per-warp mma.sync products (mma_acc, and mma_rows, its full-width case). Included by .cu files only; everything lives in an
// anonymous namespace (internal linkage).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

#include "cuda/tc_tiles.cuh"
#include "delta_rule/cuda/delta_chunk.h"

namespace lasp2::delta::gpu {
namespace {

using lasp2::cuda::cp_async16;
using lasp2::cuda::cp_async_commit;
using lasp2::cuda::cp_async_wait_all;
using lasp2::cuda::cp_async_wait_group1;
using lasp2::cuda::frag_a_colmajor;
using lasp2::cuda::frag_a_rowmajor;
using lasp2::cuda::frag_b_kn;
using lasp2::cuda::frag_b_nk;
using lasp2::cuda::from_float;
using lasp2::cuda::kLdP;
using lasp2::cuda::ldsm_x4;
using lasp2::cuda::ldsm_x4_t;
using lasp2::cuda::load_tile;
using lasp2::cuda::mma16816;
using lasp2::cuda::pack2;
using lasp2::cuda::tc_scores;
using lasp2::cuda::TcTile;
using lasp2::cuda::unpack2;

constexpr int CH = kChunkTokens;
constexpr int NT = 128;  // threads a block (4 warps)
constexpr int BV = kChunkCols;
constexpr int LDV = BV + 8;  // [64][BV] column tiles, rows padded by 16 bytes
constexpr int LDL = CH + 1;  // fp32 [64][65] triangular matrices

static_assert(CH == lasp2::cuda::kChunk, "one chunk size for the tiles");

template <typename T>
__device__ __forceinline__ const T* rows_of(const View& v, int b, int h, int64_t t0) {
  return static_cast<const T*>(v.ptr) + b * v.sb + h * v.sh + t0 * v.st;
}
__device__ __forceinline__ void store_u32(void* p, uint32_t x) { *reinterpret_cast<uint32_t*>(p) = x; }
__device__ __forceinline__ uint32_t load_u32(const void* p) { return *reinterpret_cast<const uint32_t*>(p); }

struct ChunkPos {
  int c, b, h, nvalid;
  int64_t bh, t0, row0;  // row0: first row of the chunk in [bh][npad] scratch
};
__device__ __forceinline__ ChunkPos chunk_pos(const Problem& p, int c, int64_t bh) {
  ChunkPos q;
  q.c = c;
  q.bh = bh;
  q.b = static_cast<int>(bh / p.heads);
  q.h = static_cast<int>(bh % p.heads);
  q.t0 = p.begin + static_cast<int64_t>(c) * CH;
  const int64_t left = p.n - static_cast<int64_t>(c) * CH;
  q.nvalid = left < CH ? static_cast<int>(left) : CH;
  q.row0 = bh * chunk_count(p) * CH + static_cast<int64_t>(c) * CH;
  return q;
}
// The chunk's token rows of a [B, T, H, D] view (cp.nvalid of them; the tile's rows past
// those zero) into the [64][LD] tile dst, NTH threads.
template <typename T, int D, int NTH>
__device__ __forceinline__ void load_chunk_rows(T* dst, const View& v, const ChunkPos& cp, int tid) {
  load_tile<T, D, NTH>(dst, rows_of<T>(v, cp.b, cp.h, cp.t0), v.st, cp.nvalid, D, tid);
}
// The chunk's 64 rows of a [rows][D] 16-bit scratch (prep's w, kd, qg, v_new, r, ...: a
// part's chunks padded to 64 rows each) into the [64][LD] tile dst, NTH threads.
template <typename T, int D, int NTH>
__device__ __forceinline__ void load_scratch_rows(T* dst, const void* rows, const ChunkPos& cp, int tid) {
  load_tile<T, D, NTH>(dst, static_cast<const T*>(rows) + cp.row0 * D, D, CH, D, tid);
}

// The shared memory of a cp.async state pass (GDN's and KDA's, forward and reverse): a
// ring of NS chunk buffers Buf, the carried columns' 16-bit copy xb ([d][ld]) and the
// chunk's 16-bit token rows ys ([64][ld]) of the second product.
template <typename T, typename Buf, int NS, int D, int LDX>
struct StateRingSmem {
  Buf buf[NS];
  T xb[D * LDX];
  T ys[CH * LDX];
};

// The {G, s} pairs of a chunk (64 x 2 floats) into shared memory.
__device__ __forceinline__ void load_meta(float* dst, const float* meta, int64_t row0, int tid) {
  if (tid < CH / 2) cp_async16(dst + 4 * tid, meta + 2 * row0 + 4 * tid, true);
}
// A [64][BV] column block (columns j0..j0+15) of [token][ld] rows into a [64][LDV] tile;
// rows >= nvalid are zero-filled.
template <typename T>
__device__ __forceinline__ void load_cols(T* dst, const T* src, int64_t ld, int j0, int nvalid, int tid) {
  const int row = tid >> 1, part = tid & 1;  // NT = 2 * CH
  const bool valid = row < nvalid;
  cp_async16(dst + row * LDV + 8 * part, valid ? src + row * ld + j0 + 8 * part : src, valid);
}

// acc[nt] (+)= A (16 rows from m0, k in [16 kk0, 16 kk1)) x B (columns n0 + 8 nt), for
// the first 2 npmax n-tiles; A stored [m][k] (or [k][m] when kTransA), B stored [k][n]
// (or [n][k] when kBnk).
template <typename T, int NTILES, bool kTransA, bool kBnk>
__device__ __forceinline__ void mma_acc(float (&acc)[NTILES][4], const T* A, int lda, const T* B, int ldb, int m0,
                                        int n0, int kk0, int kk1, int npmax, int lane) {
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    if (kk < kk0 || kk >= kk1) continue;
    uint32_t a[4];
    if constexpr (kTransA) {
      ldsm_x4_t(a, A + frag_a_colmajor(lane, m0, 16 * kk, lda));
    } else {
      ldsm_x4(a, A + frag_a_rowmajor(lane, m0, 16 * kk, lda));
    }
#pragma unroll
    for (int np = 0; np < NTILES / 2; ++np) {
      if (np >= npmax) continue;
      uint32_t bb[4];
      if constexpr (kBnk) {
        ldsm_x4(bb, B + frag_b_nk(lane, 16 * kk, n0 + 16 * np, ldb));
      } else {
        ldsm_x4_t(bb, B + frag_b_kn(lane, 16 * kk, n0 + 16 * np, ldb));
      }
      mma16816<T>(acc[2 * np], a, bb[0], bb[1]);
      mma16816<T>(acc[2 * np + 1], a, bb[2], bb[3]);
    }
  }
}

// acc += other: a product's second accumulator chain (or a second product) summed into
// the first, fragment by fragment.
template <int N>
__device__ __forceinline__ void add_frags(float (&acc)[N][4], const float (&other)[N][4]) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] += other[nt][e];
}

// acc[n][.] (+)= A (16 rows of warp `warp`, k over kk0..kk1) x B for D/8 n-tiles.
template <typename T, int NTILES, bool kTransA>
__device__ __forceinline__ void mma_rows(float (&acc)[NTILES][4], const T* A, int lda, const T* B, int ldb,
                                         int m0, int kk0, int kk1, int lane) {
  mma_acc<T, NTILES, kTransA, false>(acc, A, lda, B, ldb, m0, 0, kk0, kk1, NTILES / 2, lane);
}

}  // namespace
}  // namespace lasp2::delta::gpu
