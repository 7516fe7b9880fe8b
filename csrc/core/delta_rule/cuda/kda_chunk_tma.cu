// KDA's forward state pass and part summary on whole-tile tensor-map copies (sm_90,
// d = 128; kda_chunk_tma.h): GDN's fwd_state_kernel_tma (delta_chunk_states.cu) with
// KDA's per-key-dim decay, on the shared pieces of delta_chunk_tma.cuh. 8 warps a block, one
// block per (b, h) and C state columns (16; the summary 32), sequential over the chunks;
// thread 0 copies each chunk's w and kd tiles (prep's [rows][128], 16-bit) as two
// 64-column boxes each (128-byte swizzle) on a ring of NS buffers counted by mbarriers;
// the C columns of u and the chunk's eL (d floats) are cp.async pieces. Per chunk:
//
//   v_new = u - w S      (warp w: tokens 16 (w % 4).., C / 2 columns from C / 2 (w / 4))
//   S <- diag(eL) S + kd^T v_new   (warp w: state rows 16 w..16 w + 15)
//
// kda_state_kernel (kda_chunk.cu, 4 warps, cp.async tiles) computes the same, its products
// in its order (one chain over k), so every output equals its bit for bit. (GDN's two
// chains a product, v over even / odd k-steps and S over the chunk's two token halves,
// measured slower here: states 0.886 against 0.868 ms, the reverse pass 1.38 against 1.26
// at 64K; removed, docs/history/delta-rule-log.md thirteenth round.)
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "cuda/route.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_tma.cuh"
#include "delta_rule/cuda/kda_chunk_tma.h"

namespace lasp2::delta::gpu {
namespace {

constexpr int kD = 128;
// eL of a chunk (d floats) copies as MetaCopy's {G, s} pairs of 64 tokens (the same 512
// bytes at the same per-chunk stride) into TmaStateSmem's / TmaRevSmem's gate
static_assert(kD == 2 * CH, "eL rows as MetaCopy's");

// The state pass (C = 16: v_new, the 16-bit states entering each chunk, the leaving
// state) or, with kSummary, the part summary (C = 32, grid x = 2 d / C: blocks x < d / C
// the columns of A from I with u = 0, the others M's from zero).
// The token product's u values are read, and diag(eL) S formed (S is not read between the
// chunk's xb store and the second product), before the first product: written after it,
// the second token half's u loads follow the first half's ys stores (ptxas cannot tell
// the shared addresses apart) and the eL loads and FMULs sit between the second barrier
// and the second product. The same operations on the same values, so the same bits; at
// T = 64K on an H200 states 0.871 -> 0.852 ms, summary 0.975 -> 0.960 (GDN's
// fifteenth-round move; docs/history/delta-rule-log.md, "KDA state passes on tensor-map
// copies").
template <typename T, int NS, int C, bool kSummary>
__global__ void __launch_bounds__(NT8, 2)
    kda_state_kernel_tma(Problem p, KdaPrep prep, ChunkStatesOut fo, const __grid_constant__ CUtensorMap wmap,
                         const __grid_constant__ CUtensorMap kdmap, ChunkSummaryOut sum) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it on sm_90 and later only
#else
  constexpr int D = kD, LDC = C + 8, NTL = C / 8, TPW = NTL / 2;  // n8 tiles: block, warp (token product)
  static_assert(C == kChunkCols || (kSummary && C == 2 * kChunkCols), "16 columns (32: the summary only)");
  constexpr uint32_t kBufBytes = 2 * 2 * kSwzHalf;  // w and kd of a buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TmaStateSmem<T, NS, C>& sm = *reinterpret_cast<TmaStateSmem<T, NS, C>*>(smem_raw + swizzle_pad(smem_raw));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(kSummary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH, row0 = bh * npad;
  const int64_t se = static_cast<int64_t>(D) * D;
  const int r0 = 16 * warp;                                    // state rows of this warp
  const int x0 = 16 * (warp & 3), n0 = 8 * TPW * (warp >> 2);  // tokens and columns of its token tiles

  float S[NTL][4];
  load_state<D>(S, amap, kSummary ? nullptr : fo.entering, bh * se, r0, j0, lane);
  init_full_barriers(sm.full, tid);
  __syncthreads();
  FwdColCopies<T, NS, C> cols;
  cols.init(prep.u, prep.eL, row0, j0, sm, tid);  // prep.eL + bh nck d = + 2 row0: MetaCopy's offset
  T* const vn = !kSummary && fo.v_new != nullptr
                    ? static_cast<T*>(fo.v_new) + (row0 + x0 + (lane >> 2)) * D + j0 + n0 + 2 * (lane & 3)
                    : nullptr;
  T* const st16 = !kSummary && fo.states != nullptr
                      ? static_cast<T*>(fo.states) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1)
                      : nullptr;
  const uint32_t tiles0 = smem_u32(&sm.tiles[0][0][0]);
  // this lane's ldmatrix pieces at k-step 0: w (token rows x0..), kd^T (state rows r0..)
  const uint32_t aw = (x0 + (lane & 15)) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t ak = (r0 >> 6) * kSwzHalf + (8 * (lane >> 4) + (lane & 7)) * 128 +
                      ((((r0 & 63) >> 3) + ((lane >> 3) & 1)) ^ (lane & 7)) * 16;
  // chunk c's w and kd into buffer c % NS (thread 0), both halves of each
  auto issue_tiles = [&](int c) {
    const int s = c % NS, y = static_cast<int>(row0) + c * CH;
    mbar_arrive_expect_tx(&sm.full[s], kBufBytes);
    const uint32_t dst = tiles0 + s * kBufBytes;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tma_box_2d(dst + half * kSwzHalf, &wmap, 64 * half, y, &sm.full[s]);
      tma_box_2d(dst + (2 + half) * kSwzHalf, &kdmap, 64 * half, y, &sm.full[s]);
    }
  };
  auto issue_own = [&](int c) { cols.issue(c, !amap); };  // chunk c's u and eL
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int c = 0; c < nck; ++c) {
    const int s = c % NS;
    // the carried columns to xb, the ring's refill, the chunk's 16-bit state from xb
    ring_step_begin<NS>(c, nck, &sm.full[s], sm.xb, LDC, S, r0, st16, c, se, tid, lane, issue_tiles, issue_own);
    const T* u = sm.u[s];
    const uint32_t wt = tiles0 + s * kBufBytes;
    {  // v_new = u - w S (this warp's token tiles; u = 0 for the columns of A)
      scale_rows(S, sm.gate[s], r0, lane);  // diag(eL) S, for the second product
      float2 uu[2][TPW];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int t = 0; t < TPW; ++t)
          uu[hf][t] = amap ? make_float2(0.f, 0.f)
                           : unpack2<T>(load_u32(u + (x0 + (lane >> 2) + 8 * hf) * LDC + n0 + 8 * t + 2 * (lane & 3)));
      float acc[TPW][4] = {};
      mma_w_swizzled<T, TPW, false>(acc, wt + aw, sm.xb, LDC, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
#pragma unroll
        for (int t = 0; t < TPW; ++t) {
          const int cl = n0 + 8 * t + 2 * (lane & 3);
          const uint32_t packed = pack2<T>(uu[hf][t].x - acc[t][2 * hf], uu[hf][t].y - acc[t][2 * hf + 1]);
          if (vn != nullptr) store_u32(vn + (static_cast<int64_t>(c) * CH + 8 * hf) * D + 8 * t, packed);
          store_u32(sm.ys + x * LDC + cl, packed);
        }
      }
    }
    __syncthreads();
    // S <- diag(eL) S + kd^T v_new (this warp's state rows; diag(eL) S formed above)
    mma_k_swizzled<T, NTL, false>(S, wt + 2 * kSwzHalf + ak, sm.ys, LDC, lane);
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

// The reverse state pass (kda_rev_state_kernel's: X from `leaving` or zero at the
// part's end, backwards over the chunks X <- diag(eL) X + w^T (r - kd X) + qg^T dO; the
// 16-bit X leaving each chunk to dh, the last X to `entering`) on the same machinery:
// each chunk's kd, w and qg as tensor-map tiles (48 KiB), r's and dO's 16 columns and
// eL as cp.async pieces, a ring of 3 buffers walked backwards (GDN's
// rev_state_kernel_tma's depth), the products in kda_rev_state_kernel's order; as in
// kda_state_kernel_tma, r's values are read and diag(eL) X formed before the first
// product (at T = 64K on an H200 rprep + reverse pass 1.264 -> 1.259 ms).
constexpr int kKdaRevStages = 3;

template <typename T>
__global__ void __launch_bounds__(NT8)
    kda_rev_state_kernel_tma(Problem p, View dout, const void* r, const float* leaving, void* dh, float* entering,
                             const float* eLs, const __grid_constant__ CUtensorMap kdmap,
                             const __grid_constant__ CUtensorMap wmap, const __grid_constant__ CUtensorMap qgmap) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it on sm_90 and later only
#else
  constexpr int D = kD, NS = kKdaRevStages;
  constexpr uint32_t kBufBytes = 3 * 2 * kSwzHalf;  // kd, w and qg of a buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TmaRevSmem<T, kKdaRevStages>& sm = *reinterpret_cast<TmaRevSmem<T, kKdaRevStages>*>(smem_raw + swizzle_pad(smem_raw));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = blockIdx.x * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t se = static_cast<int64_t>(D) * D, row0 = bh * nck * CH;
  const int r0 = 16 * warp;
  const int x0 = 16 * (warp & 3), n0 = 8 * (warp >> 2);
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);

  float X[2][4];
  load_state<D>(X, false, leaving, bh * se, r0, j0, lane);
  init_full_barriers(sm.full, tid);
  __syncthreads();
  RevColCopies<T, NS> cols;  // eL + bh nck d = + 2 row0: MetaCopy's offset
  cols.init(rows_of<T>(dout, b, h, p.begin) + j0, dout.st, r, eLs, row0, j0, sm, tid);
  T* const dh16 =
      dh != nullptr ? static_cast<T*>(dh) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1) : nullptr;
  const uint32_t tiles0 = smem_u32(&sm.tiles[0][0][0]);
  const uint32_t aw = (x0 + (lane & 15)) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t ak = (r0 >> 6) * kSwzHalf + (8 * (lane >> 4) + (lane & 7)) * 128 +
                      ((((r0 & 63) >> 3) + ((lane >> 3) & 1)) ^ (lane & 7)) * 16;
  // step i: chunk nck - 1 - i into buffer i % NS; thread 0 its tiles
  auto issue_tiles = [&](int i) {
    const int s = i % NS, y = static_cast<int>(row0) + (nck - 1 - i) * CH;
    mbar_arrive_expect_tx(&sm.full[s], kBufBytes);
    const uint32_t dst = tiles0 + s * kBufBytes;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tma_box_2d(dst + half * kSwzHalf, &kdmap, 64 * half, y, &sm.full[s]);
      tma_box_2d(dst + (2 + half) * kSwzHalf, &wmap, 64 * half, y, &sm.full[s]);
      tma_box_2d(dst + (4 + half) * kSwzHalf, &qgmap, 64 * half, y, &sm.full[s]);
    }
  };
  auto issue_own = [&](int i) { cols.issue(p, nck, i); };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i, s = i % NS;
    // the carried gradient to xb, the ring's refill, dh's rows from xb
    ring_step_begin<NS>(i, nck, &sm.full[s], sm.xb, LDV, X, r0, dh16, c, se, tid, lane, issue_tiles, issue_own);
    const uint32_t kt = tiles0 + s * kBufBytes;
    {  // ys = r - kd X (this warp's token tile)
      scale_rows(X, sm.gate[s], r0, lane);  // diag(eL) X, for the second products
      float2 rr[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        rr[hf] = unpack2<T>(load_u32(sm.r[s] + (x0 + (lane >> 2) + 8 * hf) * LDV + n0 + 2 * (lane & 3)));
      float acc[1][4] = {};
      mma_w_swizzled<T, 1, false>(acc, kt + aw, sm.xb, LDV, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf, cl = n0 + 2 * (lane & 3);
        store_u32(sm.ys + x * LDV + cl, pack2<T>(rr[hf].x - acc[0][2 * hf], rr[hf].y - acc[0][2 * hf + 1]));
      }
    }
    __syncthreads();
    // X <- diag(eL) X + w^T ys + qg^T dO (this warp's state rows; diag(eL) X formed above)
    mma_k_swizzled<T, 2, false>(X, kt + 2 * kSwzHalf + ak, sm.ys, LDV, lane);
    mma_k_swizzled<T, 2, false>(X, kt + 4 * kSwzHalf + ak, sm.d[s], LDV, lane);
    // no barrier: the next chunk writes xb and ys only after its first barrier
  }
  cp_async_wait_all();
  if (entering != nullptr) store_state<D>(entering + bh * se, X, r0, j0, lane);
#endif
}

constexpr const char* kWho = "lasp2 (CUDA KDA, chunked)";

template <typename T, int C, bool kSummary>
bool launch_typed(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo, const ChunkSummaryOut& sum,
                  cudaStream_t s) {
  const int64_t nck = chunk_count(p), rows = p.bh() * nck * CH;
  if (rows >= (int64_t{1} << 31)) return false;
  CUtensorMap wmap, kdmap;  // w and kd: [bh * nck * 64 rows][d]
  if (!encode_chunk_rows_map<T>(&wmap, prep.w, rows) || !encode_chunk_rows_map<T>(&kdmap, prep.kd, rows)) return false;
  const dim3 grid((kSummary ? 2 : 1) * kD / C, static_cast<unsigned>(p.bh()));
  auto run = [&](auto kernel, int bytes) {
    if (!runs_sm90(kernel)) return false;
    chunk_allow_smem(kernel, bytes, kWho, "KDA chunk state pass (tma)");
    kernel<<<grid, NT8, bytes, s>>>(p, prep, fo, wmap, kdmap, sum);
    chunk_check(cudaGetLastError(), kWho, "KDA chunk state pass (tma)");
    return true;
  };
  // ring depth 4 when the blocks fit the device in one wave (one block an SM), else 2
  // (two blocks an SM hide each other's loads), as GDN's; + 1024: the swizzle's alignment
  if (static_cast<int64_t>(grid.x) * p.bh() <= lasp2::cuda::device_info().sms)
    return run(kda_state_kernel_tma<T, 4, C, kSummary>,
               static_cast<int>(sizeof(TmaStateSmem<T, 4, C>) + 1024));
  return run(kda_state_kernel_tma<T, 2, C, kSummary>,
             static_cast<int>(sizeof(TmaStateSmem<T, 2, C>) + 1024));
}

template <typename T>
bool launch_states_or_summary(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo,
                              const ChunkSummaryOut& sum, cudaStream_t s) {
  if (sum.A != nullptr) return launch_typed<T, 2 * kChunkCols, true>(p, prep, fo, sum, s);
  return launch_typed<T, kChunkCols, false>(p, prep, fo, sum, s);
}

template <typename T>
bool launch_rev_typed(const Problem& p, const KdaPrep& prep, View dout, const void* r, const float* leaving, void* dh,
                      float* entering, cudaStream_t s) {
  auto kernel = kda_rev_state_kernel_tma<T>;
  if (!runs_sm90(kernel)) return false;
  const int64_t nck = chunk_count(p), rows = p.bh() * nck * CH;
  if (rows >= (int64_t{1} << 31)) return false;
  CUtensorMap kdmap, wmap, qgmap;
  if (!encode_chunk_rows_map<T>(&kdmap, prep.kd, rows) || !encode_chunk_rows_map<T>(&wmap, prep.w, rows) ||
      !encode_chunk_rows_map<T>(&qgmap, prep.qg, rows))
    return false;
  const int bytes = static_cast<int>(sizeof(TmaRevSmem<T, kKdaRevStages>) + 1024);  // + the swizzle's alignment
  chunk_allow_smem(kernel, bytes, kWho, "KDA chunk reverse state pass (tma)");
  kernel<<<dim3(kD / BV, static_cast<unsigned>(p.bh())), NT8, bytes, s>>>(p, dout, r, leaving, dh, entering, prep.eL,
                                                                           kdmap, wmap, qgmap);
  chunk_check(cudaGetLastError(), kWho, "KDA chunk reverse state pass (tma)");
  return true;
}

}  // namespace

bool launch_kda_states_tma(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo,
                           const ChunkSummaryOut& sum, cudaStream_t s) {
  if (p.dk != kD || p.dv != kD || chunk_count(p) == 0 || p.bh() == 0) return false;
  if (p.elem == Elem::kBF16) return launch_states_or_summary<__nv_bfloat16>(p, prep, fo, sum, s);
  if (p.elem == Elem::kF16) return launch_states_or_summary<__half>(p, prep, fo, sum, s);
  return false;
}

bool launch_kda_rstates_tma(const Problem& p, const KdaPrep& prep, View dout, const void* r, const float* leaving,
                            void* dh, float* entering, cudaStream_t s) {
  if (p.dk != kD || p.dv != kD || chunk_count(p) == 0 || p.bh() == 0) return false;
  if (p.elem == Elem::kBF16) return launch_rev_typed<__nv_bfloat16>(p, prep, dout, r, leaving, dh, entering, s);
  if (p.elem == Elem::kF16) return launch_rev_typed<__half>(p, prep, dout, r, leaving, dh, entering, s);
  return false;
}

}  // namespace lasp2::delta::gpu
