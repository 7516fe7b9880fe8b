// Shared-memory tiles of the tensor-core kernels: 64 tokens x D (= 64 or 128)
// 16-bit elements, rows padded by 16 bytes so that ldmatrix's eight row addresses
// fall into distinct banks.
#pragma once

#include <type_traits>

#include "device_utils.cuh"

namespace lasp2::cuda {

template <int D>
struct TcTile {
  static constexpr int LD = D + 8;                      // elements per row
  static constexpr int kBytes = kChunk * LD * 2;        // one [64][LD] tile
};
constexpr int kLdP = kChunk + 8;                        // [64][72] score tiles
constexpr int kPBytes = kChunk * kLdP * 2;

// The launchers' instantiation switch (tc_forward.cu, tc_state.cu, tc_dkdv.cu): calls
// f(T{}, std::integral_constant<int, D>{}) with T the 16-bit element type of e (bf16, else
// fp16) and D = 64 or 128 (the tensor-core kernels' sizes: 64 if D == 64, else 128).
// Host code.
template <typename F>
void dispatch_tc(Elem e, int D, F&& f) {
  if (e == Elem::kBF16) {
    if (D == 64) f(__nv_bfloat16{}, std::integral_constant<int, 64>{});
    else f(__nv_bfloat16{}, std::integral_constant<int, 128>{});
  } else {
    if (D == 64) f(__half{}, std::integral_constant<int, 64>{});
    else f(__half{}, std::integral_constant<int, 128>{});
  }
}

// cp.async one chunk of a [token][dim] view into a tile: rows >= nvalid and
// columns >= dim (a multiple of 8) are zero-filled. Thread tid copies the 16-byte
// column tid % (D/8) of rows tid / (D/8) + i * step: one 64-bit multiply per
// call, then additions (the address arithmetic was a third of the loop's
// instructions when every copy recomputed its row and column). A full chunk of a
// full-width view (every chunk but a part's last, when dim >= D) takes a branch
// without the per-copy bounds test and its 64-bit select of a fallback address:
// about 8 instructions per copy there instead of about 16 (static SASS, sm_90a).
template <typename T, int D, int NTHREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int nvalid,
                                          int dim, int tid) {
  constexpr int kVecs = D / 8;
  constexpr int kStep = NTHREADS / kVecs;  // rows between one thread's copies
  constexpr int kIters = kChunk / kStep;
  static_assert(NTHREADS % kVecs == 0 && kChunk % kStep == 0, "tile copy shape");
  constexpr int LD = TcTile<D>::LD;
  const int row0 = tid / kVecs, col = (tid % kVecs) * 8;
  const bool colvalid = col < dim;
  const T* s = src + row0 * row_stride + col;
  const int64_t step = kStep * row_stride;
  T* d = dst + row0 * LD + col;
  if (nvalid == kChunk && dim >= D) {  // block-uniform: every row and column valid
#pragma unroll
    for (int i = 0; i < kIters; ++i) cp_async16(d + i * kStep * LD, s + i * step, true);
    return;
  }
#pragma unroll
  for (int i = 0; i < kIters; ++i) {
    const bool valid = colvalid && row0 + i * kStep < nvalid;
    cp_async16(d + i * kStep * LD, valid ? s + i * step : src, valid);
  }
}

// exp(x) for x <= 0 as one MUFU.EX2 with denormal results flushed to zero.
// __expf compiles (without -ftz) to a range test, two multiplies and a predicate
// around the same MUFU: 7 instructions instead of 2. A weight below 2^-126 is 0
// here instead of a denormal; the bf16/fp16 product it scales rounds it away anyway.
__device__ __forceinline__ float exp_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x * 1.4426950408889634f));
  return y;
}

// Warp `warp`'s part of the score tile in tc_scores and tc_scores_split (NW warps;
// Spread: see tc_scores): query row block (m16 tile) mt, n8 key tiles [nt0, nt0 + 32 / NW).
// False (warp-uniform) when all of them lie above the diagonal. One definition so that the
// two keep the same split of the tile.
template <int NW, bool Spread>
__device__ __forceinline__ bool tc_score_block(int warp, int& mt, int& nt0) {
  static_assert(NW == 4 || NW == 8 || NW == 16, "tc_scores: 4, 8 or 16 warps");
  static_assert(!Spread || NW == 8, "tc_scores: Spread needs 8 warps");
  mt = (Spread && (warp & 4) != 0) ? 3 - (warp & 3) : warp & 3;
  nt0 = (warp >> 2) * (32 / NW);
  return 8 * nt0 <= 16 * mt + 15;
}

// Zeroes a warp's mma accumulators (M, or N x M, m16n8 tiles of 4 floats).
template <int M>
__device__ __forceinline__ void tc_zero(float (&acc)[M][4]) {
#pragma unroll
  for (int j = 0; j < M; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[j][e] = 0.f;
}
template <int N, int M>
__device__ __forceinline__ void tc_zero(float (&acc)[N][M][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) tc_zero(acc[i]);
}

// An m16k16 A fragment whose k index is the token (x: this lane's registers, from
// ldmatrix of a [dim][token] or .trans of a [token][dim] tile) scaled per token: w0, w1
// weigh registers 0 and 1 (tokens 2 (lane % 4) + {0, 1} of the k step), w2, w3 registers 2
// and 3 (tokens + 8). a may be x. Shared by the passes that weight a product over the
// chunk's tokens (entry / exit weights: tc_state, tc_forward, tc_dkdv).
template <typename T>
__device__ __forceinline__ void scale_a_tokens(uint32_t (&a)[4], const uint32_t (&x)[4], float w0,
                                               float w1, float w2, float w3) {
  a[0] = scale2<T>(x[0], w0, w1);
  a[1] = scale2<T>(x[1], w0, w1);
  a[2] = scale2<T>(x[2], w2, w3);
  a[3] = scale2<T>(x[3], w2, w3);
}

// One k step of the score products, shared by tc_score_mmas and tc_scores: the A
// fragments of query row block mt (tc_score_a), then for the n16 key pair of n8 tiles
// nt, nt + 1 (np-th of the warp) acc[i][2 np + {0, 1}] += A_i B_i^T (tc_score_pair).
template <int D, typename T, int N>
__device__ __forceinline__ void tc_score_a(uint32_t (&a)[N][4], const T* const (&As)[N], int mt,
                                           int kk, int lane) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    ldsm_x4(a[i], As[i] + frag_a_rowmajor(lane, 16 * mt, 16 * kk, TcTile<D>::LD));
}
template <int D, typename T, int N, int NPW>
__device__ __forceinline__ void tc_score_pair(float (&acc)[N][NPW][4], const uint32_t (&a)[N][4],
                                              const T* const (&Bs)[N], int kk, int nt, int np,
                                              int lane) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    uint32_t bb[4];
    ldsm_x4(bb, Bs[i] + frag_b_nk(lane, 16 * kk, 8 * nt, TcTile<D>::LD));
    mma16816<T>(acc[i][2 * np], a[i], bb[0], bb[1]);
    mma16816<T>(acc[i][2 * np + 1], a[i], bb[2], bb[3]);
  }
}

// The product part of tc_scores for a warp whose first NB n16 column pairs (of
// NPW / 2) lie on or below the diagonal: acc[i][2 np + {0, 1}] += A_i B_i^T over all
// D / 16 k steps, np < NB. NB is a template argument, so the k loop is one straight
// block (see tc_scores_split).
template <typename T, int D, int NPW, int N, int NB>
__device__ __forceinline__ void tc_score_mmas(const T* const (&As)[N], const T* const (&Bs)[N], int mt,
                                              int nt0, int lane, float (&acc)[N][NPW][4]) {
  static_assert(NB >= 1 && 2 * NB <= NPW, "tc_score_mmas: 1 <= NB <= NPW / 2");
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {  // all D/16 steps: padded columns are zero
    uint32_t a[N][4];
    tc_score_a<D>(a, As, mt, kk, lane);
#pragma unroll
    for (int np = 0; np < NB; ++np) {
      tc_score_pair<D>(acc, a, Bs, kk, nt0 + 2 * np, np, lane);
    }
  }
}

// The weights and 16-bit stores of tc_scores / tc_scores_split (and tc_forward.cu's
// scores_slice) for one warp's accumulators. NT = 0: the n16 pairs above the diagonal are
// skipped by a test per pair; NT > 0: the caller knows that exactly n8 tiles [0, NT) lie
// on or below it (no test, one straight block: the key meta of all tiles can load before
// the first weight).
template <typename T, int D, int NPW, int N, int NT = 0>
__device__ __forceinline__ void tc_score_store(const float (&acc)[N][NPW][4], const float* ms, float scale,
                                               T* const (&Ps)[N], int mt, int nt0, int lane) {
  static_assert(NT >= 0 && NT <= NPW, "tc_score_store: 0 <= NT <= NPW");
  // This thread's two query rows x (meta read once per chunk, not per key tile).
  float Gx[2], sx[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int x = 16 * mt + (lane >> 2) + 8 * hf;
    Gx[hf] = ms[2 * x];
    sx[hf] = ms[2 * x + 1];
  }
#pragma unroll
  for (int j = 0; j < (NT > 0 ? NT : NPW); ++j) {
    // 16 x 16 blocks above the diagonal (key block > query block) are never read
    // by the consumers (their causal loops skip them): no weights, no store.
    if (NT == 0 && 8 * (nt0 + (j & ~1)) > 16 * mt + 15) continue;
    const int y = 8 * (nt0 + j) + 2 * (lane & 3);
    const float4 my = *reinterpret_cast<const float4*>(ms + 2 * y);  // {G, s} of keys y, y + 1
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int x = 16 * mt + (lane >> 2) + 8 * hf;
      // the pair weight of device_utils.cuh's pair_weight, with exp_ftz
      const float w0 = (y <= x && sx[hf] == my.y) ? scale * exp_ftz(Gx[hf] - my.x) : 0.f;
      const float w1 = (y + 1 <= x && sx[hf] == my.w) ? scale * exp_ftz(Gx[hf] - my.z) : 0.f;
#pragma unroll
      for (int i = 0; i < N; ++i)
        *reinterpret_cast<uint32_t*>(Ps[i] + x * kLdP + y) =
            pack2<T>(acc[i][j][2 * hf] * w0, acc[i][j][2 * hf + 1] * w1);
    }
  }
}

// P_i = scale * W o (A_i B_i^T), i < N, for one 64-token chunk (A_i, B_i: [token][dim]
// tiles whose columns past the head dim are zero), W the causal decay/document mask
// from the chunk's meta; written as 16-bit values to Ps[i] [64][kLdP]. Warp w (of
// NW = 4, 8 or 16) computes rows [16 (w % 4), +16) x an n-range of 64 / (NW / 4)
// columns; 16 x 16 key blocks above the diagonal are skipped and left unwritten (no
// consumer reads them). With N = 2 (P1 from q, k and P2 from dO, v: the dk/dv pass,
// through tc_scores_split) the weights are computed once for both products and the
// two MMA chains interleave.
// Spread (NW = 8 only): warps 4-7 take the query rows of row block 3 - (w % 4) instead
// of w % 4. Warp w issues from scheduler w % 4; with row block w % 4 the 10 causal
// 16 x 16 blocks fall 1, 2, 3, 4 on the four schedulers (warps 4 and 5 have none, 7
// has two), spread they fall 3, 3, 2, 2 and warps 6 and 7 have none. Each element is
// computed the same way (the same bits).
template <typename T, int D, int NW, int N = 1, bool Spread = false>
__device__ __forceinline__ void tc_scores(const T* const (&As)[N], const T* const (&Bs)[N],
                                          const float* ms, float scale, T* const (&Ps)[N],
                                          int warp, int lane) {
  constexpr int NPW = 32 / NW;  // n8 tiles per warp: 8, 4 or 2
  int mt, nt0;
  if (!tc_score_block<NW, Spread>(warp, mt, nt0)) return;
  float acc[N][NPW][4];
  tc_zero(acc);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {  // all D/16 steps: padded columns are zero
    uint32_t a[N][4];
    tc_score_a<D>(a, As, mt, kk, lane);
#pragma unroll
    for (int np = 0; np < NPW / 2; ++np) {
      const int nt = nt0 + 2 * np;
      if (8 * nt <= 16 * mt + 15) {
        tc_score_pair<D>(acc, a, Bs, kk, nt, np, lane);
      }
    }
  }
  tc_score_store<T, D, NPW, N>(acc, ms, scale, Ps, mt, nt0, lane);
}
// tc_scores with the causal test of each n16 column pair taken once, before the k
// loop (a warp-uniform switch over the count NB of pairs on or below the diagonal),
// instead of inside every k step. In tc_scores that test splits each k step into its
// own basic blocks, so ptxas issues a step's ldmatrix right before the step's mma and
// waits a shared-memory latency per step (static SASS of the dk/dv kernel, session 13);
// here the loop is straight and the next step's fragments load while this step's mma
// run. Every accumulator gets the same mma in the same order (the same bits), and the
// weights and stores are tc_scores' (tc_score_store). StraightStore (the output / dq
// passes at D = 64, session 13): the weights and stores also inside each case, with
// their pair count known (tc_score_store<2 NB>): no per-pair test there either.
template <typename T, int D, int NW, int N = 1, bool Spread = false, bool StraightStore = false>
__device__ __forceinline__ void tc_scores_split(const T* const (&As)[N], const T* const (&Bs)[N],
                                                const float* ms, float scale, T* const (&Ps)[N], int warp,
                                                int lane) {
  constexpr int NPW = 32 / NW;  // n8 tiles per warp: 8, 4 or 2
  int mt, nt0;
  if (!tc_score_block<NW, Spread>(warp, mt, nt0)) return;
  float acc[N][NPW][4];
  tc_zero(acc);
  // n16 pair np lies on or below the diagonal iff 16 np <= 16 mt + 15 - 8 nt0 (>= 0 here)
  const int nb = min(NPW / 2, (16 * mt + 15 - 8 * nt0) / 16 + 1);
  constexpr int H = NPW / 2;  // pairs per warp; NB = min(k, H) keeps unused cases valid
  constexpr int B4 = H < 4 ? H : 4, B3 = H < 3 ? H : 3, B2 = H < 2 ? H : 2;
  if constexpr (StraightStore) {
    if (nb >= 4) {
      tc_score_mmas<T, D, NPW, N, B4>(As, Bs, mt, nt0, lane, acc);
      tc_score_store<T, D, NPW, N, 2 * B4>(acc, ms, scale, Ps, mt, nt0, lane);
    } else if (nb == 3) {
      tc_score_mmas<T, D, NPW, N, B3>(As, Bs, mt, nt0, lane, acc);
      tc_score_store<T, D, NPW, N, 2 * B3>(acc, ms, scale, Ps, mt, nt0, lane);
    } else if (nb == 2) {
      tc_score_mmas<T, D, NPW, N, B2>(As, Bs, mt, nt0, lane, acc);
      tc_score_store<T, D, NPW, N, 2 * B2>(acc, ms, scale, Ps, mt, nt0, lane);
    } else {
      tc_score_mmas<T, D, NPW, N, 1>(As, Bs, mt, nt0, lane, acc);
      tc_score_store<T, D, NPW, N, 2>(acc, ms, scale, Ps, mt, nt0, lane);
    }
    return;
  }
  if (nb >= 4) tc_score_mmas<T, D, NPW, N, B4>(As, Bs, mt, nt0, lane, acc);
  else if (nb == 3) tc_score_mmas<T, D, NPW, N, B3>(As, Bs, mt, nt0, lane, acc);
  else if (nb == 2) tc_score_mmas<T, D, NPW, N, B2>(As, Bs, mt, nt0, lane, acc);
  else tc_score_mmas<T, D, NPW, N, 1>(As, Bs, mt, nt0, lane, acc);
  tc_score_store<T, D, NPW, N>(acc, ms, scale, Ps, mt, nt0, lane);
}

template <typename T, int D, int NW>
__device__ __forceinline__ void tc_scores(const T* As, const T* Bs, const float* ms, float scale,
                                          T* Ps, int warp, int lane) {
  const T* const a[1] = {As};
  const T* const b[1] = {Bs};
  T* const p[1] = {Ps};
  tc_scores<T, D, NW, 1>(a, b, ms, scale, p, warp, lane);
}

}  // namespace lasp2::cuda
