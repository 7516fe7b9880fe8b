// The chunk-parallel backward of the chunked KDA kernels (see kda_chunk_bwd.h): the
// selection between the 8-warp kernel (kda_chunk_bwd_wide.cu, the default) and this
// file's earlier 4-warp kernel (LASP2_DELTA_KDA_BWD_KERNEL=old, kept for the A/B), which
// runs one block of 4 warps per (chunk, b, h), mma.sync m16n8k16 in the input dtype with fp32
// accumulation. Warp w owns tokens [16 w, 16 w + 16) of the chunk in every product (all
// d columns), so each lane owns the same (token, dim) places of every [64][d] result:
// dk and dG (the gradient of G, per element) sum in fp32 shared memory without atomics,
// dq's first term goes out through dq's rows and comes back to the same lane.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/cuda/kda_chunk_bwd_wide.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

using lasp2::cuda::exp_ftz;  // every exponent below is <= 0

// 217 KiB at d = 128 (sm_90's 227 KiB opt-in; sm_80 takes the recurrent backward at
// d = 128, the backend checks), 112 KiB at d = 64.
template <typename T, int D>
struct KdaBwdSmem {
  static constexpr int LD = TcTile<D>::LD;
  float G[CH * D];
  float dG[CH * D];
  float dK[CH * D];
  T u[CH * LD];   // v_new; then each warp's scaled 16-token tile (its own 16 rows)
  T x1[CH * LD];  // r, then dU, then dO
  T x2[CH * LD];  // kd, then dB, then q
  T s[D * LD];    // dh, then h (the state entering the chunk)
  T tk[CH * LD];  // T (ld kLdP), then k
  T dP[CH * kLdP];
  T dL[CH * kLdP];
  float bt[CH], seg[CH], start[CH], db[CH], dGL[D];
};
static_assert(kLdP <= TcTile<64>::LD, "T fits a token tile");

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

// acc[x] = sum_{y <= x} M_xy e^{G_x - G_y} . src_y for the rows x of warp w (sub-chunk
// X = w, first token r): for earlier sub-chunks Y on tensor cores as e^{G_x - G_r} .
// (M_XY (e^{G_r - G_y} . src_y)), inside X elementwise. M [x][y] (ld kLdP) is zero across
// segments; the factors are formed only inside one segment (G restarts at a document
// start, so across one they could overflow). scr: this warp's [16][LD] scratch.
template <typename T, int D>
__device__ __forceinline__ void decayed_rows(float (&acc)[D / 8][4], const T* M, const T* src, T* scr,
                                             const float* G, const float* seg, int w, int lane) {
  constexpr int LD = TcTile<D>::LD;
  const int r = 16 * w;
  zero(acc);
  for (int Y = 0; Y < w; ++Y) {
    for (int e = lane; e < 16 * D / 2; e += 32) {
      const int a = e / (D / 2), i = 2 * (e % (D / 2)), y = 16 * Y + a;
      const bool in = seg[y] == seg[r];
      const float f0 = in ? exp_ftz(G[r * D + i] - G[y * D + i]) : 0.f;
      const float f1 = in ? exp_ftz(G[r * D + i + 1] - G[y * D + i + 1]) : 0.f;
      const float2 s2 = unpack2<T>(load_u32(src + y * LD + i));
      store_u32(scr + a * LD + i, pack2<T>(s2.x * f0, s2.y * f1));
    }
    __syncwarp();
    mma_acc<T, D / 8, false, false>(acc, M + 16 * Y, kLdP, scr, LD, r, 0, 0, 1, D / 16, lane);
    __syncwarp();  // scr is rewritten for the next Y
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int x = r + (lane >> 2) + 8 * hf;
    const bool xin = seg[x] == seg[r];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int i = 8 * j + 2 * (lane & 3);
      acc[j][2 * hf] = xin ? acc[j][2 * hf] * exp_ftz(G[x * D + i] - G[r * D + i]) : 0.f;
      acc[j][2 * hf + 1] = xin ? acc[j][2 * hf + 1] * exp_ftz(G[x * D + i + 1] - G[r * D + i + 1]) : 0.f;
    }
    for (int y = r; y <= x; ++y) {
      if (seg[y] != seg[x]) continue;
      const float m = to_f(M[x * kLdP + y]);
      if (m == 0.f) continue;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int i = 8 * j + 2 * (lane & 3);
        const float2 gx = *reinterpret_cast<const float2*>(G + x * D + i);
        const float2 gy = *reinterpret_cast<const float2*>(G + y * D + i);
        const float2 sy = unpack2<T>(load_u32(src + y * LD + i));
        acc[j][2 * hf] += m * sy.x * exp_ftz(gx.x - gy.x);
        acc[j][2 * hf + 1] += m * sy.y * exp_ftz(gx.y - gy.y);
      }
    }
  }
}

// acc[y] = sum_{x >= y} M_xy rs_x e^{G_x - G_y} . src_x for the rows y of warp w
// (sub-chunk Y = w, last token e): for later sub-chunks X on tensor cores as
// e^{G_e - G_y} . (M_XY^T (rs_x e^{G_x - G_e} . src_x)), inside Y elementwise. rs: a
// per-token factor (kRowScale) or 1.
template <typename T, int D, bool kRowScale>
__device__ __forceinline__ void decayed_cols(float (&acc)[D / 8][4], const T* M, const T* src, const float* rs,
                                             T* scr, const float* G, const float* seg, int w, int lane) {
  constexpr int LD = TcTile<D>::LD;
  const int y0 = 16 * w, e = y0 + 15;
  zero(acc);
  for (int X = w + 1; X < CH / 16; ++X) {
    for (int k = lane; k < 16 * D / 2; k += 32) {
      const int a = k / (D / 2), i = 2 * (k % (D / 2)), x = 16 * X + a;
      const bool in = seg[x] == seg[e];
      const float c = kRowScale ? rs[x] : 1.f;
      const float f0 = in ? c * exp_ftz(G[x * D + i] - G[e * D + i]) : 0.f;
      const float f1 = in ? c * exp_ftz(G[x * D + i + 1] - G[e * D + i + 1]) : 0.f;
      const float2 s2 = unpack2<T>(load_u32(src + x * LD + i));
      store_u32(scr + a * LD + i, pack2<T>(s2.x * f0, s2.y * f1));
    }
    __syncwarp();
    // M^T's rows y0.. from M's [x][y] rows of X
    mma_acc<T, D / 8, true, false>(acc, M + 16 * X * kLdP, kLdP, scr, LD, y0, 0, 0, 1, D / 16, lane);
    __syncwarp();
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int y = y0 + (lane >> 2) + 8 * hf;
    const bool yin = seg[y] == seg[e];
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
      const int i = 8 * j + 2 * (lane & 3);
      acc[j][2 * hf] = yin ? acc[j][2 * hf] * exp_ftz(G[e * D + i] - G[y * D + i]) : 0.f;
      acc[j][2 * hf + 1] = yin ? acc[j][2 * hf + 1] * exp_ftz(G[e * D + i + 1] - G[y * D + i + 1]) : 0.f;
    }
    for (int x = y; x <= e; ++x) {
      if (seg[x] != seg[y]) continue;
      const float m = to_f(M[x * kLdP + y]) * (kRowScale ? rs[x] : 1.f);
      if (m == 0.f) continue;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const int i = 8 * j + 2 * (lane & 3);
        const float2 gx = *reinterpret_cast<const float2*>(G + x * D + i);
        const float2 gy = *reinterpret_cast<const float2*>(G + y * D + i);
        const float2 sx = unpack2<T>(load_u32(src + x * LD + i));
        acc[j][2 * hf] += m * sx.x * exp_ftz(gx.x - gy.x);
        acc[j][2 * hf + 1] += m * sx.y * exp_ftz(gx.y - gy.y);
      }
    }
  }
}

// f(x, i, hf, j, par) over this lane's places of a [64][D] fragment set of warp rows m0.
template <int D, typename F>
__device__ __forceinline__ void for_frag(int m0, int lane, F&& f) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf)
#pragma unroll
    for (int j = 0; j < D / 8; ++j)
#pragma unroll
      for (int par = 0; par < 2; ++par) f(m0 + (lane >> 2) + 8 * hf, 8 * j + 2 * (lane & 3) + par, hf, j, par);
}

template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_bwd_kernel(Problem p, KdaBackwardArgs a) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int NJ = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaBwdSmem<T, D>& sm = *reinterpret_cast<KdaBwdSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, m0 = 16 * warp;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  const int64_t at = chunk * D * D;
  const int nvalid = cp.nvalid;
  float* G = sm.G;
  float* dG = sm.dG;
  float* dK = sm.dK;
  const float* seg = sm.seg;

  load_tile<T, D, NT>(sm.u, static_cast<const T*>(a.v_new) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NT>(sm.x1, static_cast<const T*>(a.r) + cp.row0 * D, D, CH, D, tid);
#pragma unroll
  for (int r = 0; r < D; r += CH) load_tile<T, D, NT>(sm.s + r * LD, static_cast<const T*>(a.dh) + at + r * D, D, CH, D, tid);
  load_tile<T, CH, NT>(sm.tk, static_cast<const T*>(a.t) + chunk * CH * CH, CH, CH, CH, tid);
  cp_async_commit();
  if (tid < CH) {
    const int x = tid;
    const int64_t t = cp.t0 + x;
    const bool valid = x < nvalid;
    sm.bt[x] = valid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
    sm.start[x] = valid && p.doc_start != nullptr && p.doc_start[cp.b * p.doc_sb + t] != 0 ? 1.f : 0.f;
    sm.db[x] = 0.f;
  }
  for (int i = tid; i < D; i += NT) sm.dGL[i] = 0.f;
  for (int e = tid; e < CH * D; e += NT) dG[e] = dK[e] = 0.f;
  __syncthreads();
  if (tid < CH) {  // the segment index: document starts up to x
    float s = 0.f;
    for (int y = 0; y <= tid; ++y) s += sm.start[y];
    sm.seg[tid] = s;
  }
  // G as prep forms it (a segment start adds 0, gates clamped at kKdaGateFloor)
  for (int i = tid; i < D; i += NT) {
    const float* gp = p.g + cp.b * p.gsb + cp.t0 * p.gst + cp.h * p.gsh + i;
    float acc = 0.f;
    for (int x = 0; x < CH; ++x) {
      if (x < nvalid && sm.start[x] == 0.f) acc += fmaxf(gp[x * p.gst], kKdaGateFloor);
      G[x * D + i] = acc;
    }
  }
  __syncthreads();
  const float* GL = G + (CH - 1) * D;
  const float sL = seg[CH - 1];
  {  // kd = e^{G_last - G} . K [last segment] over x2
    const T* krow = rows_of<T>(p.k, cp.b, cp.h, cp.t0);
    for (int e = tid; e < CH * D / 2; e += NT) {
      const int x = e / (D / 2), i = 2 * (e % (D / 2));
      const float2 k2 = x < nvalid ? unpack2<T>(load_u32(krow + x * p.k.st + i)) : make_float2(0.f, 0.f);
      const bool last = seg[x] == sL;
      const float d0 = last ? exp_ftz(GL[i] - G[x * D + i]) : 0.f, d1 = last ? exp_ftz(GL[i + 1] - G[x * D + i + 1]) : 0.f;
      store_u32(sm.x2 + x * LD + i, pack2<T>(k2.x * d0, k2.y * d1));
    }
  }
  cp_async_wait_all();
  __syncthreads();

  // ---- the values side: dU, dk's kd term, the gate of the one-segment map, dB, dv
  {  // dU = kd X - r over r (each lane its own places)
    float acc[NJ][4];
    zero(acc);
    mma_rows<T, NJ, false>(acc, sm.x2, LD, sm.s, LD, m0, 0, D / 16, lane);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        T* px = sm.x1 + (m0 + (lane >> 2) + 8 * hf) * LD + 8 * j + 2 * (lane & 3);
        const float2 rr = unpack2<T>(load_u32(px));
        store_u32(px, pack2<T>(acc[j][2 * hf] - rr.x, acc[j][2 * hf + 1] - rr.y));
      }
  }
  {  // C = U X^T: dk_y += dd_y . C_y; dG_y -= kd_y . C_y; dG_last += sum_y kd_y . C_y
    float acc[NJ][4];
    zero(acc);
    mma_acc<T, NJ, false, true>(acc, sm.u, LD, sm.s, LD, m0, 0, 0, D / 16, NJ / 2, lane);
    float colp[NJ][2];
#pragma unroll
    for (int j = 0; j < NJ; ++j) colp[j][0] = colp[j][1] = 0.f;
    for_frag<D>(m0, lane, [&](int y, int i, int hf, int j, int par) {
      const float c = acc[j][2 * hf + par];
      const float dd = seg[y] == sL ? exp_ftz(GL[i] - G[y * D + i]) : 0.f;
      const float kc = to_f(sm.x2[y * LD + i]) * c;
      dK[y * D + i] += dd * c;
      dG[y * D + i] -= kc;
      colp[j][par] += kc;
    });
    add_cols<false>(sm.dGL, colp, 0, lane);
  }
  if (sL == 0.f) {  // dG_last += e^{G_last} . rowdot(X, S0) (S0 straight from global)
    const T* h = static_cast<const T*>(a.states) + at;
    for (int i = warp; i < D; i += NT / 32) {
      float part = 0.f;
      for (int j = 2 * lane; j < D; j += 64) {
        const float2 hh = unpack2<T>(load_u32(h + i * D + j)), xx = unpack2<T>(load_u32(sm.s + i * LD + j));
        part += hh.x * xx.x + hh.y * xx.y;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) atomicAdd(sm.dGL + i, exp_ftz(GL[i]) * part);
    }
  }
  __syncthreads();  // dU is whole; every warp is past X: h takes its tile
#pragma unroll
  for (int r = 0; r < D; r += CH)
    load_tile<T, D, NT>(sm.s + r * LD, static_cast<const T*>(a.states) + at + r * D, D, CH, D, tid);
  cp_async_commit();
  {  // dB = T^T dU (T^T[y][x] is zero for x < y: blocks warp..3); dv = beta dB;
     // dbeta_y += dB_y . v_y; dB over this warp's kd rows (only this warp read them)
    float acc[NJ][4];
    zero(acc);
    mma_acc<T, NJ, true, false>(acc, sm.tk, kLdP, sm.x1, LD, m0, 0, warp, CH / 16, NJ / 2, lane);
    T* dvrow = static_cast<T*>(a.dv) + cp.b * a.dvsb + cp.t0 * a.dvst + cp.h * a.dvsh;
    const T* vrow = rows_of<T>(p.v, cp.b, cp.h, cp.t0);
    float dbv[2] = {0.f, 0.f};
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int y = m0 + (lane >> 2) + 8 * hf, col = 8 * j + 2 * (lane & 3);
        const float b0 = acc[j][2 * hf], b1 = acc[j][2 * hf + 1];
        if (y < nvalid) {
          const float2 vv = unpack2<T>(load_u32(vrow + y * p.v.st + col));
          dbv[hf] += b0 * vv.x + b1 * vv.y;
          const float b = sm.bt[y];
          store_u32(dvrow + y * a.dvst + col, pack2<T>(b * b0, b * b1));
        }
        store_u32(sm.x2 + y * LD + col, pack2<T>(b0, b1));
      }
    add_rows(sm.db, dbv, m0, lane);
  }
  __syncthreads();  // every warp is past dU and T: dO and k take their tiles
  load_tile<T, D, NT>(sm.x1, rows_of<T>(a.dout, cp.b, cp.h, cp.t0), a.dout.st, nvalid, D, tid);
  load_tile<T, D, NT>(sm.tk, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, nvalid, D, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // ---- the state side: Z, dq's first term, the score gradients
  T* dqrow = static_cast<T*>(a.dq) + cp.b * a.dqsb + cp.t0 * a.dqst + cp.h * a.dqsh;
  const T* qrow = rows_of<T>(p.q, cp.b, cp.h, cp.t0);
  {  // Z = ent . (dB S0^T): dk -= beta Z; dG -= beta k . Z; dbeta -= k . Z
    float acc[NJ][4];
    zero(acc);
    mma_acc<T, NJ, false, true>(acc, sm.x2, LD, sm.s, LD, m0, 0, 0, D / 16, NJ / 2, lane);
    float kz[2] = {0.f, 0.f};
    for_frag<D>(m0, lane, [&](int x, int i, int hf, int j, int par) {
      const float z = seg[x] == 0.f ? exp_ftz(G[x * D + i]) * acc[j][2 * hf + par] : 0.f;
      const float kx = to_f(sm.tk[x * LD + i]), b = sm.bt[x];
      dK[x * D + i] -= b * z;
      dG[x * D + i] -= b * kx * z;
      kz[hf] -= kx * z;
    });
    add_rows(sm.db, kz, m0, lane);
  }
  {  // dq's first term scale ent . (dO S0^T): dG += q . it; out through dq's rows
    float acc[NJ][4];
    zero(acc);
    mma_acc<T, NJ, false, true>(acc, sm.x1, LD, sm.s, LD, m0, 0, 0, D / 16, NJ / 2, lane);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int x = m0 + (lane >> 2) + 8 * hf, i = 8 * j + 2 * (lane & 3);
        if (x >= nvalid) continue;
        const bool first = seg[x] == 0.f;
        const float d0 = first ? p.scale * exp_ftz(G[x * D + i]) * acc[j][2 * hf] : 0.f;
        const float d1 = first ? p.scale * exp_ftz(G[x * D + i + 1]) * acc[j][2 * hf + 1] : 0.f;
        const float2 qq = unpack2<T>(load_u32(qrow + x * p.q.st + i));
        dG[x * D + i] += qq.x * d0;
        dG[x * D + i + 1] += qq.y * d1;
        store_u32(dqrow + x * a.dqst + i, pack2<T>(d0, d1));
      }
  }
  {  // dP = scale (dO U^T) [y <= x], dL = -(dB U^T) [y < x], both in one segment
    float ee[8][4], bb[8][4];
    zero(ee);
    zero(bb);
    mma_acc<T, 8, false, true>(ee, sm.x1, LD, sm.u, LD, m0, 0, 0, D / 16, 4, lane);
    mma_acc<T, 8, false, true>(bb, sm.x2, LD, sm.u, LD, m0, 0, 0, D / 16, 4, lane);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int x = m0 + (lane >> 2) + 8 * hf, y0 = 8 * j + 2 * (lane & 3);
        float pv[2], lv[2];
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const int y = y0 + par;
          const bool same = seg[x] == seg[y];
          pv[par] = y <= x && same ? p.scale * ee[j][2 * hf + par] : 0.f;
          lv[par] = y < x && same ? -bb[j][2 * hf + par] : 0.f;
        }
        store_u32(sm.dP + x * kLdP + y0, pack2<T>(pv[0], pv[1]));
        store_u32(sm.dL + x * kLdP + y0, pack2<T>(lv[0], lv[1]));
      }
  }
  __syncthreads();  // dP, dL whole; every warp is past U and dB: q takes dB's tile
  load_tile<T, D, NT>(sm.x2, qrow, p.q.st, nvalid, D, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // ---- the decayed sums over tokens
  T* scr = sm.u + m0 * LD;  // this warp's rows of the v_new tile
  {  // dq = (first term) + sum_y dP_xy e^{G_x - G_y} . k_y; dG += q . (the sum)
    float acc[NJ][4];
    decayed_rows<T, D>(acc, sm.dP, sm.tk, scr, G, seg, warp, lane);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int x = m0 + (lane >> 2) + 8 * hf, i = 8 * j + 2 * (lane & 3);
        if (x >= nvalid) continue;
        const float2 qq = unpack2<T>(load_u32(sm.x2 + x * LD + i));
        dG[x * D + i] += qq.x * acc[j][2 * hf];
        dG[x * D + i + 1] += qq.y * acc[j][2 * hf + 1];
        // this lane wrote the first term here above
        const float2 f = unpack2<T>(load_u32(dqrow + x * a.dqst + i));
        store_u32(dqrow + x * a.dqst + i, pack2<T>(f.x + acc[j][2 * hf], f.y + acc[j][2 * hf + 1]));
      }
  }
  {  // R = sum_y dL_xy e^{G_x - G_y} . k_y: dk += beta R; dG += beta k . R; dbeta += k . R
    float acc[NJ][4];
    decayed_rows<T, D>(acc, sm.dL, sm.tk, scr, G, seg, warp, lane);
    float kr[2] = {0.f, 0.f};
    for_frag<D>(m0, lane, [&](int x, int i, int hf, int j, int par) {
      const float r = acc[j][2 * hf + par], kx = to_f(sm.tk[x * LD + i]), b = sm.bt[x];
      dK[x * D + i] += b * r;
      dG[x * D + i] += b * kx * r;
      kr[hf] += kx * r;
    });
    add_rows(sm.db, kr, m0, lane);
  }
  {  // dk += sum_x dP_xy e^{G_x - G_y} . q_x + sum_x beta_x dL_xy e^{G_x - G_y} . k_x; dG -= k . both
    float acc[NJ][4];
    decayed_cols<T, D, false>(acc, sm.dP, sm.x2, nullptr, scr, G, seg, warp, lane);
    for_frag<D>(m0, lane, [&](int y, int i, int hf, int j, int par) {
      const float c = acc[j][2 * hf + par];
      dK[y * D + i] += c;
      dG[y * D + i] -= to_f(sm.tk[y * LD + i]) * c;
    });
    decayed_cols<T, D, true>(acc, sm.dL, sm.tk, sm.bt, scr, G, seg, warp, lane);
    T* dkrow = static_cast<T*>(a.dk) + cp.b * a.dksb + cp.t0 * a.dkst + cp.h * a.dksh;
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
#pragma unroll
      for (int j = 0; j < NJ; ++j) {
        const int y = m0 + (lane >> 2) + 8 * hf, i = 8 * j + 2 * (lane & 3);
        float out[2];
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const float c = acc[j][2 * hf + par];
          out[par] = dK[y * D + i + par] + c;
          dG[y * D + i + par] -= to_f(sm.tk[y * LD + i + par]) * c;
        }
        if (y < nvalid) store_u32(dkrow + y * a.dkst + i, pack2<T>(out[0], out[1]));
      }
  }
  __syncthreads();
  // dg: dG summed backwards inside each segment (0 at a segment's first token, whose gate
  // G does not contain), a thread a key dim; dbeta
  for (int i = tid; i < D; i += NT) {
    float run = 0.f;
    for (int x = CH - 1; x >= 0; --x) {
      if (x < CH - 1 && seg[x + 1] != seg[x]) run = 0.f;
      run += dG[x * D + i] + (x == CH - 1 ? sm.dGL[i] : 0.f);
      const bool first = x == 0 ? seg[0] != 0.f : seg[x] != seg[x - 1];
      if (x < nvalid && a.dg != nullptr)
        a.dg[((cp.b * p.seqlen + cp.t0 + x) * p.heads + cp.h) * D + i] = first ? 0.f : run;
    }
  }
  if (tid < nvalid && a.dbeta != nullptr) a.dbeta[(cp.b * p.seqlen + cp.t0 + tid) * p.heads + cp.h] = sm.db[tid];
}

constexpr const char* kWho = "lasp2 (CUDA KDA, chunked backward)";

void kda_bwd_check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

}  // namespace

// Which chunk-gradient kernel runs (LASP2_DELTA_KDA_BWD_KERNEL, read at every call so
// that the tests and the timing A/B can switch it): new (the 8-warp kernel with its
// global loads issued ahead, the default), serial (the 8-warp kernel as it landed in
// session 11, loads where they are used) or old (the 4-warp kernel below).
enum class KdaBwdKernel { kNew, kSerial, kOld };
static KdaBwdKernel kda_backward_kernel() {
  const char* env = std::getenv("LASP2_DELTA_KDA_BWD_KERNEL");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "new") == 0) return KdaBwdKernel::kNew;
  if (std::strcmp(env, "serial") == 0) return KdaBwdKernel::kSerial;
  if (std::strcmp(env, "old") == 0) return KdaBwdKernel::kOld;
  fail(std::string(kWho) + ": LASP2_DELTA_KDA_BWD_KERNEL must be new, serial or old, not " + env);
}

int kda_backward_smem_bytes(int d) {
  if (kda_backward_kernel() != KdaBwdKernel::kOld) return kda_backward_wide_smem_bytes(d);
  return d == 64 ? static_cast<int>(sizeof(KdaBwdSmem<__nv_bfloat16, 64>))
                 : static_cast<int>(sizeof(KdaBwdSmem<__nv_bfloat16, 128>));
}

void launch_kda_backward(const Problem& p, const KdaBackwardArgs& a, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  if (p.dk != p.dv || (p.dk != 64 && p.dk != 128))
    fail("lasp2 (CUDA KDA, chunked backward): d_k = d_v must be 64 or 128");
  const KdaBwdKernel which = kda_backward_kernel();
  if (which != KdaBwdKernel::kOld) {
    launch_kda_backward_wide(p, a, which == KdaBwdKernel::kNew, s);
    return;
  }
  auto go = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const int bytes = static_cast<int>(sizeof(KdaBwdSmem<T, D>));
    kda_bwd_check(cudaFuncSetAttribute(kda_bwd_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes),
                  "KDA chunk backward smem");
    kda_bwd_kernel<T, D><<<dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())), NT, bytes, s>>>(
        p, a);
  };
  chunk_dispatch<true>(p, kWho, go);
  kda_bwd_check(cudaGetLastError(), "KDA chunk backward kernel");
}

}  // namespace lasp2::delta::gpu
