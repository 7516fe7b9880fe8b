// The chunk-gradient kernel of the KDA chunked backward (math: kda_chunk_bwd.h). One
// block of 8 warps per (chunk, b, h), mma.sync m16n8k16 in the input dtype with fp32
// accumulation. Warp w owns tokens [16 (w % 4), +16) and the column half w / 4 of every
// [64][d] product (as the GDN chunk backward's warps), so each lane keeps its dk and dq
// places in registers from the first product to the store, and dG (per element, fp32)
// sums in shared memory at places no other lane touches. Where session 10's 4-warp
// kernel (25.47 ms at the size below, since removed) spent its time, and what this one
// does instead:
// * fp32 [64][d] rows of 128 floats put the 8 rows of a fragment in one bank (8-way
//   conflicts on every G, dG and dk access): G and dG rows here are padded by 8 floats
//   and read as float2 (conflict free), dk lives in registers;
// * the four decayed token sums each took their own exponential a (x, y, dim) term
//   inside the diagonal sub-chunks: the two row sums (dP and dL against k) share one
//   exponential and one scaled tile between sub-chunks, and so do the two column sums
//   (dP against q, beta dL against k), whose tensor-core products and elementwise
//   terms go into one accumulator (only their sum is used);
// * 4 warps an SM (one 217 KiB block): 8 warps in a 191.75 KiB block at d = 128 (still
//   one an SM; 254 registers on sm_90a), 101.5 KiB at d = 64 (two an SM);
// * with one block an SM nothing hides a global load's latency: the loads the session-11
//   kernel waited on one round after another (k for kd, S0 for rowdot(X, S0), v next to
//   the dv stores that may alias it, the gates after a barrier, q twice) are issued
//   ahead of their use (10.41 -> 9.32 ms, measured side by side);
// * with two warps a scheduler every stall shows: session 11's kernel issued an
//   instruction every 7.3 cycles a warp, 2.5 of them waiting on the instruction fetch
//   (ncu), with 10104 instructions of SASS, among them 38 float atomicAdds to shared
//   memory (dbeta, dG_last; each a load / compare-and-swap loop with its own branches,
//   four warps contending for each dG_last place) and 64 gate loads (each behind its
//   own branch, its 64-bit address formed anew). Now dbeta and dG_last sum in slots
//   written by one lane each (no atomics), the gate loads step one pointer without tests
//   in a whole chunk, G is kept in log2 units (no multiply an exponential) and the loops
//   inside the diagonal sub-chunks are unrolled by 2 (9.26 -> 6.45 ms, measured side by
//   side; docs/history/delta-rule-log.md, "KDA chunk-gradient kernel, twelfth round").
// On one H200 at T = 64K, H = 16, d = 128, bf16: 6.45 ms (docs/history/delta-rule-log.md, "The KDA
// chunked backward" and the paragraphs after it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <string>
#include <type_traits>

#include "cuda/tc_tile_map.cuh"  // tile_map_box; tma_copy.cuh's barriers
#include "delta_rule/cuda/chunk_grad_maps.cuh"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

constexpr int kThreads = 256;  // 8 warps

template <typename T, int D>
struct KdaBwdSmem {
  static constexpr int LD = TcTile<D>::LD;
  static constexpr int LG = D + 8;  // fp32 rows padded by 32 bytes (see above)
  float G[CH * LG];
  float dG[CH * LG];
  T u[CH * LD];   // v_new; then the row sums' scaled tiles and the column sums' q tiles
  T x1[CH * LD];  // r, then dU, then dO; then the column sums' k tiles
  T x2[CH * LD];  // kd, then dB, then q
  T s[D * LD];    // dh, then h (the state entering the chunk)
  T tk[CH * LD];  // T (ld kLdP), then k
  T dP[CH * kLdP];
  T dL[CH * kLdP];
  float bt[CH], seg[CH], start[CH];
  // sums without shared-memory atomics (a float atomicAdd to shared memory is a load /
  // compare-and-swap loop on sm_90): dbeta's partial sums a column half (db[nh][x]),
  // dG_last's column sums a sub-chunk (gl4[mw][i]) and rowdot's a key dim (glr[i]), each
  // place written by one lane only, summed at the end
  float db[2 * CH], gl4[4 * D], glr[D];
};
static_assert(kLdP <= TcTile<64>::LD, "T fits a token tile");

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float2 ld2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// e^x of a G difference (or of G) as one MUFU.EX2: G is kept in shared memory already
// multiplied by log2(e) (one multiply a key dim and token instead of one an exponential,
// as exp_ftz does), so the argument goes to ex2 as it is. Every argument is <= 0 (a
// clamp or the gates' sign).
constexpr float kLog2e = 1.4426950408889634f;
__device__ __forceinline__ float ex2g(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// aP[x] = sum_{y <= x} dP_xy e^{G_x - G_y} . k_y and aL[x] the same with dL, for this
// warp's rows x (sub-chunk mw, first token r) and column half n0: for earlier sub-chunks
// Y on tensor cores as e^{G_x - G_r} . (M_XY (e^{G_r - G_y} . k_y)), one scaled tile for
// both products; inside the sub-chunk elementwise, one exponential for both sums. The
// scores are zero across segments and past the diagonal. scr: this warp's [16][d / 2]
// scratch (ld LD).
template <typename T, int D>
__device__ __forceinline__ void row_sums(float (&aP)[D / 16][4], float (&aL)[D / 16][4], const KdaBwdSmem<T, D>& sm,
                                         T* scr, int mw, int n0, int lane) {
  constexpr int NH = D / 16, LD = KdaBwdSmem<T, D>::LD, LG = KdaBwdSmem<T, D>::LG;
  const float* G = sm.G;
  const float* seg = sm.seg;
  const int r = 16 * mw;
  zero(aP);
  zero(aL);
  for (int Y = 0; Y < mw; ++Y) {
    for (int e = lane; e < 16 * D / 4; e += 32) {
      const int a = e / (D / 4), c = 2 * (e % (D / 4)), i = n0 + c, y = 16 * Y + a;
      const bool in = seg[y] == seg[r];
      const float2 gr = ld2(G + r * LG + i), gy = ld2(G + y * LG + i);
      const float f0 = in ? ex2g(gr.x - gy.x) : 0.f, f1 = in ? ex2g(gr.y - gy.y) : 0.f;
      const float2 k2 = unpack2<T>(load_u32(sm.tk + y * LD + i));
      store_u32(scr + a * LD + c, pack2<T>(k2.x * f0, k2.y * f1));
    }
    __syncwarp();
    mma_acc<T, NH, false, false>(aP, sm.dP + 16 * Y, kLdP, scr, LD, r, 0, 0, 1, NH / 2, lane);
    mma_acc<T, NH, false, false>(aL, sm.dL + 16 * Y, kLdP, scr, LD, r, 0, 0, 1, NH / 2, lane);
    __syncwarp();  // scr is rewritten for the next Y
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int x = r + (lane >> 2) + 8 * hf;
    const bool xin = seg[x] == seg[r];
    float2 gx[NH];
#pragma unroll
    for (int j = 0; j < NH; ++j) {
      const int i = n0 + 8 * j + 2 * (lane & 3);
      gx[j] = ld2(G + x * LG + i);
      const float2 gr = ld2(G + r * LG + i);
      const float f0 = xin ? ex2g(gx[j].x - gr.x) : 0.f, f1 = xin ? ex2g(gx[j].y - gr.y) : 0.f;
      aP[j][2 * hf] *= f0;
      aP[j][2 * hf + 1] *= f1;
      aL[j][2 * hf] *= f0;
      aL[j][2 * hf + 1] *= f1;
    }
    // y up to the last row of this half (warp-uniform bounds)
#pragma unroll 2
    for (int y = r; y < r + 8 * hf + 8; ++y) {
      const float mp = to_f(sm.dP[x * kLdP + y]), ml = to_f(sm.dL[x * kLdP + y]);
#pragma unroll
      for (int j = 0; j < NH; ++j) {
        const int i = n0 + 8 * j + 2 * (lane & 3);
        const float2 gy = ld2(G + y * LG + i);
        const float2 ky = unpack2<T>(load_u32(sm.tk + y * LD + i));
        const float t0 = ky.x * ex2g(fminf(gx[j].x - gy.x, 0.f));
        const float t1 = ky.y * ex2g(fminf(gx[j].y - gy.y, 0.f));
        aP[j][2 * hf] += mp * t0;
        aP[j][2 * hf + 1] += mp * t1;
        aL[j][2 * hf] += ml * t0;
        aL[j][2 * hf + 1] += ml * t1;
      }
    }
  }
}

// acc[y] = sum_{x >= y} e^{G_x - G_y} . (dP_xy q_x + beta_x dL_xy k_x) for this warp's
// rows y (sub-chunk mw, last token e) and column half n0: for later sub-chunks X on
// tensor cores as e^{G_e - G_y} . (dP_XY^T (e^{G_x - G_e} . q_x) + dL_XY^T (beta_x
// e^{G_x - G_e} . k_x)) (one exponential for both tiles), inside the sub-chunk
// elementwise (one exponential for both terms). scq, sck: this warp's [16][d / 2]
// scratch tiles (ld LD).
template <typename T, int D>
__device__ __forceinline__ void col_sums(float (&acc)[D / 16][4], const KdaBwdSmem<T, D>& sm, const T* qt, T* scq,
                                         T* sck, int mw, int n0, int lane) {
  constexpr int NH = D / 16, LD = KdaBwdSmem<T, D>::LD, LG = KdaBwdSmem<T, D>::LG;
  const float* G = sm.G;
  const float* seg = sm.seg;
  const int y0 = 16 * mw, e = y0 + 15;
  zero(acc);
  for (int X = mw + 1; X < CH / 16; ++X) {
    for (int t = lane; t < 16 * D / 4; t += 32) {
      const int a = t / (D / 4), c = 2 * (t % (D / 4)), i = n0 + c, x = 16 * X + a;
      const bool in = seg[x] == seg[e];
      const float2 gx = ld2(G + x * LG + i), ge = ld2(G + e * LG + i);
      const float f0 = in ? ex2g(gx.x - ge.x) : 0.f, f1 = in ? ex2g(gx.y - ge.y) : 0.f;
      const float2 q2 = unpack2<T>(load_u32(qt + x * LD + i)), k2 = unpack2<T>(load_u32(sm.tk + x * LD + i));
      const float b = sm.bt[x];
      store_u32(scq + a * LD + c, pack2<T>(q2.x * f0, q2.y * f1));
      store_u32(sck + a * LD + c, pack2<T>(b * f0 * k2.x, b * f1 * k2.y));
    }
    __syncwarp();
    // M^T's rows y0.. from M's [x][y] rows of X
    mma_acc<T, NH, true, false>(acc, sm.dP + 16 * X * kLdP, kLdP, scq, LD, y0, 0, 0, 1, NH / 2, lane);
    mma_acc<T, NH, true, false>(acc, sm.dL + 16 * X * kLdP, kLdP, sck, LD, y0, 0, 0, 1, NH / 2, lane);
    __syncwarp();
  }
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int y = y0 + (lane >> 2) + 8 * hf;
    const bool yin = seg[y] == seg[e];
    float2 gy[NH];
#pragma unroll
    for (int j = 0; j < NH; ++j) {
      const int i = n0 + 8 * j + 2 * (lane & 3);
      gy[j] = ld2(G + y * LG + i);
      const float2 ge = ld2(G + e * LG + i);
      acc[j][2 * hf] *= yin ? ex2g(ge.x - gy[j].x) : 0.f;
      acc[j][2 * hf + 1] *= yin ? ex2g(ge.y - gy[j].y) : 0.f;
    }
    // x from the first row of this half (warp-uniform bounds)
#pragma unroll 2
    for (int x = y0 + 8 * hf; x < y0 + 16; ++x) {
      const float mp = to_f(sm.dP[x * kLdP + y]), ml = sm.bt[x] * to_f(sm.dL[x * kLdP + y]);
#pragma unroll
      for (int j = 0; j < NH; ++j) {
        const int i = n0 + 8 * j + 2 * (lane & 3);
        const float2 gx = ld2(G + x * LG + i);
        const float2 qx = unpack2<T>(load_u32(qt + x * LD + i)), kx = unpack2<T>(load_u32(sm.tk + x * LD + i));
        acc[j][2 * hf] += ex2g(fminf(gx.x - gy[j].x, 0.f)) * (mp * qx.x + ml * kx.x);
        acc[j][2 * hf + 1] += ex2g(fminf(gx.y - gy[j].y, 0.f)) * (mp * qx.y + ml * kx.y);
      }
    }
  }
}

// dbeta's partial sums v[hf] of this lane's rows m0 + lane / 4 + 8 hf, added to its
// column half's slot of db (one lane a row and slot: no atomics).
template <typename S>
__device__ __forceinline__ void db_rows(S& sm, bool nh, const float (&v)[2], int m0, int lane) {
  float* dst = sm.db + (nh ? CH : 0);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const float s = row_sum(v[hf]);
    if ((lane & 3) == 0) dst[m0 + (lane >> 2) + 8 * hf] += s;
  }
}

// kTma (session 17, kda_bwd_kernel_tma; the default on sm_90): the token tiles
// (k twice, v_new, r, dh, T, h, dO, q) arrive as tensor-map boxes that thread 0 issues,
// one a 64-row tile, counted on two mbarriers, instead of 4 cp.async pieces a thread and
// tile (the GDN chunk backward measured 1.62 -> 1.55 ms so, session 16). The boxes are
// the padded tiles (tc_tile_map.cuh): the same bytes in the places the products read
// (rows past the part zero, as load_tile's zero-fill), so the same bits. Barrier 0 takes
// k (phase 0), h (1), q (2); barrier 1 the rest of the first group (0), dO and k (1).
struct KdaBwdMaps {
  // 0 k, 1 dh, 2 r, 3 v_new, 4 T, 5 h, 6 dO, 7 q (hdim / tdim / bdim: tile_map_box's)
  CUtensorMap map[8];
  int hdim[8], tdim[8], bdim[8];
};
constexpr int kMapK = 0, kMapDh = 1, kMapR = 2, kMapVnew = 3, kMapT = 4, kMapH = 5, kMapDo = 6, kMapQ = 7;
// the two barriers: 16 bytes after the tiles, 16-byte aligned
template <typename T, int D>
constexpr size_t kBarOff = (sizeof(KdaBwdSmem<T, D>) + 15) / 16 * 16;

// Thread 0 of a kTma block: box m (at head hh, token / row tt, batch bb) into dst, its
// bytes counted on bar (expected by the caller).
template <typename T>
__device__ __forceinline__ void kda_box(const KdaBwdMaps* maps, int m, const T* dst, int hh, int tt, int bb,
                                        uint64_t* bar) {
  lasp2::cuda::tile_map_box(smem_u32(dst), &maps->map[m], maps->hdim[m], maps->tdim[m], hh, tt, bb, bar);
}
// Thread 0 of a kTma block: the state tile (dh or h, D rows in boxes of 64) of this chunk
// into s; bytes expected by the caller.
template <typename T, int D>
__device__ __forceinline__ void kda_state_boxes(const KdaBwdMaps* maps, int m, T* s, const ChunkPos& cp,
                                                uint64_t* bar) {
#pragma unroll
  for (int r = 0; r < D; r += CH)
    kda_box<T>(maps, m, s + r * TcTile<D>::LD, static_cast<int>(cp.bh), cp.c * D + r, 0, bar);
}

// The global loads are issued ahead of their use (see "Loads ahead" in
// docs/history/delta-rule-log.md): with one block an SM at d = 128 nothing else hides their latency.
template <typename T, int D, bool kTma>
__device__ __forceinline__ void kda_bwd_body(const Problem& p, const KdaBackwardArgs& a,
                                             [[maybe_unused]] const KdaBwdMaps* maps) {
  using Smem = KdaBwdSmem<T, D>;
  constexpr int LD = Smem::LD, LG = Smem::LG;
  constexpr int NH = D / 16;  // n8 tiles across half a head dim
  constexpr int NTH = kThreads;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Smem& sm = *reinterpret_cast<Smem*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5;
  const WarpPart wp(tid, D);
  const int lane = wp.lane, mw = wp.mw, m0 = wp.m0, n0 = wp.n0;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  const int64_t at = chunk * D * D;
  const int nvalid = cp.nvalid;
  float* G = sm.G;
  float* dG = sm.dG;
  const float* seg = sm.seg;

  static_assert(D <= NTH && CH <= NTH, "a thread a key dim, a thread a token");
  // kTma: both barriers' phases, their bytes
  [[maybe_unused]] uint64_t* bars = reinterpret_cast<uint64_t*>(smem_raw + kBarOff<T, D>);
  [[maybe_unused]] constexpr uint32_t kTile = CH * LD * sizeof(T), kTileT = CH * kLdP * sizeof(T);
  if constexpr (kTma) {
    if (tid == 0) {  // the same tiles in the same places as the cp.async groups below
      init_ring_barriers<2>(bars);
      const int bh = static_cast<int>(cp.bh), t = cp.c * CH;
      mbar_arrive_expect_tx(&bars[0], kTile);
      kda_box<T>(maps, kMapK, sm.x2, cp.h, t, cp.b, &bars[0]);
      mbar_arrive_expect_tx(&bars[1], (2 + D / CH) * kTile + kTileT);
      kda_box<T>(maps, kMapVnew, sm.u, bh, t, 0, &bars[1]);
      kda_box<T>(maps, kMapR, sm.x1, bh, t, 0, &bars[1]);
      kda_state_boxes<T, D>(maps, kMapDh, sm.s, cp, &bars[1]);
      kda_box<T>(maps, kMapT, sm.tk, bh, t, 0, &bars[1]);
    }
  } else {
    // k into kd's tile, its own group (kd reads it once G is summed); rows past nvalid
    // zero-filled
    load_tile<T, D, NTH>(sm.x2, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, nvalid, D, tid);
    cp_async_commit();
    load_scratch_rows<T, D, NTH>(sm.u, a.v_new, cp, tid);
    load_scratch_rows<T, D, NTH>(sm.x1, a.r, cp, tid);
#pragma unroll
    for (int r = 0; r < D; r += CH)
      load_tile<T, D, NTH>(sm.s + r * LD, static_cast<const T*>(a.dh) + at + r * D, D, CH, D, tid);
    load_tile<T, CH, NTH>(sm.tk, static_cast<const T*>(a.t) + chunk * CH * CH, CH, CH, CH, tid);
    cp_async_commit();
  }
  // this thread's key dim's gates (64 loads in one batch), issued before the barrier
  // below so that they are in flight with beta's and the document starts'
  float gv[CH];
  if (tid < D) {
    const float* gp = p.g + cp.b * p.gsb + cp.t0 * p.gst + cp.h * p.gsh + tid;
    const int64_t st = p.gst;
    if (nvalid == CH) {
#pragma unroll
      for (int x = 0; x < CH; ++x, gp += st) gv[x] = *gp;
    } else {
#pragma unroll
      for (int x = 0; x < CH; ++x, gp += st) gv[x] = x < nvalid ? *gp : 0.f;
    }
  }
  if (tid < CH) {
    const int x = tid;
    const int64_t t = cp.t0 + x;
    const bool valid = x < nvalid;
    sm.bt[x] = valid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
    sm.start[x] = valid && p.doc_start != nullptr && p.doc_start[cp.b * p.doc_sb + t] != 0 ? 1.f : 0.f;
    sm.db[x] = sm.db[CH + x] = 0.f;
  }
  for (int i = tid; i < D; i += NTH) sm.glr[i] = 0.f;
  static_assert(LG % 4 == 0, "whole float4s");
#pragma unroll
  for (int e = 4 * tid; e < CH * LG; e += 4 * NTH)  // 16 bytes a store
    *reinterpret_cast<float4*>(dG + e) = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncthreads();
  if (tid < CH) {  // the segment index: document starts up to x, counted from two ballots
    static_assert(CH == 64, "two warps of tokens");
    const int lane = tid & 31;
    const unsigned lo = __ballot_sync(0xffffffffu, sm.start[lane] != 0.f);
    const unsigned hi = __ballot_sync(0xffffffffu, sm.start[32 + lane] != 0.f);
    const unsigned upto = 0xffffffffu >> (31 - lane);  // bits 0..lane
    const int n = tid < 32 ? __popc(lo & upto) : __popc(lo) + __popc(hi & upto);
    sm.seg[tid] = static_cast<float>(n);
  }
  // G as prep forms it (a segment start adds 0, gates clamped at kKdaGateFloor); the
  // chunk's gates are loaded first, then summed
  if (tid < D) {
    const int i = tid;
    float acc = 0.f;
#pragma unroll
    for (int x = 0; x < CH; ++x) {
      // gv is 0 past the part (fmaxf(0, floor) adds 0): a select, no branch
      acc += sm.start[x] == 0.f ? fmaxf(gv[x], kKdaGateFloor) : 0.f;
      G[x * LG + i] = acc * kLog2e;  // in log2 units (ex2g)
    }
  }
  cp_async_wait_group1();  // k's group (the first) has landed
  __syncthreads();
  if constexpr (kTma) mbar_wait(&bars[0], 0);  // k (after the barrier: thread 0 has initialised it)
  const float* GL = G + (CH - 1) * LG;
  const float sL = seg[CH - 1];
  {  // kd = e^{G_last - G} . K [last segment], in place over k's tile
    static_assert(CH * D / 2 % NTH == 0, "whole rounds");
#pragma unroll
    for (int it = 0; it < CH * D / 2 / NTH; ++it) {
      const int e = tid + it * NTH, x = e / (D / 2), i = 2 * (e % (D / 2));
      T* px = sm.x2 + x * LD + i;
      const float2 k2 = unpack2<T>(load_u32(px));
      const bool last = seg[x] == sL;
      const float2 gl = ld2(GL + i), g = ld2(G + x * LG + i);
      const float d0 = last ? ex2g(gl.x - g.x) : 0.f, d1 = last ? ex2g(gl.y - g.y) : 0.f;
      store_u32(px, pack2<T>(k2.x * d0, k2.y * d1));
    }
  }
  cp_async_wait_all();
  __syncthreads();
  if constexpr (kTma) mbar_wait(&bars[1], 0);  // v_new, r, dh, T

  // S0's rows warp + 8 r for rowdot(X, S0) (this lane's pairs 2 lane + 64 c),
  // all loaded here in one batch, used after the two products below
  constexpr int RR = D / 8, RC = D / 64;
  static_assert(NTH / 32 == 8 && D % 64 == 0, "8 warps, 32 pairs a row a round");
  const bool rowdot = sL == 0.f;  // block-uniform
  const T* h0 = static_cast<const T*>(a.states) + at;
  uint32_t hreg[RR][RC];
  if (rowdot) {
#pragma unroll
    for (int r = 0; r < RR; ++r)
#pragma unroll
      for (int c = 0; c < RC; ++c) hreg[r][c] = load_u32(h0 + (warp + 8 * r) * D + 2 * lane + 64 * c);
  }

  // this lane's dk places, in registers until the store
  float dk[NH][4];
  // ---- the values side: dU, dk's kd term, the gate of the one-segment map, dB, dv
  {  // dU = kd X - r over r (each lane its own places)
    float acc[NH][4];
    zero(acc);
    mma_acc<T, NH, false, false>(acc, sm.x2, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
    for_pairs<NH>(m0, lane, [&](int j, int hf, int x, int c) {
      T* px = sm.x1 + x * LD + n0 + c;
      const float2 rr = unpack2<T>(load_u32(px));
      store_u32(px, pack2<T>(acc[j][2 * hf] - rr.x, acc[j][2 * hf + 1] - rr.y));
    });
  }
  {  // C = U X^T: dk_y = dd_y . C_y; dG_y -= kd_y . C_y; dG_last += sum_y kd_y . C_y
    float acc[NH][4];
    zero(acc);
    mma_acc<T, NH, false, true>(acc, sm.u, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
    float colp[NH][2];
#pragma unroll
    for (int j = 0; j < NH; ++j) colp[j][0] = colp[j][1] = 0.f;
    for_pairs<NH>(m0, lane, [&](int j, int hf, int y, int c) {
      const int i = n0 + c;
      const bool last = seg[y] == sL;
      const float2 gl = ld2(GL + i), g = ld2(G + y * LG + i);
      const float2 kd = unpack2<T>(load_u32(sm.x2 + y * LD + i));
      const float c0 = acc[j][2 * hf], c1 = acc[j][2 * hf + 1];
      dk[j][2 * hf] = last ? ex2g(gl.x - g.x) * c0 : 0.f;
      dk[j][2 * hf + 1] = last ? ex2g(gl.y - g.y) * c1 : 0.f;
      float2* pg = reinterpret_cast<float2*>(dG + y * LG + i);
      const float2 old = *pg;
      *pg = make_float2(old.x - kd.x * c0, old.y - kd.y * c1);
      colp[j][0] += kd.x * c0;
      colp[j][1] += kd.y * c1;
    });
    {  // this sub-chunk's slot: each column written by one lane
#pragma unroll
      for (int j = 0; j < NH; ++j)
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const float s = col_sum(colp[j][par]);
          if (lane < 4) sm.gl4[mw * D + n0 + 8 * j + 2 * lane + par] = s;
        }
    }
  }
  if (rowdot) {  // dG_last += e^{G_last} . rowdot(X, S0) (S0 from the batch above)
#pragma unroll
    for (int r = 0; r < RR; ++r) {
      const int i = warp + 8 * r;
      float part = 0.f;
#pragma unroll
      for (int c = 0; c < RC; ++c) {
        const int j = 2 * lane + 64 * c;
        const float2 hh = unpack2<T>(hreg[r][c]), xx = unpack2<T>(load_u32(sm.s + i * LD + j));
        part += hh.x * xx.x + hh.y * xx.y;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) sm.glr[i] = ex2g(GL[i]) * part;  // row i is this warp's only
    }
  }
  __syncthreads();  // dU is whole; every warp is past X and kd: h takes X's tile
  if constexpr (kTma) {
    if (tid == 0) {
      fence_proxy_async_shared();  // the block's reads of X before the copy's writes
      mbar_arrive_expect_tx(&bars[0], (D / CH) * kTile);
      kda_state_boxes<T, D>(maps, kMapH, sm.s, cp, &bars[0]);
    }
  } else {
#pragma unroll
    for (int r = 0; r < D; r += CH)
      load_tile<T, D, NTH>(sm.s + r * LD, static_cast<const T*>(a.states) + at + r * D, D, CH, D, tid);
  }
  cp_async_commit();
  {  // dB = T^T dU (T^T[y][x] is zero for x < y: blocks mw..3); dv = beta dB;
     // dbeta_y += dB_y . v_y; dB over kd's tile (every warp is past kd)
    T* dvrow = static_cast<T*>(a.dv) + cp.b * a.dvsb + cp.t0 * a.dvst + cp.h * a.dvsh;
    const T* vrow = rows_of<T>(p.v, cp.b, cp.h, cp.t0);
    // this lane's v pairs in one batch before the product (loaded next to their use, each
    // load would wait for the dv store before it, which may alias it)
    uint32_t vreg[NH][2];
    for_pairs<NH>(m0, lane, [&](int j, int hf, int y, int c) {
        vreg[j][hf] = y < nvalid ? load_u32(vrow + y * p.v.st + n0 + c) : 0u;
      });
    float acc[NH][4];
    zero(acc);
    mma_acc<T, NH, true, false>(acc, sm.tk, kLdP, sm.x1, LD, m0, n0, mw, CH / 16, NH / 2, lane);
    float dbv[2] = {0.f, 0.f};
    for_pairs<NH>(m0, lane, [&](int j, int hf, int y, int c) {
      const int col = n0 + c;
      const float b0 = acc[j][2 * hf], b1 = acc[j][2 * hf + 1];
      if (y < nvalid) {
        const float2 vv = unpack2<T>(vreg[j][hf]);
        dbv[hf] += b0 * vv.x + b1 * vv.y;
        const float b = sm.bt[y];
        store_u32(dvrow + y * a.dvst + col, pack2<T>(b * b0, b * b1));
      }
      store_u32(sm.x2 + y * LD + col, pack2<T>(b0, b1));
    });
    db_rows(sm, wp.n0 != 0, dbv, m0, lane);
  }
  __syncthreads();  // every warp is past dU and T: dO and k take their tiles
  if constexpr (kTma) {
    if (tid == 0) {
      fence_proxy_async_shared();  // the block's accesses of dU and T before the copies' writes
      mbar_arrive_expect_tx(&bars[1], 2 * kTile);
      kda_box<T>(maps, kMapDo, sm.x1, cp.h, cp.c * CH, cp.b, &bars[1]);
      kda_box<T>(maps, kMapK, sm.tk, cp.h, cp.c * CH, cp.b, &bars[1]);
    }
  } else {
    load_tile<T, D, NTH>(sm.x1, rows_of<T>(a.dout, cp.b, cp.h, cp.t0), a.dout.st, nvalid, D, tid);
    load_tile<T, D, NTH>(sm.tk, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, nvalid, D, tid);
  }
  cp_async_commit();
  // Z's product (dB and S0 only) while dO and k land; S0's group (the older one) waited
  // here, with dO and k already in flight
  float zacc[NH][4];
  zero(zacc);
  cp_async_wait_group1();
  __syncthreads();  // S0's tile whole
  if constexpr (kTma) mbar_wait(&bars[0], 1);  // h
  mma_acc<T, NH, false, true>(zacc, sm.x2, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
  cp_async_wait_all();
  __syncthreads();
  if constexpr (kTma) mbar_wait(&bars[1], 1);  // dO and k

  // ---- the state side: Z, dq's first term, the score gradients
  T* dqrow = static_cast<T*>(a.dq) + cp.b * a.dqsb + cp.t0 * a.dqst + cp.h * a.dqsh;
  [[maybe_unused]] const T* qrow = rows_of<T>(p.q, cp.b, cp.h, cp.t0);  // (cp.async)
  {  // Z = ent . (dB S0^T): dk -= beta Z; dG -= beta k . Z; dbeta -= k . Z
    float (&acc)[NH][4] = zacc;
    float kz[2] = {0.f, 0.f};
    for_pairs<NH>(m0, lane, [&](int j, int hf, int x, int c) {
      const int i = n0 + c;
      const bool first = seg[x] == 0.f;
      const float2 g = ld2(G + x * LG + i);
      const float z0 = first ? ex2g(g.x) * acc[j][2 * hf] : 0.f;
      const float z1 = first ? ex2g(g.y) * acc[j][2 * hf + 1] : 0.f;
      const float2 kx = unpack2<T>(load_u32(sm.tk + x * LD + i));
      const float b = sm.bt[x];
      dk[j][2 * hf] -= b * z0;
      dk[j][2 * hf + 1] -= b * z1;
      float2* pg = reinterpret_cast<float2*>(dG + x * LG + i);
      const float2 old = *pg;
      *pg = make_float2(old.x - b * kx.x * z0, old.y - b * kx.y * z1);
      kz[hf] -= kx.x * z0 + kx.y * z1;
    });
    db_rows(sm, wp.n0 != 0, kz, m0, lane);
  }
  // dq's first term scale ent . (dO S0^T), in registers until the row sums (dG's q term,
  // q . (it + the row sum), in the row sums' epilogue)
  float dq[NH][4];
  zero(dq);
  mma_acc<T, NH, false, true>(dq, sm.x1, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
  for_pairs<NH>(m0, lane, [&](int j, int hf, int x, int c) {
    const int i = n0 + c;
    const bool first = x < nvalid && seg[x] == 0.f;
    const float2 g = ld2(G + x * LG + i);
    const float d0 = first ? p.scale * ex2g(g.x) * dq[j][2 * hf] : 0.f;
    const float d1 = first ? p.scale * ex2g(g.y) * dq[j][2 * hf + 1] : 0.f;
    dq[j][2 * hf] = d0;
    dq[j][2 * hf + 1] = d1;
  });
  // every warp is past S0 (Z, dq's first term): q takes S0's tile, landing while dP and dL
  // are formed
  __syncthreads();
  if constexpr (kTma) {
    if (tid == 0) {
      fence_proxy_async_shared();  // the block's reads of S0 before the copy's writes
      mbar_arrive_expect_tx(&bars[0], kTile);
      kda_box<T>(maps, kMapQ, sm.s, cp.h, cp.c * CH, cp.b, &bars[0]);
    }
  } else {
    load_tile<T, D, NTH>(sm.s, qrow, p.q.st, nvalid, D, tid);
  }
  cp_async_commit();
  {  // dP = scale (dO U^T) [y <= x], dL = -(dB U^T) [y < x], both in one segment: this
     // warp's rows and score columns c0.. (the 16-column pairs right of the diagonal
     // block stay zero)
    const int c0 = wp.c0;
    float ee[4][4], bb[4][4];
    zero(ee);
    zero(bb);
    mma_acc<T, 4, false, true>(ee, sm.x1, LD, sm.u, LD, m0, c0, 0, D / 16, wp.tri, lane);
    mma_acc<T, 4, false, true>(bb, sm.x2, LD, sm.u, LD, m0, c0, 0, D / 16, wp.tri, lane);
    for_pairs<4>(m0, lane, [&](int j, int hf, int x, int c) {
      const int y0 = c0 + c;
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
    });
  }
  cp_async_wait_all();  // q (issued before dP, dL)
  __syncthreads();      // dP, dL whole; q's tile whole
  if constexpr (kTma) mbar_wait(&bars[0], 0);  // q (the barrier's third phase)
  const T* qt = sm.s;   // q's [64][LD] tile

  // ---- the decayed sums over tokens (scratch: this warp's rows and column half of the
  // v_new and dO tiles, which no warp reads any more)
  T* scr_u = sm.u + m0 * LD + n0;
  T* scr_x = sm.x1 + m0 * LD + n0;
  {  // dq += sum_y dP_xy e^{G_x - G_y} . k_y, dG += q . (the sum); R = sum_y dL_xy e^{G_x -
     // G_y} . k_y: dk += beta R; dG += beta k . R; dbeta += k . R
    float aP[NH][4], aL[NH][4];
    row_sums<T, D>(aP, aL, sm, scr_u, mw, n0, lane);
    float kr[2] = {0.f, 0.f};
    for_pairs<NH>(m0, lane, [&](int j, int hf, int x, int c) {
      const int i = n0 + c;
      const float p0 = aP[j][2 * hf], p1 = aP[j][2 * hf + 1], r0 = aL[j][2 * hf], r1 = aL[j][2 * hf + 1];
      const float2 kx = unpack2<T>(load_u32(sm.tk + x * LD + i));
      const float b = sm.bt[x];
      dk[j][2 * hf] += b * r0;
      dk[j][2 * hf + 1] += b * r1;
      kr[hf] += kx.x * r0 + kx.y * r1;
      float2 dgv = make_float2(b * kx.x * r0, b * kx.y * r1);
      if (x < nvalid) {
        const float2 qq = unpack2<T>(load_u32(qt + x * LD + i));
        const float s0 = dq[j][2 * hf] + p0, s1 = dq[j][2 * hf + 1] + p1;
        dgv.x += qq.x * s0;  // q . dq whole
        dgv.y += qq.y * s1;
        store_u32(dqrow + x * a.dqst + i, pack2<T>(s0, s1));
      }
      float2* pg = reinterpret_cast<float2*>(dG + x * LG + i);
      const float2 old = *pg;
      *pg = make_float2(old.x + dgv.x, old.y + dgv.y);
    });
    db_rows(sm, wp.n0 != 0, kr, m0, lane);
  }
  __syncwarp();  // the row sums' scratch reads are done before the column sums write it
  {  // dk += sum_x e^{G_x - G_y} . (dP_xy q_x + beta_x dL_xy k_x); dG -= k . (the sum)
    float acc[NH][4];
    col_sums<T, D>(acc, sm, qt, scr_u, scr_x, mw, n0, lane);
    T* dkrow = static_cast<T*>(a.dk) + cp.b * a.dksb + cp.t0 * a.dkst + cp.h * a.dksh;
    for_pairs<NH>(m0, lane, [&](int j, int hf, int y, int c) {
      const int i = n0 + c;
      const float c0 = acc[j][2 * hf], c1 = acc[j][2 * hf + 1];
      const float2 ky = unpack2<T>(load_u32(sm.tk + y * LD + i));
      float2* pg = reinterpret_cast<float2*>(dG + y * LG + i);
      const float2 old = *pg;
      *pg = make_float2(old.x - ky.x * c0, old.y - ky.y * c1);
      if (y < nvalid) store_u32(dkrow + y * a.dkst + i, pack2<T>(dk[j][2 * hf] + c0, dk[j][2 * hf + 1] + c1));
    });
  }
  __syncthreads();
  // dg: dG summed backwards inside each segment (0 at a segment's first token, whose gate
  // G does not contain), a thread a key dim; dbeta
  for (int i = tid; i < D; i += NTH) {
    const float gl = sm.glr[i] + ((sm.gl4[i] + sm.gl4[D + i]) + (sm.gl4[2 * D + i] + sm.gl4[3 * D + i]));
    float run = 0.f;
    for (int x = CH - 1; x >= 0; --x) {
      if (x < CH - 1 && seg[x + 1] != seg[x]) run = 0.f;
      run += dG[x * LG + i] + (x == CH - 1 ? gl : 0.f);
      const bool first = x == 0 ? seg[0] != 0.f : seg[x] != seg[x - 1];
      if (x < nvalid && a.dg != nullptr)
        a.dg[((cp.b * p.seqlen + cp.t0 + x) * p.heads + cp.h) * D + i] = first ? 0.f : run;
    }
  }
  if (tid < nvalid && a.dbeta != nullptr)
    a.dbeta[(cp.b * p.seqlen + cp.t0 + tid) * p.heads + cp.h] = sm.db[tid] + sm.db[CH + tid];
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 2 : 1) kda_bwd_kernel(Problem p, KdaBackwardArgs a) {
  kda_bwd_body<T, D, false>(p, a, nullptr);
}
// kTma above; the maps built per launch on the host (launch_kda_backward_tma)
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, D == 64 ? 2 : 1)
    kda_bwd_kernel_tma(Problem p, KdaBackwardArgs a, const __grid_constant__ KdaBwdMaps maps) {
  kda_bwd_body<T, D, true>(p, a, &maps);
}

constexpr const char* kWho = "lasp2 (CUDA KDA, chunked backward)";

// Which kernel runs (LASP2_DELTA_KDA_BWD_KERNEL, read at every launch so that the tests
// and the timing A/B can switch it). Unset or empty (kAuto, the default): tma where the
// tensor-map copies can run (sm_90 code on an sm_90 device, every view mappable; measured
// 3 % faster at 64K on the H200, the same bits), lean otherwise or with
// LASP2_CUDA_TILE_COPY=cp_async, silently, as the GDN passes choose. lean: the cp.async
// kernel. tma: the tensor-map kernel, an error where it cannot run (not a silent lean:
// the tests compare the two). (tmahoist, tma with the GDN backward's loads ahead of the
// stores, measured no faster than tma and was removed, session 17.)
enum class KdaBwdKernel { kAuto, kLean, kTma };
KdaBwdKernel kda_backward_kernel() {
  constexpr KdaBwdKernel kNamed[] = {KdaBwdKernel::kLean, KdaBwdKernel::kTma};
  const int i = env_choice("LASP2_DELTA_KDA_BWD_KERNEL", {"lean", "tma"}, -1);
  return i < 0 ? KdaBwdKernel::kAuto : kNamed[i];
}

// kda_bwd_kernel_tma where it can run (sm_90 code on an sm_90 device, every map
// encodable); false (nothing launched) otherwise.
template <typename T, int D>
bool launch_kda_backward_tma(const Problem& p, const KdaBackwardArgs& a, cudaStream_t s) {
  const int bytes = static_cast<int>(kBarOff<T, D>) + 16;  // + the two barriers
  return launch_grad_kernel_tma<T, D, KdaBwdMaps, kThreads>(
      kda_bwd_kernel_tma<T, D>, p, a, bytes, kWho, "KDA chunk backward attributes", s,
      [&](ChunkGradMaps<T, KdaBwdMaps>& e, int64_t nck, int64_t npad) {
        return e.template tokens<D>(kMapK, p.k) &&
               e.template tokens<D>(kMapQ, p.q) &&
               e.template tokens<D>(kMapDo, a.dout) &&
               e.template scratch<D>(kMapDh, a.dh, nck * D, D) &&
               e.template scratch<D>(kMapH, a.states, nck * D, D) &&
               e.template scratch<D>(kMapR, a.r, npad, D) &&
               e.template scratch<D>(kMapVnew, a.v_new, npad, D) &&
               e.template scratch<CH>(kMapT, a.t, npad, CH);
      });
}

}  // namespace

int kda_backward_smem_bytes(int d) {
  return d == 64 ? static_cast<int>(sizeof(KdaBwdSmem<__nv_bfloat16, 64>))
                 : static_cast<int>(sizeof(KdaBwdSmem<__nv_bfloat16, 128>));
}

void launch_kda_backward(const Problem& p, const KdaBackwardArgs& a, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  if (p.dk != p.dv || (p.dk != 64 && p.dk != 128)) fail(std::string(kWho) + ": d_k = d_v must be 64 or 128");
  const KdaBwdKernel which = kda_backward_kernel();
  auto go = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    if (which == KdaBwdKernel::kTma) {
      if (launch_kda_backward_tma<T, D>(p, a, s)) return;
      fail(std::string(kWho) + ": LASP2_DELTA_KDA_BWD_KERNEL=tma needs an sm_90 device and binary and "
                               "views a tensor map can take");
    }
    if (which == KdaBwdKernel::kAuto && !lasp2::cuda::tile_copy_forced_cp_async() &&
        launch_kda_backward_tma<T, D>(p, a, s))
      return;
    const int bytes = static_cast<int>(sizeof(KdaBwdSmem<T, D>));
    auto* kernel = kda_bwd_kernel<T, D>;
    chunk_allow_max_shared(kernel, bytes, kWho, "KDA chunk backward attributes");
    const dim3 grid(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh()));
    kernel<<<grid, kThreads, bytes, s>>>(p, a);
  };
  chunk_dispatch<true>(p, kWho, go);
  chunk_check(cudaGetLastError(), kWho, "KDA chunk backward kernel");
}

}  // namespace lasp2::delta::gpu
