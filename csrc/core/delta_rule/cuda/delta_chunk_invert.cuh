// T = (I + L)^-1 of a 64 x 64 strictly lower-triangular fp32 matrix in shared memory,
// shared by the chunked GDN prep (delta_chunk_prep.cu) and the KDA prep (kda_prep.cu).
// Included by .cu files only, after delta_chunk_common.cuh (CH, LDL); internal linkage.
#pragma once

#include "delta_rule/cuda/delta_chunk_common.cuh"

namespace lasp2::delta::gpu {
namespace {

// acc += (r0, r1)^T (c0, c1): one k-step of a 2 x 2 block of a product (row pair r0, r1
// of the left factor's column k, column pair c0, c1 of the right factor's row k).
__device__ __forceinline__ void add_outer2(float (&acc)[2][2], float r0, float r1, float c0, float c1) {
  acc[0][0] += r0 * c0;
  acc[0][1] += r0 * c1;
  acc[1][0] += r1 * c0;
  acc[1][1] += r1 * c1;
}

// T = (I + L)^-1 of a strictly lower-triangular 64 x 64 L, in fp32, blocked by 16:
// the diagonal blocks by substitution (warp w, lane j solves column j of block w in
// registers), then the 2 x 2 block merges inv([[A, 0], [C, B]]) =
// [[A^-1, 0], [-B^-1 C A^-1, B^-1]] at 16 and at 32. Entries of T above the
// diagonal blocks are left unwritten; in the diagonal blocks they are zero. The L
// blocks consumed by a merge hold C A^-1 afterwards. The first 128 threads (NT) do the
// work; a block of kThreads > NT (the 8-warp KDA prep) calls it with all its threads,
// the others only meeting the barriers.
// kBalanced (GDN prep's default since the thirteenth round): the first half of the
// 32-block merge (C A^-1, whose sums start at the output column) gives each warp two
// column groups (4 (tid / 16)) over 16 row pairs instead of all eight over 4 row pairs,
// so a warp's loop runs 32 - 8 w steps instead of 32 (80 warp steps instead of 128).
// Every output is the same sum in the same order, on another thread: the same bits.
// (The 16-merge's two 2 x 2 products, C A^-1 and B^-1 (C A^-1), stay written out: as one
// helper taking the tiles and offsets, every prep kernel's registers were renumbered,
// session 22. Only a k-step's four FMAs on values already loaded, add_outer2, are shared:
// the same PTX, session 25.)
template <int kThreads = NT, bool kBalanced = false>
__device__ __forceinline__ void invert_unit_lower(float* L, float* Tm, int tid) {
  static_assert(kThreads >= NT, "four warps do the work");
  const bool act = kThreads == NT || tid < NT;
  const int warp = tid >> 5, lane = tid & 31;
  {
    const int base = 16 * warp;
    if (act && lane < 16) {
      float t[16];
#pragma unroll
      for (int x = 0; x < 16; ++x) {
        float acc = x == lane ? 1.f : 0.f;
#pragma unroll
        for (int y = 0; y < x; ++y) acc -= L[(base + x) * LDL + base + y] * t[y];
        t[x] = acc;
      }
#pragma unroll
      for (int x = 0; x < 16; ++x) Tm[(base + x) * LDL + base + lane] = t[x];
    }
  }
  __syncthreads();
  {  // blocks (1, 0) and (3, 2): 2 x 2 outputs a thread
    const int q = tid & 63, i0 = tid < 64 ? 16 : 48, j0 = i0 - 16;
    const int r = 2 * (q >> 3), c = 2 * (q & 7);
    float x[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int k = 0; k < 16; ++k) {  // C A^-1 (A^-1 lower triangular: zeros above)
      if (!act) break;
      const float c0 = L[(i0 + r) * LDL + j0 + k], c1 = L[(i0 + r + 1) * LDL + j0 + k];
      const float a0 = Tm[(j0 + k) * LDL + j0 + c], a1 = Tm[(j0 + k) * LDL + j0 + c + 1];
      add_outer2(x, c0, c1, a0, a1);
    }
    __syncthreads();
    if (act)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) L[(i0 + r + a) * LDL + j0 + c + b] = x[a][b];
    __syncthreads();
    float y[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int k = 0; k < 16; ++k) {  // B^-1 (C A^-1), k <= row
      if (!act) break;
      const float b0 = Tm[(i0 + r) * LDL + i0 + k], b1 = Tm[(i0 + r + 1) * LDL + i0 + k];
      const float x0 = L[(i0 + k) * LDL + j0 + c], x1 = L[(i0 + k) * LDL + j0 + c + 1];
      add_outer2(y, b0, b1, x0, x1);
    }
    if (act)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 2; ++b) Tm[(i0 + r + a) * LDL + j0 + c + b] = -y[a][b];
  }
  __syncthreads();
  {  // block rows 32..63 x columns 0..31: 2 x 4 outputs a thread
    const int r = 2 * (tid >> 3), c = 4 * (tid & 7);
    const int r1 = kBalanced ? 2 * (tid & 15) : r, c1 = kBalanced ? 4 * ((tid >> 4) & 7) : c;
    float x[2][4] = {};
    for (int k = c1; act && k < 32; ++k) {  // C A^-1 with A^-1 = T[0:32, 0:32], zero for k < c
      const float c0 = L[(32 + r1) * LDL + k], c1v = L[(33 + r1) * LDL + k];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float a = Tm[k * LDL + c1 + b];
        x[0][b] += c0 * a;
        x[1][b] += c1v * a;
      }
    }
    __syncthreads();
    if (act)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) L[(32 + r1 + a) * LDL + c1 + b] = x[a][b];
    __syncthreads();
    float y[2][4] = {};
    for (int k = 0; act && k <= r + 1; ++k) {  // B^-1 (C A^-1), B^-1 = T[32:64, 32:64]
      const float b0 = Tm[(32 + r) * LDL + 32 + k], b1 = Tm[(33 + r) * LDL + 32 + k];
#pragma unroll
      for (int b = 0; b < 4; ++b) {
        const float xv = L[(32 + k) * LDL + c + b];
        y[0][b] += b0 * xv;
        y[1][b] += b1 * xv;
      }
    }
    if (act)
#pragma unroll
      for (int a = 0; a < 2; ++a)
#pragma unroll
        for (int b = 0; b < 4; ++b) Tm[(32 + r + a) * LDL + c + b] = -y[a][b];
  }
  __syncthreads();
}

}  // namespace
}  // namespace lasp2::delta::gpu
