// The reverse state pass of the chunked GDN (delta_chunk.h "rstates"): backwards over a
// part's chunks, the gradient of each chunk's leaving state in registers. Three kernels,
// chosen by LASP2_DELTA_STATE_KERNEL as the forward pass's (delta_chunk_state.cuh):
// rev_state_kernel (4 warps; d = 64), rev_state_kernel_w8 (8 warps) and
// rev_state_kernel_tma (8 warps on tensor-map copies, sm_90: the default there).
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_launch.cuh"
#include "delta_rule/cuda/delta_chunk_state.cuh"
#include "delta_rule/cuda/delta_chunk_tma.cuh"
#include "delta_rule/cuda/tma_copy.cuh"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- the reverse state pass (sequential over chunks; the forward one is fwd_state_kernel,
// delta_chunk_states.cu) ---------------------------------------------------------------------
// One block per (b, h) and BV state columns, backwards over the chunks, with the inputs
// of the next kRevStages - 1 chunks in flight (a cp.async ring, as the forward pass).
// Per buffer: a1 = k, a2 = w, a3 = q, r = r, d = dO.
constexpr int kRevStages = 3;  // 3 x 58 KiB at d = 128: one block an SM with room to spare
template <typename T, int D>
struct StateBuf {
  static constexpr int LD = TcTile<D>::LD;
  T a1[CH * LD];
  T a2[CH * LD];
  T a3[CH * LD];
  T r[CH * LDV];
  T d[CH * LDV];
  float meta[2 * CH];
};
template <typename T, int D>
using StateSmem = StateRingSmem<T, StateBuf<T, D>, kRevStages, D, LDV>;  // xb: the carried gradient, [d][16]

template <typename T, int D, int NTH = NT>
__device__ __forceinline__ void load_state_chunk(const Problem& p, const View& dout, const ChunkPrep& prep,
                                                 StateBuf<T, D>& B, int c, int64_t bh, int j0, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  const T* w = static_cast<const T*>(prep.w) + cp.row0 * D;
  const T* k = rows_of<T>(p.k, cp.b, cp.h, cp.t0);
  const T* r = static_cast<const T*>(prep.u) + cp.row0 * D;
  load_tile<T, D, NTH>(B.a1, k, p.k.st, cp.nvalid, D, tid);
  load_tile<T, D, NTH>(B.a2, w, D, CH, D, tid);
  load_chunk_rows<T, D, NTH>(B.a3, p.q, cp, tid);
  if (tid < NT) {  // the column tiles: 2 CH = NT pieces
    load_cols<T>(B.d, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, j0, cp.nvalid, tid);
    load_cols<T>(B.r, r, D, j0, CH, tid);
  }
  load_meta(B.meta, prep.meta, cp.row0, tid);
}

// X and its 16-bit copy xb = F (offset to the (b, h) state): the 4-warp pass's MT
// m-tiles of rows from r0, the 8-warp passes' one.
template <typename T, int D, int MT>
__device__ __forceinline__ void load_carried_xb(float (&S)[MT][2][4], T* xb, const float* F, int r0, int j0,
                                                int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_state_xb<T, D>(S[mt], xb, LDV, F, r0 + 16 * mt, j0, lane);
}
template <typename T, int D>
__device__ __forceinline__ void load_carried_xb(float (&S)[2][4], T* xb, const float* F, int r0, int j0, int lane) {
  load_state_xb<T, D>(S, xb, LDV, F, r0, j0, lane);
}

// A document that ends inside chunk c (delta_chunk_docs.h): its final-state gradient F
// takes X's place (S and its 16-bit copy xb), and the chunk's decay to the chunk's end
// becomes the document's end gradient's (GL, sL = 0). Block-uniform; the barriers: the
// chunk's dh copy of xb is done before, every warp sees F's xb after.
template <typename T, int D, typename State>
__device__ __forceinline__ void doc_end_in_place(const ChunkReverseOut& ro, int64_t bh, int nck, int c, int64_t se,
                                                 float& GL, float& sL, State& S, T* xb, int r0, int j0, int lane) {
  if (ro.doc_end_idx != nullptr && ro.doc_end_idx[bh * nck + c] >= 0) {
    const float* F = ro.doc_final + static_cast<int64_t>(ro.doc_end_idx[bh * nck + c]) * se;
    __syncthreads();  // dh's copy of xb is done
    load_carried_xb<T, D>(S, xb, F, r0, j0, lane);
    __syncthreads();
    GL = ro.doc_end_g[bh * nck + c];
    sL = 0.f;
  }
}

// Backwards over the chunks: X leaving chunk c -> dh (16-bit); y = r - diag(d) K X;
// X <- e X + w^T y + Q^T diag(c) dO.
template <typename T, int D>
__global__ void __launch_bounds__(NT) rev_state_kernel(Problem p, View dout, ChunkPrep prep, ChunkReverseOut ro) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int MT = D / 64;  // 16-row m-tiles of state rows per warp
  constexpr int NS = kRevStages;
  static_assert(NS == 3, "cp_async_wait_group1 below waits for the oldest of NS - 1 = 2 groups");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StateSmem<T, D>& sm = *reinterpret_cast<StateSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = blockIdx.x * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t se = static_cast<int64_t>(D) * D;

  float S[MT][2][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_state<D>(S[mt], false, ro.leaving, bh * se, warp * (D / 4) + 16 * mt, j0, lane);
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load_state_chunk<T, D>(p, dout, prep, sm.buf[i], nck - 1 - i, bh, j0, tid);
    cp_async_commit();
  }
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i;
    StateBuf<T, D>& B = sm.buf[i % NS];
    cp_async_wait_group1();  // chunk c's group has landed
    // the carried gradient: 16-bit copy for the products (and each chunk's dh)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_rows<T, 2>(sm.xb, LDV, S[mt], warp * (D / 4) + 16 * mt, lane);
    // every warp is past chunk c + 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (i + NS - 1 < nck) load_state_chunk<T, D>(p, dout, prep, sm.buf[(i + NS - 1) % NS], c - (NS - 1), bh, j0, tid);
    cp_async_commit();
    if (ro.dh != nullptr) {  // xb's rows, 16 bytes a store: 2 D / NT a thread
      T* dst = static_cast<T*>(ro.dh) + (bh * nck + c) * se + j0;
#pragma unroll
      for (int e = tid; e < 2 * D; e += NT) {
        const int row = e >> 1, part = e & 1;
        *reinterpret_cast<uint4*>(dst + row * D + 8 * part) =
            *reinterpret_cast<const uint4*>(sm.xb + row * LDV + 8 * part);
      }
    }
    float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    doc_end_in_place<T, D>(ro, bh, nck, c, se, GL, sL, S, sm.xb, warp * (D / 4), j0, lane);
    {  // y = r - diag(d) K X (token rows of this warp)
      float acc[2][4];
      zero(acc);
      mma_rows<T, 2, false>(acc, B.a1, LD, sm.xb, LDV, 16 * warp, 0, D / 16, lane);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = 16 * warp + (lane >> 2) + 8 * hf, cl = 8 * nt + 2 * (lane & 3);
          const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
          const float d = sx == sL ? __expf(GL - Gx) : 0.f;
          const float2 rr = unpack2<T>(load_u32(B.r + x * LDV + cl));
          store_u32(sm.ys + x * LDV + cl, pack2<T>(rr.x - d * acc[nt][2 * hf], rr.y - d * acc[nt][2 * hf + 1]));
          const float cx = sx == 0.f ? p.scale * __expf(Gx) : 0.f;
          const float2 dd = unpack2<T>(load_u32(B.d + x * LDV + cl));
          store_u32(B.d + x * LDV + cl, pack2<T>(dd.x * cx, dd.y * cx));
        }
    }
    __syncthreads();
    {  // X <- e X + a2^T ys + q^T diag(c) dO
      const float e = sL == 0.f ? __expf(GL) : 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float(&acc)[2][4] = S[mt];
        scale_state(acc, e);
        const int r0 = warp * (D / 4) + 16 * mt;
        mma_rows<T, 2, true>(acc, B.a2, LD, sm.ys, LDV, r0, 0, CH / 16, lane);
        mma_rows<T, 2, true>(acc, B.a3, LD, B.d, LDV, r0, 0, CH / 16, lane);
      }
    }
    // no barrier: the next chunk writes xb (last read before the barrier above) and ys
    // (read just now) only after its first barrier, and refills this buffer after it
  }
  cp_async_wait_all();
  if (ro.entering != nullptr) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_state<D>(ro.entering + bh * se, S[mt], warp * (D / 4) + 16 * mt, j0, lane);
  }
}

// kLean: the copies addressed once a block (TileCopy, ColCopy, MetaCopy) and dh's
// pointer formed once; else the per-chunk load_state_chunk (w8calc, for the A/B).
template <typename T, int D, bool kLean>
__global__ void __launch_bounds__(NT8) rev_state_kernel_w8(Problem p, View dout, ChunkPrep prep, ChunkReverseOut ro) {
  static_assert(D == 128, "8 warps x 16 state rows");
  constexpr int LD = TcTile<D>::LD;
  constexpr int NS = kRevStages;
  static_assert(NS == 3, "cp_async_wait_group1 below waits for the oldest of NS - 1 = 2 groups");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  StateSmem<T, D>& sm = *reinterpret_cast<StateSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = blockIdx.x * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t se = static_cast<int64_t>(D) * D;
  const int r0 = 16 * warp;
  const int x0 = 16 * (warp & 3), n0 = 8 * (warp >> 2);

  float S[2][4];
  load_state<D>(S, false, ro.leaving, bh * se, r0, j0, lane);
  [[maybe_unused]] TileCopy<T, D, NT8> ck, cw, cq;
  [[maybe_unused]] ColCopy<T, BV, NT8> cd, cr;
  [[maybe_unused]] MetaCopy cm;
  [[maybe_unused]] T* dh16 = nullptr;  // this thread's 16 bytes of dh (row tid / 2) of chunk 0
  if constexpr (kLean) {
    const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
    const int64_t row0 = bh * nck * CH;
    if (ro.dh != nullptr) dh16 = static_cast<T*>(ro.dh) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1);
    ck.init(rows_of<T>(p.k, b, h, p.begin), p.k.st, sm.buf[0].a1, tid);
    cw.init(static_cast<const T*>(prep.w) + row0 * D, D, sm.buf[0].a2, tid);
    cq.init(rows_of<T>(p.q, b, h, p.begin), p.q.st, sm.buf[0].a3, tid);
    cd.init(rows_of<T>(dout, b, h, p.begin) + j0, dout.st, sm.buf[0].d, tid);
    cr.init(static_cast<const T*>(prep.u) + row0 * D + j0, D, sm.buf[0].r, tid);
    cm.init(prep.meta, row0, sm.buf[0].meta, tid);
  }
  // chunk c into buffer s
  auto load = [&](int c, int s) {
    if constexpr (kLean) {
      const uint32_t off = static_cast<uint32_t>(s * sizeof(StateBuf<T, D>));
      const int nv = chunk_rows(p, c);
      ck.issue(c, off, nv);
      cw.issue(c, off, CH);
      cq.issue(c, off, nv);
      cd.issue(c, off, nv);
      cr.issue(c, off, CH);
      cm.issue(c, off);
    } else {
      load_state_chunk<T, D, NT8>(p, dout, prep, sm.buf[s], c, bh, j0, tid);
    }
  };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load(nck - 1 - i, i);
    cp_async_commit();
  }
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i;
    StateBuf<T, D>& B = sm.buf[i % NS];
    cp_async_wait_group1();  // chunk c's group has landed
    store_rows<T, 2>(sm.xb, LDV, S, r0, lane);
    // every warp is past chunk c + 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (i + NS - 1 < nck) load(c - (NS - 1), (i + NS - 1) % NS);
    cp_async_commit();
    if constexpr (kLean) {  // xb's rows, 16 bytes a store: one a thread (NT8 = 2 D)
      if (dh16 != nullptr) store_xb_piece(dh16 + static_cast<int64_t>(c) * se, sm.xb, LDV, tid);
    } else if (ro.dh != nullptr) {  // xb's rows, 16 bytes a store: one a thread
      T* dst = static_cast<T*>(ro.dh) + (bh * nck + c) * se + j0;
      const int row = tid >> 1, part = tid & 1;  // NT8 = 2 D
      *reinterpret_cast<uint4*>(dst + row * D + 8 * part) = *reinterpret_cast<const uint4*>(sm.xb + row * LDV + 8 * part);
    }
    float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    // doc_end_in_place written out: through it (a lambda for the load, or not) this
    // kernel's chunk-loop address arithmetic compiled in another order (other PTX)
    if (ro.doc_end_idx != nullptr && ro.doc_end_idx[bh * nck + c] >= 0) {  // F in X's place (delta_chunk_docs.h)
      const float* F = ro.doc_final + static_cast<int64_t>(ro.doc_end_idx[bh * nck + c]) * se;
      __syncthreads();  // dh's copy of xb is done
      load_state_xb<T, D>(S, sm.xb, LDV, F, r0, j0, lane);
      __syncthreads();
      GL = ro.doc_end_g[bh * nck + c];
      sL = 0.f;
    }
    {  // y = r - diag(d) K X (this warp's token tile); dO scaled by c in place
      float acc1[1][4] = {};
      mma_row_tiles<T, D / 16, 1>(acc1, B.a1, LD, sm.xb, LDV, x0, n0, lane);
      const float(&acc)[4] = acc1[0];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf, cl = n0 + 2 * (lane & 3);
        const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
        const float d = sx == sL ? chunk_exp<kLean>(GL - Gx) : 0.f;
        const float2 rr = unpack2<T>(load_u32(B.r + x * LDV + cl));
        store_u32(sm.ys + x * LDV + cl, pack2<T>(rr.x - d * acc[2 * hf], rr.y - d * acc[2 * hf + 1]));
        const float cx = sx == 0.f ? p.scale * chunk_exp<kLean>(Gx) : 0.f;
        const float2 dd = unpack2<T>(load_u32(B.d + x * LDV + cl));
        store_u32(B.d + x * LDV + cl, pack2<T>(dd.x * cx, dd.y * cx));
      }
    }
    __syncthreads();
    {  // X <- e X + w^T ys + q^T diag(c) dO: four accumulators, eight chains of two
      const float e = sL == 0.f ? chunk_exp<kLean>(GL) : 0.f;
      float oq[2][4] = {};
      scale_state(S, e);
      mma_rows_halves<T, 2>(S, B.a2, LD, sm.ys, LDV, r0, lane);
      mma_rows_halves<T, 2>(oq, B.a3, LD, B.d, LDV, r0, lane);
      add_frags(S, oq);
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier, and
    // refills this buffer after it
  }
  cp_async_wait_all();
  if (ro.entering != nullptr) store_state<D>(ro.entering + bh * se, S, r0, j0, lane);
}

// The reverse state pass (dh, the entering gradient) of rev_state_kernel_w8 (kLean) on the
// tiles of fwd_state_kernel_tma (delta_chunk_states.cu): each chunk's k, w and q as
// tensor-map boxes (three tiles, 48 KiB), dO's and r's 16 columns and the meta as cp.async
// pieces, a ring of kRevStages buffers walked backwards. The same products in the same order as w8, so every output equals
// w8's bit for bit.

// As in fwd_state_kernel_tma, the epilogue's decays and r values, dO's scaling and X's decay
// e come before the first product: at T = 64K rstates 1.34 -> 1.28 ms (docs/history/delta-rule-log.md,
// "State passes, fifteenth round").
// dO's scaling is stored late (sixteenth round): scaled and stored in a loop of its own
// before the product, the second token half's {G, s} and dO loads followed the first
// half's scaled dO store (the compiler cannot tell the shared places apart), so two chains
// of LDS -> MUFU -> FMUL -> STS (~100 cycles each, the H200 profile's short_scoreboard
// stalls at 64K) ran one after the other before the first ldmatrix. Here both halves' c
// and dO pairs are read in the first loop, and the scaled pairs are stored after the first
// product is issued (dO's tile is read only after the second barrier): rstates 1.27 ->
// 1.12 ms at 64K (docs/history/delta-rule-log.md, "Chunk backward and reverse pass,
// sixteenth round").
template <typename T>
__global__ void __launch_bounds__(NT8)
    rev_state_kernel_tma(Problem p, View dout, ChunkPrep prep, ChunkReverseOut ro,
                         const __grid_constant__ CUtensorMap kmap, const __grid_constant__ CUtensorMap wmap,
                         const __grid_constant__ CUtensorMap qmap, KMapDims kd, KMapDims qd) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it on sm_90 and later only
#else
  constexpr int D = 128, NS = kRevStages;
  constexpr uint32_t kBufBytes = 3 * 2 * kSwzHalf;  // k, w and q of a buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TmaRevSmem<T, kRevStages>& sm = *reinterpret_cast<TmaRevSmem<T, kRevStages>*>(smem_raw + swizzle_pad(smem_raw));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = blockIdx.x * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t se = static_cast<int64_t>(D) * D, row0 = bh * nck * CH;
  const int r0 = 16 * warp;
  const int x0 = 16 * (warp & 3), n0 = 8 * (warp >> 2);
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);

  float S[2][4];
  load_state<D>(S, false, ro.leaving, bh * se, r0, j0, lane);
  init_full_barriers(sm.full, tid);
  __syncthreads();
  RevColCopies<T, NS> cols;
  cols.init(rows_of<T>(dout, b, h, p.begin) + j0, dout.st, prep.u, prep.meta, row0, j0, sm, tid);
  T* const dh16 = ro.dh != nullptr ? static_cast<T*>(ro.dh) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1)
                                   : nullptr;
  const uint32_t tiles0 = smem_u32(&sm.tiles[0][0][0]);
  const uint32_t aw = (x0 + (lane & 15)) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t ak = (r0 >> 6) * kSwzHalf + (8 * (lane >> 4) + (lane & 7)) * 128 +
                      ((((r0 & 63) >> 3) + ((lane >> 3) & 1)) ^ (lane & 7)) * 16;
  // step i: chunk nck - 1 - i into buffer i % NS; thread 0 its tiles
  auto issue_tiles = [&](int i) {
    const int s = i % NS, t = (nck - 1 - i) * CH;
    mbar_arrive_expect_tx(&sm.full[s], kBufBytes);
    const uint32_t dst = tiles0 + s * kBufBytes;
    const int ky = kd.h == 1 ? h : kd.t == 1 ? t : b, kz = kd.h == 2 ? h : kd.t == 2 ? t : b,
              kw = kd.h == 3 ? h : kd.t == 3 ? t : b;
    const int qy = qd.h == 1 ? h : qd.t == 1 ? t : b, qz = qd.h == 2 ? h : qd.t == 2 ? t : b,
              qw = qd.h == 3 ? h : qd.t == 3 ? t : b;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tma_box_4d(dst + half * kSwzHalf, &kmap, 64 * half, ky, kz, kw, &sm.full[s]);
      tma_box_2d(dst + (2 + half) * kSwzHalf, &wmap, 64 * half, static_cast<int>(row0) + t, &sm.full[s]);
      tma_box_4d(dst + (4 + half) * kSwzHalf, &qmap, 64 * half, qy, qz, qw, &sm.full[s]);
    }
  };
  auto issue_own = [&](int i) { cols.issue(p, nck, i); };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i, s = i % NS;
    // the carried gradient to xb, the ring's refill of buffer (i - 1) % NS and dh's 16
    // bytes of this thread from xb (before a document's end gradient overwrites xb with F
    // below)
    ring_step_begin<NS>(i, nck, &sm.full[s], sm.xb, LDV, S, r0, dh16, c, se, tid, lane, issue_tiles, issue_own);
    const float* meta = sm.gate[s];
    T* const dd_t = sm.d[s];
    float GL = meta[2 * (CH - 1)], sL = meta[2 * (CH - 1) + 1];
    doc_end_in_place<T, D>(ro, bh, nck, c, se, GL, sL, S, sm.xb, r0, j0, lane);
    const uint32_t kt = tiles0 + s * kBufBytes;
    // X's decay e, both token halves' d and r and dO's scaling before the product
    const float e = sL == 0.f ? lasp2::cuda::exp_ftz(GL) : 0.f;
    {  // y = r - diag(d) K X (this warp's token tile); dO scaled by c in place
      float d[2];
      float2 rr[2];
      float cx[2];   // dO's scale
      float2 dd[2];  // dO's pair, scaled and stored after the product is issued
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf, cl = n0 + 2 * (lane & 3);
        const float Gx = meta[2 * x], sx = meta[2 * x + 1];
        d[hf] = sx == sL ? lasp2::cuda::exp_ftz(GL - Gx) : 0.f;
        rr[hf] = unpack2<T>(load_u32(sm.r[s] + x * LDV + cl));
        cx[hf] = sx == 0.f ? p.scale * lasp2::cuda::exp_ftz(Gx) : 0.f;
        dd[hf] = unpack2<T>(load_u32(dd_t + x * LDV + cl));
      }
      float acc[4] = {};
      mma_w_swizzled<T>(acc, kt + aw, sm.xb, LDV, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf, cl = n0 + 2 * (lane & 3);
        store_u32(dd_t + x * LDV + cl, pack2<T>(dd[hf].x * cx[hf], dd[hf].y * cx[hf]));
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf, cl = n0 + 2 * (lane & 3);
        store_u32(sm.ys + x * LDV + cl, pack2<T>(rr[hf].x - d[hf] * acc[2 * hf], rr[hf].y - d[hf] * acc[2 * hf + 1]));
      }
    }
    __syncthreads();
    {  // X <- e X + w^T ys + q^T diag(c) dO
      float oq[2][4] = {};
      scale_state(S, e);
      mma_k_swizzled<T>(S, kt + 2 * kSwzHalf + ak, sm.ys, LDV, lane);
      mma_k_swizzled<T>(oq, kt + 4 * kSwzHalf + ak, dd_t, LDV, lane);
      add_frags(S, oq);
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier
  }
  cp_async_wait_all();
  if (ro.entering != nullptr) store_state<D>(ro.entering + bh * se, S, r0, j0, lane);
#endif
}

}  // namespace

// The reverse state pass on rev_state_kernel_tma; false (nothing launched) where it
// cannot run, as launch_fwd_states_tma (delta_chunk_states.cu).
template <typename T>
bool launch_rev_states_tma(const Problem& p, View dout, const ChunkPrep& prep, const ChunkReverseOut& out,
                           cudaStream_t s) {
  constexpr int D = 128;
  auto kernel = rev_state_kernel_tma<T>;
  if (!runs_sm90(kernel)) return false;
  const int64_t nck = chunk_count(p), rows = p.bh() * nck * CH;
  if (rows >= (int64_t{1} << 31) || p.heads <= 0 || p.batch <= 0) return false;
  CUtensorMap kmap, wmap, qmap;
  KMapDims kd{}, qd{};
  if (!encode_chunk_rows_map<T>(&wmap, prep.w, rows) || !encode_token_map<T>(&kmap, kd, p.k, p, CH) ||
      !encode_token_map<T>(&qmap, qd, p.q, p, CH))
    return false;
  const int bytes = static_cast<int>(sizeof(TmaRevSmem<T, kRevStages>) + 1024);  // + the swizzle's alignment
  launch_tma_pass(kernel, dim3(D / BV, static_cast<unsigned>(p.bh())), bytes, s, p, dout, prep, out, kmap, wmap, qmap,
                  kd, qd);
  return true;
}

void launch_chunk_rstates(const Problem& p, View dout, const ChunkPrep& prep, const ChunkReverseOut& out,
                          cudaStream_t s) {
  if (p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const StatePass pass = state_pass();
    const int bytes = static_cast<int>(sizeof(StateSmem<T, D>));
    // 8 warps: 1.83 against 1.94 ms with 4 at T = 64K, H = 16; 1.74 with the copies
    // addressed once a block; on sm_90 by default the tensor-map copies (rev_state_kernel_tma,
    // 1.81 -> 1.32 ms against w8 in one call; docs/history/delta-rule-log.md, twelfth round)
    if constexpr (D == 128) {
      auto run = [&](auto kernel) {
        allow(kernel, bytes, "chunk reverse state smem");
        kernel<<<dim3(D / BV, static_cast<unsigned>(p.bh())), NT8, bytes, s>>>(p, dout, prep, out);
      };
      if (pass == StatePass::kTma || pass == StatePass::kDefault) {
        if (launch_rev_states_tma<T>(p, dout, prep, out, s)) return;
        if (pass == StatePass::kTma) fail_tma_unavailable();
      }
      if (pass == StatePass::kW8 || pass == StatePass::kDefault) return run(rev_state_kernel_w8<T, D, true>);
      if (pass == StatePass::kW8Calc) return run(rev_state_kernel_w8<T, D, false>);
    }
    allow(rev_state_kernel<T, D>, bytes, "chunk reverse state smem");
    rev_state_kernel<T, D><<<dim3(D / BV, static_cast<unsigned>(p.bh())), NT, bytes, s>>>(p, dout, prep, out);
  });
  check(cudaGetLastError(), "chunk reverse state kernel");
}

}  // namespace lasp2::delta::gpu
