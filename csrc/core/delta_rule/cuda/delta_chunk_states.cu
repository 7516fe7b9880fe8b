// The forward state pass of the chunked GDN and the part summary (delta_chunk.h
// "states"): sequential over a part's chunks, the state (or the columns of [A | M]) in
// registers, the next chunks' inputs in flight. Three kernels, chosen by
// LASP2_DELTA_STATE_KERNEL (delta_chunk_state.cuh): fwd_state_kernel (4 warps; d = 64),
// fwd_state_kernel_w8 (8 warps) and fwd_state_kernel_tma (8 warps on tensor-map copies,
// sm_90: the default there).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk.h"
#include "cuda/route.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_launch.cuh"
#include "delta_rule/cuda/delta_chunk_state.cuh"
#include "delta_rule/cuda/delta_chunk_tma.cuh"
#include "delta_rule/cuda/tma_copy.cuh"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- the forward state pass and the part summary -------------------------------------
// One block per (b, h) and C columns, sequential over chunks, with the inputs of the next
// NS - 1 chunks in flight (cp.async ring of NS buffers). Every block reads the chunk's
// whole w and K. A block either carries 16 columns of
// the state (S from `entering`, or zero) or, for the part summary, 16 columns of the
// map A (from I, with u = 0: the columns of A evolve like state columns with v = 0).
template <typename T, int D, int C>
struct FwdStateBuf {
  static constexpr int LD = TcTile<D>::LD, LDC = C + 8;
  T w[CH * LD];
  T k[CH * LD];
  T u[CH * LDC];
  float meta[2 * CH];
};
template <typename T, int D, int C, int NS>
using FwdStateSmem = StateRingSmem<T, FwdStateBuf<T, D, C>, NS, D, C + 8>;  // xb: the carried columns, [d][C]

// Columns [0, C) of the first 64 rows of src (row pitch ld) into a [64][C + 8] tile;
// rows >= nvalid are zero-filled. NTH threads, C / 8 16-byte pieces a row.
template <typename T, int C, int NTH>
__device__ __forceinline__ void load_col_block(T* dst, const T* src, int64_t ld, int nvalid, int tid) {
#pragma unroll
  for (int i = tid; i < CH * C / 8; i += NTH) {
    const int row = i / (C / 8), part = i % (C / 8);
    const bool valid = row < nvalid;
    cp_async16(dst + row * (C + 8) + 8 * part, valid ? src + row * ld + 8 * part : src, valid);
  }
}

template <typename T, int D, int C, int NTH = NT>
__device__ __forceinline__ void load_fwd_chunk(const Problem& p, const ChunkPrep& prep, FwdStateBuf<T, D, C>& B,
                                               int c, int64_t bh, int j0, bool with_u, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_scratch_rows<T, D, NTH>(B.w, prep.w, cp, tid);
  load_chunk_rows<T, D, NTH>(B.k, p.k, cp, tid);
  // columns j0..j0+C of u
  if (with_u) load_col_block<T, C, NTH>(B.u, static_cast<const T*>(prep.u) + cp.row0 * D + j0, D, CH, tid);
  load_meta(B.meta, prep.meta, cp.row0, tid);
}

// The initial state H (weight f) that a document begun inside chunk c carries out of it
// when the chunk's last token lies in that document's first segment (delta_chunk_docs.h),
// else null. Read once a chunk, only when fo.doc_f is set (never without document states).
template <int D>
__device__ __forceinline__ const float* doc_carry(const Problem& p, const ChunkStatesOut& fo, int64_t bh, int c,
                                                  int64_t npad, float& f) {
  const int64_t left = p.n - static_cast<int64_t>(c) * CH;
  const int64_t r = bh * npad + static_cast<int64_t>(c) * CH + (left < CH ? left : CH) - 1;
  f = fo.doc_f[r];
  return f != 0.f ? fo.doc_initial + static_cast<int64_t>(fo.doc_idx[r]) * D * D : nullptr;
}

// v_new = u - w S; S <- e S + K^T diag(d) v_new for every chunk. Blocks x < D / C carry
// state columns; with `sum` (grid x = 2 D / C) blocks x < D / C carry the columns of A
// and the others those of M (the state from zero), written at the end to sum.{A, M,
// head_A, head_M}.
template <typename T, int D, int C, int NS>
__global__ void __launch_bounds__(NT) fwd_state_kernel(Problem p, ChunkPrep prep, ChunkStatesOut fo,
                                                       ChunkSummaryOut sum) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int MT = D / 64;  // 16-row m-tiles of state rows per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int LDC = C + 8, NTL = C / 8;  // n8 tiles of the block's columns
  FwdStateSmem<T, D, C, NS>& sm = *reinterpret_cast<FwdStateSmem<T, D, C, NS>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool summary = sum.A != nullptr;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(summary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH;
  const int64_t se = static_cast<int64_t>(D) * D;
  const float* entering = summary ? nullptr : fo.entering;

  float S[MT][NTL][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_state<D>(S[mt], amap, entering, bh * se, warp * (D / 4) + 16 * mt, j0, lane);
  if (amap) zero_ring_u<T, NT, CH * LDC>(sm.buf, tid);
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load_fwd_chunk<T, D, C>(p, prep, sm.buf[i], i, bh, j0, !amap, tid);
    cp_async_commit();
  }
  for (int c = 0; c < nck; ++c) {
    FwdStateBuf<T, D, C>& B = sm.buf[c % NS];
    cp_async_wait_upto<NS - 2>();  // chunk c's group has landed
    // the carried columns: 16-bit copy for the products, and the per-chunk outputs
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * hf;
          const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
          const float s0 = S[mt][nt][2 * hf], s1 = S[mt][nt][2 * hf + 1];
          store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
          if (!summary) {
            const int64_t at = (bh * nck + c) * se;
            if (fo.states != nullptr) store_u32(static_cast<T*>(fo.states) + at + row * D + col, pack2<T>(s0, s1));
            if (fo.ckpt != nullptr) {
              fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
              fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
            }
          }
        }
    // every warp is past chunk c - 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c + NS - 1 < nck) load_fwd_chunk<T, D, C>(p, prep, sm.buf[(c + NS - 1) % NS], c + NS - 1, bh, j0, !amap, tid);
    cp_async_commit();
    const float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    {  // v_new = u - w S (token rows of this warp); ys = diag(d) v_new
      float acc[NTL][4];
      zero(acc);
      mma_rows<T, NTL, false>(acc, B.w, LD, sm.xb, LDC, 16 * warp, 0, D / 16, lane);
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = 16 * warp + (lane >> 2) + 8 * hf, cl = 8 * nt + 2 * (lane & 3);
          const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
          const float d = sx == sL ? __expf(GL - Gx) : 0.f;
          const float2 rr = unpack2<T>(load_u32(B.u + x * LDC + cl));
          const float v0 = rr.x - acc[nt][2 * hf], v1 = rr.y - acc[nt][2 * hf + 1];
          if (!summary && fo.v_new != nullptr)
            store_u32(static_cast<T*>(fo.v_new) + (bh * npad + static_cast<int64_t>(c) * CH + x) * D + j0 + cl,
                      pack2<T>(v0, v1));
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d, v1 * d));
        }
    }
    __syncthreads();
    {  // S <- e S + K^T ys
      const float e = sL == 0.f ? __expf(GL) : 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float(&acc)[NTL][4] = S[mt];
        scale_state(acc, e);
        mma_rows<T, NTL, true>(acc, B.k, LD, sm.ys, LDC, warp * (D / 4) + 16 * mt, 0, CH / 16, lane);
      }
    }
    if (fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) add_state<D>(S[mt], f, H, warp * (D / 4) + 16 * mt, j0, lane);
      }
    }
    // no barrier: the next chunk writes xb (last read before the barrier above) and
    // ys (read just now) only after its first barrier
  }
  cp_async_wait_all();
  store_pass_end<D>(fo, sum, amap, bh * se, S, warp * (D / 4), j0, lane);
}

// kLean: the copies of TileCopy / ColCopy / MetaCopy and the chunk states stored from xb
// (16 bytes a thread) instead of four 4-byte stores a thread from registers; else the
// earlier per-chunk addressing (LASP2_DELTA_STATE_KERNEL=w8calc, kept for the A/B).
template <typename T, int D, int C, int NS, bool kLean>
__global__ void __launch_bounds__(NT8, 2) fwd_state_kernel_w8(Problem p, ChunkPrep prep, ChunkStatesOut fo,
                                                          ChunkSummaryOut sum) {
  static_assert(D == 128, "8 warps x 16 state rows");
  constexpr int LD = TcTile<D>::LD, LDC = C + 8, NTL = C / 8, TPW = NTL / 2;  // n8 tiles: block, warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FwdStateSmem<T, D, C, NS>& sm = *reinterpret_cast<FwdStateSmem<T, D, C, NS>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool summary = sum.A != nullptr;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(summary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH;
  const int64_t se = static_cast<int64_t>(D) * D;
  const float* entering = summary ? nullptr : fo.entering;
  const int r0 = 16 * warp;                        // state rows of this warp
  const int x0 = 16 * (warp & 3), n0 = 8 * TPW * (warp >> 2);  // tokens and columns of its token tiles

  float S[NTL][4];
  load_state<D>(S, amap, entering, bh * se, r0, j0, lane);
  if (amap) zero_ring_u<T, NT8, CH * LDC>(sm.buf, tid);
  [[maybe_unused]] TileCopy<T, D, NT8> cw, ck;
  [[maybe_unused]] ColCopy<T, C, NT8> cu;
  [[maybe_unused]] MetaCopy cm;
  [[maybe_unused]] T* vn = nullptr;    // this thread's first v_new element of chunk 0
  [[maybe_unused]] T* st16 = nullptr;  // this thread's 16 bytes of chunk 0's state
  // the chunk states from xb when one 16-byte piece a thread covers them (C = 16; the
  // 32-column blocks run the summary, which writes no chunk states)
  constexpr bool kXbStates = kLean && D * C / 8 <= NT8;
  if constexpr (kLean) {
    const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
    const int64_t row0 = bh * npad;
    cw.init(static_cast<const T*>(prep.w) + row0 * D, D, sm.buf[0].w, tid);
    ck.init(rows_of<T>(p.k, b, h, p.begin), p.k.st, sm.buf[0].k, tid);
    cu.init(static_cast<const T*>(prep.u) + row0 * D + j0, D, sm.buf[0].u, tid);
    cm.init(prep.meta, row0, sm.buf[0].meta, tid);
    if (!summary && fo.v_new != nullptr)
      vn = static_cast<T*>(fo.v_new) + (row0 + x0 + (lane >> 2)) * D + j0 + n0 + 2 * (lane & 3);
    if (kXbStates && !summary && fo.states != nullptr && tid < D * C / 8)
      st16 = static_cast<T*>(fo.states) + bh * nck * se + (tid / (C / 8)) * D + j0 + 8 * (tid % (C / 8));
  }
  // chunk c into buffer c % NS
  auto load = [&](int c) {
    if constexpr (kLean) {
      const uint32_t off = static_cast<uint32_t>((c % NS) * sizeof(FwdStateBuf<T, D, C>));
      cw.issue(c, off, CH);
      ck.issue(c, off, chunk_rows(p, c));
      if (!amap) cu.issue(c, off, CH);
      cm.issue(c, off);
    } else {
      load_fwd_chunk<T, D, C, NT8>(p, prep, sm.buf[c % NS], c, bh, j0, !amap, tid);
    }
  };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load(i);
    cp_async_commit();
  }
  for (int c = 0; c < nck; ++c) {
    FwdStateBuf<T, D, C>& B = sm.buf[c % NS];
    cp_async_wait_upto<NS - 2>();  // chunk c's group has landed
    // the carried columns: 16-bit copy for the products, and the per-chunk outputs
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = r0 + (lane >> 2) + 8 * hf;
        const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
        const float s0 = S[nt][2 * hf], s1 = S[nt][2 * hf + 1];
        store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
        if (!summary) {
          const int64_t at = (bh * nck + c) * se;
          if (!kXbStates && fo.states != nullptr)
            store_u32(static_cast<T*>(fo.states) + at + row * D + col, pack2<T>(s0, s1));
          if (fo.ckpt != nullptr) {
            fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
            fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
          }
        }
      }
    // every warp is past chunk c - 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c + NS - 1 < nck) load(c + NS - 1);
    cp_async_commit();
    if constexpr (kXbStates) {  // the chunk's 16-bit state from xb, 16 bytes a thread (all NT8 at C = 16)
      if (st16 != nullptr) {
        const int row = tid / (C / 8), part = tid % (C / 8);
        *reinterpret_cast<uint4*>(st16 + static_cast<int64_t>(c) * se) =
            *reinterpret_cast<const uint4*>(sm.xb + row * LDC + 8 * part);
      }
    }
    const float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    {  // v_new = u - w S (this warp's token tiles); ys = diag(d) v_new
      float acc[TPW][4] = {};
      mma_row_tiles<T, D / 16, TPW>(acc, B.w, LD, sm.xb, LDC, x0, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
        const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
        const float d = sx == sL ? chunk_exp<kLean>(GL - Gx) : 0.f;
#pragma unroll
        for (int t = 0; t < TPW; ++t) {
          const int cl = n0 + 8 * t + 2 * (lane & 3);
          const float2 rr = unpack2<T>(load_u32(B.u + x * LDC + cl));
          const float v0 = rr.x - acc[t][2 * hf], v1 = rr.y - acc[t][2 * hf + 1];
          if constexpr (kLean) {
            if (vn != nullptr) store_u32(vn + (static_cast<int64_t>(c) * CH + 8 * hf) * D + 8 * t, pack2<T>(v0, v1));
          } else if (!summary && fo.v_new != nullptr) {
            store_u32(static_cast<T*>(fo.v_new) + (bh * npad + static_cast<int64_t>(c) * CH + x) * D + j0 + cl,
                      pack2<T>(v0, v1));
          }
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d, v1 * d));
        }
      }
    }
    __syncthreads();
    {  // S <- e S + K^T ys (this warp's state rows)
      const float e = sL == 0.f ? chunk_exp<kLean>(GL) : 0.f;
      scale_state(S, e);
      mma_rows_halves<T, NTL>(S, B.k, LD, sm.ys, LDC, r0, lane);
    }
    if (fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) add_state<D>(S, f, H, r0, j0, lane);
    }
    // no barrier: the next chunk writes xb (last read before the barrier above) and
    // ys (read just now) only after its first barrier
  }
  cp_async_wait_all();
  // store_pass_end's work written out (see there why)
  float* dst[2] = {amap ? sum.A : sum.M, amap ? sum.head_A : sum.head_M};
  if (!summary) dst[0] = fo.leaving, dst[1] = nullptr;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    if (dst[which] == nullptr) continue;
    store_state<D>(dst[which] + bh * se, S, r0, j0, lane);
  }
}

// ---- the state passes on whole-tile copies (sm_90: "tma", the default there) ------------
// w8 copies each chunk's w and K (the reverse pass k, w and q) as 4 cp.async pieces a
// thread and tile, each with its predicate and offsets (9 / 13 copies a thread a chunk);
// the pass is latency-bound with two warps a scheduler, so those instructions sit on the
// chunk's path. Here thread 0 copies each tile as two 64-column boxes of a tensor map
// (128-byte swizzle, the ldmatrix addresses swizzled to match), counted on one mbarrier a
// ring buffer (`full`); the 16 columns of u (reverse: r, dO) and the meta stay cp.async
// pieces. At T = 64K, H = 16 on an H200: states 1.34 -> 0.95 ms, rstates 1.81 -> 1.32
// (docs/history/delta-rule-log.md, twelfth round; there also the clusters of 2 with multicast copies,
// 1.64 / 1.94 ms, not kept).
// The shared memory: TmaStateSmem (delta_chunk_tma.cuh).

// The forward state pass (v_new, the 16-bit chunk states, the leaving state; C = 16) or,
// with kSummary, the part summary (C columns of [A | M], launched with 32; 16 measured
// slower, docs/history/delta-rule-log.md thirteenth round: grid x = 2 D / C,
// blocks x < D / C the columns of A from I with u = 0, the others M's from zero; no
// per-chunk outputs) of fwd_state_kernel_w8 (kLean) with the tiles above: the same
// products in the same order, so every output equals w8's (at the same C) bit for bit.
// The epilogue's decays d, its u values and the state's decay e are formed before the
// token product: written after it, the second token half's meta loads, MUFU and u loads
// follow the first half's ys stores (ptxas cannot tell the shared addresses apart), two
// dependent chains after the last HMMA. At T = 64K on an H200 states 0.95 -> 0.91 ms
// (16K: 0.25 -> 0.24); issuing the ring's refill after the product instead (where the warp
// waits on the mma chain) measured slower, 1.05 ms, and so did both (docs/history/delta-rule-log.md,
// "State passes, fifteenth round").
template <typename T, int NS, int C = kChunkCols, bool kSummary = false>
__global__ void __launch_bounds__(NT8, 2)
    fwd_state_kernel_tma(Problem p, ChunkPrep prep, ChunkStatesOut fo, const __grid_constant__ CUtensorMap wmap,
                         const __grid_constant__ CUtensorMap kmap, KMapDims kd, ChunkSummaryOut sum) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it on sm_90 and later only
#else
  constexpr int D = 128, LDC = C + 8, NTL = C / 8, TPW = NTL / 2;  // n8 tiles: block, warp (token product)
  static_assert(C == kChunkCols || (kSummary && C == 2 * kChunkCols), "16 columns (32: the summary only)");
  constexpr uint32_t kBufBytes = 2 * 2 * kSwzHalf;  // w and K of a buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TmaStateSmem<T, NS, C>& sm = *reinterpret_cast<TmaStateSmem<T, NS, C>*>(smem_raw + swizzle_pad(smem_raw));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(kSummary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH, row0 = bh * npad;
  const int64_t se = static_cast<int64_t>(D) * D;
  const int r0 = 16 * warp;                          // state rows of this warp
  const int x0 = 16 * (warp & 3), n0 = 8 * TPW * (warp >> 2);  // tokens and columns of its token tiles

  float S[NTL][4];
  load_state<D>(S, amap, kSummary ? nullptr : fo.entering, bh * se, r0, j0, lane);
  init_full_barriers(sm.full, tid);
  __syncthreads();
  FwdColCopies<T, NS, C> cols;
  cols.init(prep.u, prep.meta, row0, j0, sm, tid);
  T* const vn = !kSummary && fo.v_new != nullptr
                    ? static_cast<T*>(fo.v_new) + (row0 + x0 + (lane >> 2)) * D + j0 + n0 + 2 * (lane & 3)
                    : nullptr;
  T* const st16 = !kSummary && fo.states != nullptr
                      ? static_cast<T*>(fo.states) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1)
                      : nullptr;
  const uint32_t tiles0 = smem_u32(&sm.tiles[0][0][0]);
  // this lane's ldmatrix pieces at k-step 0: w (token rows x0..), K^T (state rows r0..)
  const uint32_t aw = (x0 + (lane & 15)) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t ak = (r0 >> 6) * kSwzHalf + (8 * (lane >> 4) + (lane & 7)) * 128 +
                      ((((r0 & 63) >> 3) + ((lane >> 3) & 1)) ^ (lane & 7)) * 16;
  // chunk c's w and K into buffer c % NS (thread 0), both halves of each
  const int hb[3] = {static_cast<int>(bh % p.heads), 0, static_cast<int>(bh / p.heads)};
  auto issue_tiles = [&](int c) {
    const int s = c % NS, t = c * CH;
    mbar_arrive_expect_tx(&sm.full[s], kBufBytes);
    const uint32_t dst = tiles0 + s * kBufBytes;
    // the K map's coordinates 1..3 (h, t, b in the host's order)
    const int y = kd.h == 1 ? hb[0] : kd.t == 1 ? t : hb[2];
    const int z = kd.h == 2 ? hb[0] : kd.t == 2 ? t : hb[2];
    const int w = kd.h == 3 ? hb[0] : kd.t == 3 ? t : hb[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tma_box_2d(dst + half * kSwzHalf, &wmap, 64 * half, static_cast<int>(row0) + t, &sm.full[s]);
      tma_box_4d(dst + (2 + half) * kSwzHalf, &kmap, 64 * half, y, z, w, &sm.full[s]);
    }
  };
  auto issue_own = [&](int c) { cols.issue(c, !amap); };  // chunk c's u and meta
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int c = 0; c < nck; ++c) {
    const int s = c % NS;
    cp_async_wait_upto<NS - 2>();  // chunk c's u and meta have landed
    // the carried columns: 16-bit copy for the products (and the chunk state), checkpoints
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = r0 + (lane >> 2) + 8 * hf;
        const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
        const float s0 = S[nt][2 * hf], s1 = S[nt][2 * hf + 1];
        store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
        if (!kSummary && fo.ckpt != nullptr) {
          const int64_t at = (bh * nck + c) * se;
          fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
          fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
        }
      }
    mbar_wait(&sm.full[s], (c / NS) & 1);  // chunk c's w and K have landed
    // every warp is past chunk c - 1 (its buffer is free here) and sees chunk c and xb
    __syncthreads();
    // the ring's refill of buffer (c - 1) % NS (free: every warp is past chunk c - 1) and
    // the chunk's 16-bit state from xb (rewritten only after the next chunk's first barrier)
    ring_issue(c + NS - 1, nck, tid, issue_tiles, issue_own);
    if (st16 != nullptr) store_xb_piece(st16 + static_cast<int64_t>(c) * se, sm.xb, LDC, tid);
    const float* meta = sm.gate[s];
    const T* u = sm.u[s];
    const float GL = meta[2 * (CH - 1)], sL = meta[2 * (CH - 1) + 1];
    const uint32_t wt = tiles0 + s * kBufBytes;
    // the state's decay e, off the second product's path
    const float e = sL == 0.f ? lasp2::cuda::exp_ftz(GL) : 0.f;
    {  // v_new = u - w S (this warp's token tiles; u = 0 for the columns of A); ys = diag(d) v_new
      // both token halves' d and u before the product
      float d[2];
      float2 uu[2][TPW];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
        const float Gx = meta[2 * x], sx = meta[2 * x + 1];
        d[hf] = sx == sL ? lasp2::cuda::exp_ftz(GL - Gx) : 0.f;
#pragma unroll
        for (int t = 0; t < TPW; ++t)
          uu[hf][t] = amap ? make_float2(0.f, 0.f) : unpack2<T>(load_u32(u + x * LDC + n0 + 8 * t + 2 * (lane & 3)));
      }
      float acc[TPW][4] = {};
      mma_w_swizzled<T, TPW>(acc, wt + aw, sm.xb, LDC, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
#pragma unroll
        for (int t = 0; t < TPW; ++t) {
          const int cl = n0 + 8 * t + 2 * (lane & 3);
          const float v0 = uu[hf][t].x - acc[t][2 * hf], v1 = uu[hf][t].y - acc[t][2 * hf + 1];
          if (vn != nullptr) store_u32(vn + (static_cast<int64_t>(c) * CH + 8 * hf) * D + 8 * t, pack2<T>(v0, v1));
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d[hf], v1 * d[hf]));
        }
      }
    }
    __syncthreads();
    {  // S <- e S + K^T ys (this warp's state rows)
      scale_state(S, e);
      mma_k_swizzled<T, NTL>(S, wt + 2 * kSwzHalf + ak, sm.ys, LDC, lane);
    }
    if (!kSummary && fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) add_state<D>(S, f, H, r0, j0, lane);
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier
  }
  cp_async_wait_all();
  if constexpr (kSummary) {
    float* const dst[2] = {amap ? sum.A : sum.M, amap ? sum.head_A : sum.head_M};
#pragma unroll
    for (int which = 0; which < 2; ++which)
      if (dst[which] != nullptr) store_state<D>(dst[which] + bh * se, S, r0, j0, lane);
  } else if (fo.leaving != nullptr) {
    store_state<D>(fo.leaving + bh * se, S, r0, j0, lane);
  }
#endif
}

}  // namespace

// The forward state pass (C = 16) or, with kSummary, the part summary (sum) on
// fwd_state_kernel_tma; false (nothing launched) where it cannot run: before sm_90, a
// binary without sm_90 code, strides a tensor map cannot take.
template <typename T, int C = kChunkCols, bool kSummary = false>
bool launch_fwd_states_tma(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out,
                           const ChunkSummaryOut& sum, cudaStream_t s) {
  constexpr int D = 128;
  const int64_t nck = chunk_count(p), rows = p.bh() * nck * CH;
  if (rows >= (int64_t{1} << 31) || p.heads <= 0 || p.batch <= 0) return false;
  CUtensorMap wmap, kmap;
  if (!encode_chunk_rows_map<T>(&wmap, prep.w, rows)) return false;  // w: [bh * nck * 64 rows][D]
  KMapDims kd{};
  if (!encode_token_map<T>(&kmap, kd, p.k, p, CH)) return false;
  const dim3 grid((kSummary ? 2 : 1) * D / C, static_cast<unsigned>(p.bh()));
  auto run = [&](auto kernel, int ns) {
    if (!runs_sm90(kernel)) return false;
    // + 1024: the tiles' alignment for the swizzle
    const int bytes =
        static_cast<int>((ns == 4 ? sizeof(TmaStateSmem<T, 4, C>) : sizeof(TmaStateSmem<T, 2, C>)) + 1024);
    launch_tma_pass(kernel, grid, bytes, s, p, prep, out, wmap, kmap, kd, sum);
    return true;
  };
  // ring depth 4 when the blocks fit the device in one wave (one block an SM), else 2
  const bool one_wave = static_cast<int64_t>(grid.x) * p.bh() <= lasp2::cuda::device_info().sms;
  return one_wave ? run(fwd_state_kernel_tma<T, 4, C, kSummary>, 4) : run(fwd_state_kernel_tma<T, 2, C, kSummary>, 2);
}

// The forward state pass and the part summary. At d = 128 the 8-warp kernel: 16 columns
// a block for the state pass, 32 for the summary (whose 2 d columns a (b, h) would
// otherwise take two blocks an SM, each reading w and K). Measured at T = 64K, H = 16,
// bf16 on an H200 (docs/history/delta-rule-log.md, "State passes, seventh round"): states 1.36 ms
// with 8 warps against 1.42 with 4 (2.19 with 32 columns: half the SMs, twice the
// work each); summary 1.50 with 32 columns against 1.70 (4 warps) and 1.73 (8 warps,
// 16 columns). The copies addressed once a block (w8 against w8calc, ninth round):
// states 1.37 -> 1.22, summary 1.43 -> 1.36 ms. Ring depth 4 when the blocks fit the
// device in one wave (one block an SM), else 2 (two blocks an SM hide each other's loads).
// On sm_90 the state pass runs on tensor-map copies by default (fwd_state_kernel_tma:
// 1.34 -> 0.95 ms against w8 in one call, twelfth round), and so does the summary, in
// 32-column blocks (1.43 -> 1.03 ms; 16-column blocks 1.20, thirteenth round).
template <typename T, int D>
void launch_fwd_states(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out, const ChunkSummaryOut& sum,
                       cudaStream_t s) {
  const StatePass pass = state_pass();
  if constexpr (D == 128) {
    auto w8 = [&](auto cols_tag, auto lean_tag) {
      constexpr int CW = decltype(cols_tag)::value;
      constexpr bool kLean = decltype(lean_tag)::value;
      const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / CW;
      const dim3 grid(cols, static_cast<unsigned>(p.bh()));
      auto run = [&](auto kernel, int bytes) {
        allow(kernel, bytes, "chunk state smem");
        kernel<<<grid, NT8, bytes, s>>>(p, prep, out, sum);
      };
      if (static_cast<int64_t>(cols) * p.bh() <= lasp2::cuda::device_info().sms)
        return run(fwd_state_kernel_w8<T, D, CW, 4, kLean>, static_cast<int>(sizeof(FwdStateSmem<T, D, CW, 4>)));
      run(fwd_state_kernel_w8<T, D, CW, 2, kLean>, static_cast<int>(sizeof(FwdStateSmem<T, D, CW, 2>)));
    };
    auto w8_cols = [&](auto lean_tag) {
      if (sum.A != nullptr) return w8(std::integral_constant<int, 2 * kChunkCols>{}, lean_tag);
      w8(std::integral_constant<int, kChunkCols>{}, lean_tag);
    };
    if (pass == StatePass::kTma || pass == StatePass::kDefault) {
      const bool done = sum.A == nullptr ? launch_fwd_states_tma<T>(p, prep, out, sum, s)
                                         : launch_fwd_states_tma<T, 2 * kChunkCols, true>(p, prep, out, sum, s);
      if (done) return;
      if (pass == StatePass::kTma) fail_tma_unavailable();
    }
    if (pass == StatePass::kW8 || pass == StatePass::kDefault) return w8_cols(std::true_type{});
    if (pass == StatePass::kW8Calc) return w8_cols(std::false_type{});
  }
  constexpr int C = kChunkCols;
  const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / C;
  const dim3 grid(cols, static_cast<unsigned>(p.bh()));
  if (static_cast<int64_t>(cols) * p.bh() <= lasp2::cuda::device_info().sms) {
    const int bytes = static_cast<int>(sizeof(FwdStateSmem<T, D, C, 4>));
    allow(fwd_state_kernel<T, D, C, 4>, bytes, "chunk state smem");
    fwd_state_kernel<T, D, C, 4><<<grid, NT, bytes, s>>>(p, prep, out, sum);
  } else {
    const int bytes = static_cast<int>(sizeof(FwdStateSmem<T, D, C, 2>));
    allow(fwd_state_kernel<T, D, C, 2>, bytes, "chunk state smem");
    fwd_state_kernel<T, D, C, 2><<<grid, NT, bytes, s>>>(p, prep, out, sum);
  }
}

void launch_chunk_states(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out, cudaStream_t s) {
  if (p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    launch_fwd_states<decltype(tag), decltype(dim)::value>(p, prep, out, ChunkSummaryOut{}, s);
  });
  check(cudaGetLastError(), "chunk state kernel");
}

void launch_chunk_summary(const Problem& p, const ChunkPrep& prep, const ChunkSummaryOut& out, cudaStream_t s) {
  if (p.bh() == 0) return;
  if (out.A == nullptr || out.M == nullptr) fail("lasp2 (CUDA delta rule, chunked): the summary needs A and M");
  dispatch(p, [&](auto tag, auto dim) {
    launch_fwd_states<decltype(tag), decltype(dim)::value>(p, prep, ChunkStatesOut{}, out, s);
  });
  check(cudaGetLastError(), "chunk summary kernel");
}

}  // namespace lasp2::delta::gpu
