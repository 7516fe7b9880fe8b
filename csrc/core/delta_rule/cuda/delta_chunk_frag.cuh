// The lane layout of an m16n8k16 fp32 accumulator, shared by the chunked GDN and KDA
// kernels (delta_chunk*.cu, kda_chunk*.cu): a warp's 16 x (8 N) block from row m0 keeps
// acc[n][2 hf + par] at row m0 + lane / 4 + 8 hf, column 8 n + 2 (lane % 4) + par.
// These helpers zero, walk, sum and store such fragments, force-inlined over compile-time
// tile counts. Textually equal code can still compile differently once inlined (operand
// order, CSE): each use was checked against the written-out loops (ptxas -v registers and
// spills on sm_90a and sm_80, PTX opcode counts), and where a helper moved them the loop
// stays written out (e.g. the state passes' 16-bit copies of the carried columns, the
// KDA state pass's diag(eL) scaling, the GDN rprep's negated store; session 19: KDA's
// 4-warp passes' S / X loads through load_state and their token-row epilogues through
// for_pairs, the GDN w8 pass's chunk-state piece through store_xb_piece; session 22: KDA's
// 4-warp forward / reverse 16-bit copies of S / X with the chunk-state / dh store, the
// predicate by value, by reference or in a lambda: the forward pass's stores were
// threaded into two copies of the loop, and the reverse pass adds j0 + 8 nt + 2 (lane % 4)
// in another order than the forward's j0 + cl).
// What kept the PTX where earlier forms did not (session 22): fragment arrays declared by
// the caller where the loop had them, not inside the helper (tc_dkdv's ds_product).
// Included by .cu files only; internal linkage.
#pragma once

#include "delta_rule/cuda/delta_chunk_common.cuh"

namespace lasp2::delta::gpu {
namespace {

// (the scalar kernels' tc_zero, cuda/tc_tiles.cuh, under the name the delta kernels use)
template <int N>
__device__ __forceinline__ void zero(float (&acc)[N][4]) {
  lasp2::cuda::tc_zero(acc);
}

// f(n, hf, row, col) for this lane's column pairs (col, col + 1) of the N n8 tiles from
// row m0: acc[n][2 hf] and acc[n][2 hf + 1] (n outer, hf inner).
template <int N, typename F>
__device__ __forceinline__ void for_pairs(int m0, int lane, F&& f) {
#pragma unroll
  for (int n = 0; n < N; ++n)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) f(n, hf, m0 + (lane >> 2) + 8 * hf, 8 * n + 2 * (lane & 3));
}

// A warp's token rows m0.. of acc into 16-bit [row][ld] dst (negated with kNeg).
template <typename T, int N, bool kNeg = false>
__device__ __forceinline__ void store_rows(T* dst, int ld, const float (&acc)[N][4], int m0, int lane) {
  for_pairs<N>(m0, lane, [&](int n, int hf, int x, int col) {
    const float a0 = acc[n][2 * hf], a1 = acc[n][2 * hf + 1];
    store_u32(dst + x * ld + col, kNeg ? pack2<T>(-a0, -a1) : pack2<T>(a0, a1));
  });
}

// A chunk's 64 rows of D 16-bit values from a [64][ld] shared-memory tile into dst's
// contiguous [64][D] rows, 16 bytes a store by NTH threads (each warp store whole
// 128-byte lines, where store_rows' 4-byte pieces touch 8 rows an instruction).
template <typename T, int D, int NTH>
__device__ __forceinline__ void copy_rows_out(T* dst, const T* src, int ld, int tid) {
  constexpr int kPieces = CH * D / 8, kRowPieces = D / 8;
  static_assert(kPieces % NTH == 0, "whole rounds of 16-byte pieces");
#pragma unroll
  for (int e = tid; e < kPieces; e += NTH) {
    const int row = e / kRowPieces, c = 8 * (e % kRowPieces);
    *reinterpret_cast<uint4*>(dst + row * D + c) = *reinterpret_cast<const uint4*>(src + row * ld + c);
  }
}

// ---- products into a chunk's token rows (warp w: rows 16 w..) -------------------------
// dst's rows (16-bit [64][D]) = A (16-bit [64][kLdP], lower triangular: key blocks past
// the warp's own are zero) x B (a [64][LD] tile); the prep kernels' w and u.
template <typename T, int D>
__device__ __forceinline__ void lower_product(T* dst, const T* A, const T* B, int warp, int lane) {
  float acc[D / 8][4];
  zero(acc);
  mma_rows<T, D / 8, false>(acc, A, kLdP, B, TcTile<D>::LD, 16 * warp, 0, warp + 1, lane);
  store_rows<T, D / 8>(dst, D, acc, 16 * warp, lane);
}
// The chunk's output rows (those in the part) into out.o.
template <typename T, int N>
__device__ __forceinline__ void store_o_rows(const ForwardOut& out, const ChunkPos& cp, const float (&acc)[N][4],
                                             int m0, int lane) {
  for_pairs<N>(m0, lane, [&](int j, int hf, int x, int col) {
    if (x < cp.nvalid)
      store_u32(static_cast<T*>(out.o) + cp.b * out.osb + (cp.t0 + x) * out.ost + cp.h * out.osh + col,
                pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]));
  });
}

// ---- fp32 state tiles: rows r0.. (16 a warp), columns j0.. of a row-major [D][D] state
// f(nt, e, row, col) for this lane's entries S[nt][e] of a state tile.
template <int N, typename F>
__device__ __forceinline__ void for_state(int r0, int j0, int lane, F&& f) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) f(nt, e, r0 + (lane >> 2) + 8 * (e >> 1), j0 + 8 * nt + 2 * (lane & 3) + (e & 1));
}
// S = I (identity, the columns of a summary's map A), else src[at + ...] or, without src, 0.
template <int D, int N>
__device__ __forceinline__ void load_state(float (&S)[N][4], bool identity, const float* src, int64_t at, int r0,
                                           int j0, int lane) {
  for_state<N>(r0, j0, lane, [&](int nt, int e, int row, int col) {
    S[nt][e] = identity ? (row == col ? 1.f : 0.f) : src != nullptr ? src[at + row * D + col] : 0.f;
  });
}
// S into dst (already offset to the (b, h) state), 8 bytes a store.
template <int D, int N>
__device__ __forceinline__ void store_state(float* dst, const float (&S)[N][4], int r0, int j0, int lane) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int row = r0 + (lane >> 2) + 8 * hf;
      const int col = j0 + 8 * nt + 2 * (lane & 3);
      *reinterpret_cast<float2*>(dst + row * D + col) = make_float2(S[nt][2 * hf], S[nt][2 * hf + 1]);
    }
}

// S += f src (src offset to the (b, h) state).
template <int D, int N>
__device__ __forceinline__ void add_state(float (&S)[N][4], float f, const float* src, int r0, int j0, int lane) {
  for_state<N>(r0, j0, lane, [&](int nt, int e, int row, int col) { S[nt][e] += f * src[row * D + col]; });
}
// S = src (offset to the (b, h) state), and its 16-bit copy into the [row][ldx] tile xb
// (columns from 0).
template <typename T, int D, int N>
__device__ __forceinline__ void load_state_xb(float (&S)[N][4], T* xb, int ldx, const float* src, int r0, int j0,
                                              int lane) {
  for_pairs<N>(r0, lane, [&](int nt, int hf, int row, int cl) {
    const float2 f2 = *reinterpret_cast<const float2*>(src + row * D + j0 + cl);
    S[nt][2 * hf] = f2.x;
    S[nt][2 * hf + 1] = f2.y;
    store_u32(xb + row * ldx + cl, pack2<T>(f2.x, f2.y));
  });
}
// S times the scalar e (a chunk's decay of the state, GDN's scalar gate).
template <int N>
__device__ __forceinline__ void scale_state(float (&S)[N][4], float e) {
#pragma unroll
  for (int nt = 0; nt < N; ++nt)
#pragma unroll
    for (int q = 0; q < 4; ++q) S[nt][q] *= e;
}
// diag(f) S: row r times f[r].
template <int N>
__device__ __forceinline__ void scale_rows(float (&S)[N][4], const float* f, int r0, int lane) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float e = f[r0 + (lane >> 2) + 8 * hf];
#pragma unroll
    for (int nt = 0; nt < N; ++nt) {
      S[nt][2 * hf] *= e;
      S[nt][2 * hf + 1] *= e;
    }
  }
}
// The columns a block of a forward state pass (4 or 8 warps, GDN or KDA; C columns a
// block) carries: returns its first column j0; amap: the block carries columns of the
// summary's A (blocks x < D / C of a summary grid, u = 0, from I), else of M or of the
// state. One definition of the grid the hosts launch (D / C blocks, 2 D / C for a
// summary).
template <int D, int C>
__device__ __forceinline__ int pass_columns(bool summary, bool& amap) {
  amap = summary && blockIdx.x < D / C;
  return (summary && !amap ? blockIdx.x - D / C : blockIdx.x) * C;
}
// u = 0 in every ring buffer (a summary's columns of A, which read no u): the LEN 16-bit
// values of each buffer's u, NTH threads.
template <typename T, int NTH, int LEN, typename Buf, int NS>
__device__ __forceinline__ void zero_ring_u(Buf (&buf)[NS], int tid) {
  for (int i = tid; i < NS * LEN; i += NTH) buf[i / LEN].u[i % LEN] = from_float<T>(0.f);
}
// The end of a 4-warp forward state pass (GDN or KDA): the state leaving the part
// (fo.leaving) or, for the summary (sum.A set), A's columns and head_A's (amap) or M's and
// head_M's; S: the carried columns j0.. of the warp's MT m-tiles of rows from r0, at: the
// (b, h) state's offset. (fwd_state_kernel_w8 writes its end out: through this helper,
// with summary recomputed here or passed in, one of the two kinds of kernel changed PTX.)
template <int D, int MT, int N>
__device__ __forceinline__ void store_pass_end(const ChunkStatesOut& fo, const ChunkSummaryOut& sum, bool amap,
                                               int64_t at, const float (&S)[MT][N][4], int r0, int j0, int lane) {
  const bool summary = sum.A != nullptr;
  float* dst[2] = {amap ? sum.A : sum.M, amap ? sum.head_A : sum.head_M};
  if (!summary) dst[0] = fo.leaving, dst[1] = nullptr;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    if (dst[which] == nullptr) continue;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_state<D>(dst[which] + at, S[mt], r0 + 16 * mt, j0, lane);
  }
}

// ---- per-row and per-column sums of a fragment ----------------------------------------
// Sum over the 4 lanes that share a fragment row.
__device__ __forceinline__ float row_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 1);
  return v + __shfl_xor_sync(0xffffffffu, v, 2);
}
// Sum over the 8 lane groups that share a fragment column.
__device__ __forceinline__ float col_sum(float v) {
  v += __shfl_xor_sync(0xffffffffu, v, 4);
  v += __shfl_xor_sync(0xffffffffu, v, 8);
  return v + __shfl_xor_sync(0xffffffffu, v, 16);
}
// Adds v[hf] (this lane's partial sums of rows m0 + lane / 4 + 8 hf) to dst[row].
__device__ __forceinline__ void add_rows(float* dst, const float (&v)[2], int m0, int lane) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float s = row_sum(v[hf]);
    if ((lane & 3) == 0) atomicAdd(dst + m0 + (lane >> 2) + 8 * hf, s);
  }
}

// Adds c[j][par] (negated with kNeg; partial sums of column n0 + 8 j + 2 (lane % 4) + par)
// to dst[column].
template <bool kNeg, int N>
__device__ __forceinline__ void add_cols(float* dst, const float (&c)[N][2], int n0, int lane) {
#pragma unroll
  for (int j = 0; j < N; ++j)
#pragma unroll
    for (int par = 0; par < 2; ++par) {
      const float s = col_sum(c[j][par]);
      if (lane < 4) atomicAdd(dst + n0 + 8 * j + 2 * lane + par, kNeg ? -s : s);
    }
}

// An 8-warp chunk backward's share of warp w (the GDN and KDA chunk backwards): token
// rows [16 (w % 4), +16) (sub-chunk mw) and the column half w / 4 of every product.
struct WarpPart {
  int lane, mw, m0;
  int n0;   // first column of a head dim
  int c0;   // first column of a 64-token tile
  int tri;  // 16-column pairs of [c0, c0 + 32) at or left of the diagonal block of rows m0
  __device__ WarpPart(int tid, int d) {
    const int warp = tid >> 5, nh = warp >> 2;
    lane = tid & 31;
    mw = warp & 3;
    m0 = 16 * mw;
    n0 = nh * (d / 2);
    c0 = 32 * nh;
    tri = max(0, min(2, mw - 2 * nh + 1));
  }
};

}  // namespace
}  // namespace lasp2::delta::gpu
