// The output / dq pass's pieces that its two kernel forms share (tc_forward.cu: variants
// 2-10, one block a phase; tc_forward_ws.cu: variant 16, consumer and producer warps): the
// score tile's n8 slices, a consumer warp's chunk step and the tensor-map kernel arguments.
// Included by .cu files only (internal linkage).
#pragma once

#include "device_utils.cuh"
#include "launch.h"
#include "tc_tile_map.cuh"
#include "tc_tiles.cuh"

namespace lasp2::cuda {
namespace {

__device__ __forceinline__ void ldsm_x2(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(p)));
}

// CNT (2 or 3) n8 key tiles [nt0, nt0 + CNT) of row block mt of the causal score tile
// P = scale W o (Qs Ks^T), all at or below the diagonal, into Ps (tc_score_store: the
// weights, 16-bit); the partitions over warps (scores_fine8, variant 16's producers) give
// each element the same MMAs in the same order and the same weight expression as
// tc_scores: the same bits.
template <typename T, int D, int CNT>
__device__ __forceinline__ void scores_slice(const T* Qs, const T* Ks, const float* ms, float scale,
                                             T* Ps, int mt, int nt0, int lane) {
  constexpr int LD = TcTile<D>::LD;
  float acc[CNT][4];
  tc_zero(acc);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4], bb[4];
    ldsm_x4(a, Qs + frag_a_rowmajor(lane, 16 * mt, 16 * kk, LD));
    ldsm_x4(bb, Ks + frag_b_nk(lane, 16 * kk, 8 * nt0, LD));
    mma16816<T>(acc[0], a, bb[0], bb[1]);
    mma16816<T>(acc[1], a, bb[2], bb[3]);
    if (CNT == 3) {
      uint32_t b2[2];  // lanes 0-15 address key rows 8 (nt0 + 2) + r, dims 16 kk + 8 (lane / 8)
      ldsm_x2(b2, Ks + frag_b_nk(lane, 16 * kk, 8 * (nt0 + 2), LD));
      mma16816<T>(acc[CNT - 1], a, b2[0], b2[1]);
    }
  }
  T* const p[1] = {Ps};  // all CNT tiles lie on or below the diagonal: no test
  tc_score_store<T, D, CNT, 1, CNT>(reinterpret_cast<const float(&)[1][CNT][4]>(acc), ms, scale, p, mt, nt0, lane);
}

// The pieces of a consumer warp's chunk step that the output / dq kernels (variants 2-10
// and 16) share: warp w owns rows [16 w, 16 w + 16) of the state S_a^T and of the output^T.

// The segment's entering state as S_a^T in mma accumulators (row = output dim 16 w + ...,
// column = qa dim), times esc (the prefix mode's decay, else 1); zeros where none enters.
template <int D>
__device__ __forceinline__ void load_entering_state(float (&S)[D / 8][4], const FwdArgs& args,
                                                    const SegmentBlock& blk, float esc, int warp, int lane) {
  const int da = args.da, dv = args.dv;
  const float* E = seg_state(args.state, blk.bh, blk.seg, args.state_bh, args.state_seg);
#pragma unroll
  for (int j = 0; j < D / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int jj = 16 * warp + (lane >> 2) + 8 * (e >> 1);
      const int ii = 8 * j + 2 * (lane & 3) + (e & 1);
      float val = 0.f;
      if (E != nullptr && jj < dv && ii < da) val = esc * (args.state_transposed ? E[jj * da + ii] : E[ii * dv + jj]);
      S[j][e] = val;
    }
  }
}

// inter: o = S_a^T qa^T over the qa dims (reads qa and the state only)
template <typename T, int D>
__device__ __forceinline__ void inter_product(float (&o)[8][4], const float (&S)[D / 8][4], const T* Qs, int lane) {
  constexpr int LD = TcTile<D>::LD;
  tc_zero(o);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(S[2 * kk][0], S[2 * kk][1]);
    a[1] = pack2<T>(S[2 * kk][2], S[2 * kk][3]);
    a[2] = pack2<T>(S[2 * kk + 1][0], S[2 * kk + 1][1]);
    a[3] = pack2<T>(S[2 * kk + 1][2], S[2 * kk + 1][3]);
    uint32_t bb[4][4];
#pragma unroll
    for (int np = 0; np < 4; ++np) ldsm_x4(bb[np], Qs + frag_b_nk(lane, 16 * kk, 16 * np, LD));
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      mma16816<T>(o[2 * np], a, bb[np][0], bb[np][1]);
      mma16816<T>(o[2 * np + 1], a, bb[np][2], bb[np][3]);
    }
  }
}

// o's token columns times their entry weights (scale folded in)
__device__ __forceinline__ void scale_by_entry(float (&o)[8][4], const float* entw, int lane) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int y = 8 * j + 2 * (lane & 3);
    const float e0 = entw[y], e1 = entw[y + 1];
    o[j][0] *= e0;
    o[j][1] *= e1;
    o[j][2] *= e0;
    o[j][3] *= e1;
  }
}

// intra: o += va^T P^T (P is causal: token block np of queries needs key blocks <= np); the
// warp's va^T fragments stay in vf for the state update
template <typename T, int D>
__device__ __forceinline__ void intra_product(float (&o)[8][4], uint32_t (&vf)[4][4], const T* Vs, const T* Ps,
                                              int warp, int lane) {
  constexpr int LD = TcTile<D>::LD;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    ldsm_x4_t(vf[kk], Vs + frag_a_colmajor(lane, 16 * warp, 16 * kk, LD));
#pragma unroll
    for (int np = kk; np < 4; ++np) {
      uint32_t bb[4];
      ldsm_x4(bb, Ps + frag_b_nk(lane, 16 * kk, 16 * np, kLdP));
      mma16816<T>(o[2 * np], vf[kk], bb[0], bb[1]);
      mma16816<T>(o[2 * np + 1], vf[kk], bb[2], bb[3]);
    }
  }
}

// S_a^T += va^T diag(w_exit) ka, from intra_product's va^T fragments
template <typename T, int D>
__device__ __forceinline__ void add_chunk_to_state(float (&S)[D / 8][4], const uint32_t (&vf)[4][4], const T* Ks,
                                                   const float* extw, int lane) {
  constexpr int LD = TcTile<D>::LD;
#pragma unroll
  for (int kk = 0; kk < 4; ++kk) {
    const int y = 16 * kk + 2 * (lane & 3);
    const float w0 = extw[y], w1 = extw[y + 1], w2 = extw[y + 8], w3 = extw[y + 9];
    uint32_t a[4];
    scale_a_tokens<T>(a, vf[kk], w0, w1, w2, w3);
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t bb[4];
      ldsm_x4_t(bb, Ks + frag_b_kn(lane, 16 * kk, 16 * np, LD));
      mma16816<T>(S[2 * np], a, bb[0], bb[1]);
      mma16816<T>(S[2 * np + 1], a, bb[2], bb[3]);
    }
  }
}

// Variant 6's kernel argument: FwdArgs plus the tensor maps of qa, ka, va, x (the first
// NT used; tc_tile_map.cuh) and where each map put the h, t, b dimensions.
struct FwdTmaArgs : FwdArgs {
  CUtensorMap map[4];
  int hdim[4], tdim[4], bdim[4];
};
// Variant 10 at D = 128 (the staged output tile's tensor-map stores): also the output's map.
struct FwdTmaStoreArgs : FwdTmaArgs {
  CUtensorMap omap;
  int ohdim, otdim, obdim;
};

}  // namespace
}  // namespace lasp2::cuda
