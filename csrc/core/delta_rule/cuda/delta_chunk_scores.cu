// The chunk-parallel passes of the chunked GDN on a chunk's causal scores P (delta_chunk.h
// "output" and "rprep"): the forward output o = scale diag(e^G [s = 0]) Q S_c + P v_new
// and the backward's r = -(P^T dO). 4 warps a block; warp w owns tokens [16 w, 16 w + 16).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_launch.cuh"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- chunk-parallel passes with the causal scores ---------------------------------------------
template <typename T, int D>
struct ScoreSmem {
  static constexpr int LD = TcTile<D>::LD;
  T q[CH * LD];
  T k[CH * LD];
  T x[CH * LD];  // output: v_new; rprep: dO
  T ps[CH * kLdP];
  float meta[2 * CH];
  T st[D * LD];  // output only (last: rprep launches without it): the chunk's entering state
};

// kOut: o = scale diag(e^G [s = 0]) Q S_c + P v_new; else r = -(P^T dO).
template <typename T, int D, bool kOut>
__global__ void __launch_bounds__(NT) score_kernel(Problem p, ChunkPrep prep, View xin, const void* states,
                                                   ForwardOut out) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  ScoreSmem<T, D>& sm = *reinterpret_cast<ScoreSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int nck = static_cast<int>(chunk_count(p));
  load_chunk_rows<T, D, NT>(sm.q, p.q, cp, tid);
  load_chunk_rows<T, D, NT>(sm.k, p.k, cp, tid);
  if constexpr (kOut) {
    load_scratch_rows<T, D, NT>(sm.x, xin.ptr, cp, tid);
    const T* st = static_cast<const T*>(states) + (cp.bh * nck + cp.c) * static_cast<int64_t>(D) * D;
#pragma unroll
    for (int r = 0; r < D; r += CH) load_tile<T, D, NT>(sm.st + r * LD, st + r * D, D, CH, D, tid);
  } else {
    load_chunk_rows<T, D, NT>(sm.x, xin, cp, tid);
  }
  load_meta(sm.meta, prep.meta, cp.row0, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  tc_scores<T, D, 4>(sm.q, sm.k, sm.meta, p.scale, sm.ps, warp, lane);
  __syncthreads();
  float acc[D / 8][4];
  zero(acc);
  if constexpr (kOut) {
    mma_rows<T, D / 8, false>(acc, sm.q, LD, sm.st, LD, 16 * warp, 0, D / 16, lane);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int x = 16 * warp + (lane >> 2) + 8 * hf;
      const float f = sm.meta[2 * x + 1] == 0.f ? p.scale * __expf(sm.meta[2 * x]) : 0.f;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        acc[j][2 * hf] *= f;
        acc[j][2 * hf + 1] *= f;
      }
    }
    // score blocks above the diagonal are unwritten: key blocks 0..warp only
    mma_rows<T, D / 8, false>(acc, sm.ps, kLdP, sm.x, LD, 16 * warp, 0, warp + 1, lane);
    store_o_rows<T>(out, cp, acc, 16 * warp, lane);
  } else {
    // r_y = -sum_{x >= y} P_xy dO_x: P^T from the [x][y] tile, query blocks warp..3
    mma_rows<T, D / 8, true>(acc, sm.ps, kLdP, sm.x, LD, 16 * warp, warp, CH / 16, lane);
    T* dst = static_cast<T*>(prep.u) + cp.row0 * D;
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = 16 * warp + (lane >> 2) + 8 * hf, col = 8 * j + 2 * (lane & 3);
        store_u32(dst + x * D + col, pack2<T>(-acc[j][2 * hf], -acc[j][2 * hf + 1]));
      }
  }
}

// rprep with P^T in registers (thirteenth round; the default, score_kernel<T, D, false>
// is LASP2_DELTA_RPREP_KERNEL=old): warp w forms S^T = K Q^T for its 16 key rows y =
// 16 w.. over the query columns x >= 16 w, weights it to P^T, and its accumulators,
// packed to 16 bits, are the A fragments of r = -(P^T dO) as they are (m16n8 C layout =
// m16k16 A layout two n8 tiles at a time). The same products in the same order as
// score_kernel's through its score tile (an mma's dot products do not depend on which
// operand is A), so the same bits; without the score tile a block takes 52 KiB at d = 128
// (four blocks an SM, three before). r leaves through q's bytes in 16-byte stores.
template <typename T, int D>
struct RprepSmem {
  static constexpr int LD = TcTile<D>::LD;
  T q[CH * LD];  // then r, staged for the stores
  T k[CH * LD];
  T x[CH * LD];  // dO
  float meta[2 * CH];
};

template <typename T, int D>
__global__ void __launch_bounds__(NT) rprep_kernel(Problem p, ChunkPrep prep, View dout) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  RprepSmem<T, D>& sm = *reinterpret_cast<RprepSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  load_chunk_rows<T, D, NT>(sm.q, p.q, cp, tid);
  load_chunk_rows<T, D, NT>(sm.k, p.k, cp, tid);
  load_chunk_rows<T, D, NT>(sm.x, dout, cp, tid);
  load_meta(sm.meta, prep.meta, cp.row0, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  // S^T: rows y = 16 warp.., columns x in the n8 tiles 2 warp..7 (P_xy = 0 for x < y)
  float st[CH / 8][4];
  zero(st);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldsm_x4(a, sm.k + frag_a_rowmajor(lane, 16 * warp, 16 * kk, LD));
#pragma unroll
    for (int np = 0; np < CH / 16; ++np) {
      if (np < warp) continue;
      uint32_t bb[4];
      ldsm_x4(bb, sm.q + frag_b_nk(lane, 16 * kk, 16 * np, LD));
      mma16816<T>(st[2 * np], a, bb[0], bb[1]);
      mma16816<T>(st[2 * np + 1], a, bb[2], bb[3]);
    }
  }
  // P^T_yx = S^T_yx scale e^{G_x - G_y} for y <= x in one segment (tc_scores' weights)
  float Gy[2], sy[2];
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int y = 16 * warp + (lane >> 2) + 8 * hf;
    Gy[hf] = sm.meta[2 * y];
    sy[hf] = sm.meta[2 * y + 1];
  }
  uint32_t pa[CH / 16][4];  // the A fragments of P^T, key block kk
#pragma unroll
  for (int j = 0; j < CH / 8; ++j) {
    if ((j >> 1) < warp) continue;
    const int x = 8 * j + 2 * (lane & 3);
    const float4 mx = *reinterpret_cast<const float4*>(sm.meta + 2 * x);  // {G, s} of queries x, x + 1
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int y = 16 * warp + (lane >> 2) + 8 * hf;
      const float w0 = (y <= x && sy[hf] == mx.y) ? p.scale * lasp2::cuda::exp_ftz(mx.x - Gy[hf]) : 0.f;
      const float w1 = (y <= x + 1 && sy[hf] == mx.w) ? p.scale * lasp2::cuda::exp_ftz(mx.z - Gy[hf]) : 0.f;
      pa[j >> 1][2 * (j & 1) + hf] = pack2<T>(st[j][2 * hf] * w0, st[j][2 * hf + 1] * w1);
    }
  }
  // r_y = -sum_{x >= y} P_xy dO_x over the query blocks warp..3
  float acc[D / 8][4];
  zero(acc);
#pragma unroll
  for (int kk = 0; kk < CH / 16; ++kk) {
    if (kk < warp) continue;
#pragma unroll
    for (int np = 0; np < D / 16; ++np) {
      uint32_t bb[4];
      ldsm_x4_t(bb, sm.x + frag_b_kn(lane, 16 * kk, 16 * np, LD));
      mma16816<T>(acc[2 * np], pa[kk], bb[0], bb[1]);
      mma16816<T>(acc[2 * np + 1], pa[kk], bb[2], bb[3]);
    }
  }
  __syncthreads();  // every warp is past q: r takes its place
  store_rows<T, D / 8, true>(sm.q, LD, acc, 16 * warp, lane);
  __syncthreads();
  copy_rows_out<T, D, NT>(static_cast<T*>(prep.u) + cp.row0 * D, sm.q, LD, tid);
}

}  // namespace

void launch_chunk_output(const Problem& p, const ChunkPrep& prep, const void* v_new, const void* states,
                         const ForwardOut& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const int bytes = static_cast<int>(sizeof(ScoreSmem<T, D>));
    allow(score_kernel<T, D, true>, bytes, "chunk output smem");
    score_kernel<T, D, true><<<chunk_grid(p), NT, bytes, s>>>(p, prep, View{v_new, 0, 0, 0}, states, out);
  });
  check(cudaGetLastError(), "chunk output kernel");
}

void launch_chunk_rprep(const Problem& p, View dout, const ChunkPrep& prep, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (env_is("LASP2_DELTA_RPREP_KERNEL", "old", "new")) {
      // no state tile: the same layout, launched with the bytes before it
      using Smem = ScoreSmem<T, D>;
      const int bytes = static_cast<int>(offsetof(Smem, st));
      allow(score_kernel<T, D, false>, bytes, "chunk rprep smem");
      score_kernel<T, D, false><<<chunk_grid(p), NT, bytes, s>>>(p, prep, dout, nullptr, ForwardOut{});
      return;
    }
    const int bytes = static_cast<int>(sizeof(RprepSmem<T, D>));
    allow(rprep_kernel<T, D>, bytes, "chunk rprep smem");
    rprep_kernel<T, D><<<chunk_grid(p), NT, bytes, s>>>(p, prep, dout);
  });
  check(cudaGetLastError(), "chunk rprep kernel");
}

}  // namespace lasp2::delta::gpu
