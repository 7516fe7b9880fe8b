// The chunked tensor-core forward kernels of KDA (see kda_chunk.h): mma.sync m16n8k16
// in the input dtype (fp16 / bf16) with fp32 accumulation on the GDN chunk kernels'
// tiles and helpers (delta_chunk_common.cuh), 4 warps a block. Warp w owns tokens
// [16 w, 16 w + 16) of a chunk in the token-row products and state rows
// [w d / 4, (w + 1) d / 4) in the state products.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_invert.cuh"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_prep.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

constexpr int kSub = 16;  // tokens of a sub-chunk: the factoring points of L and P

// ---- prep (the 4-warp one: LASP2_DELTA_KDA_PREP=old; the default is kda_prep.cu's) -----------
// 150 KiB at d = 128 (fits sm_80's 163 KiB opt-in): one block an SM on sm_90, where
// the GDN prep runs four (the per-element gates take G, 32 KiB, and the per-warp
// scaled sub-chunk tiles, 51 KiB).
template <typename T, int D>
struct KdaPrepSmem {
  static constexpr int LD = TcTile<D>::LD;
  T k[CH * LD];   // k, then (e^G . k) [s = 0]
  T qv[CH * LD];  // q, then v
  float G[CH * D];
  float L[CH * LDL];
  float Tm[CH * LDL];
  // per warp: its rows scaled to its first token r (e^{G_x - G_r} . q_x, . k_x) and an
  // earlier sub-chunk's keys scaled from r (e^{G_r - G_y} . k_y); later T diag(beta)
  T sub[4][3][kSub * LD];
  float bt[CH], s[CH], start[CH];
};
static_assert(CH * kLdP <= 4 * 3 * kSub * TcTile<64>::LD, "T diag(beta) fits where the sub-chunk tiles were");

template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_prep_kernel(Problem p, KdaPrep out) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaPrepSmem<T, D>& sm = *reinterpret_cast<KdaPrepSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  load_tile<T, D, NT>(sm.k, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, cp.nvalid, D, tid);
  load_tile<T, D, NT>(sm.qv, rows_of<T>(p.q, cp.b, cp.h, cp.t0), p.q.st, cp.nvalid, D, tid);
  cp_async_commit();
  // past the head (head maps only) and past the part: identity transitions
  const int head_end = out.head_end != nullptr ? out.head_end[cp.b] : -1;
  auto live = [&](int x) { return x < cp.nvalid && (head_end < 0 || cp.c * CH + x < head_end); };
  if (tid < CH) {
    const int x = tid;
    const int64_t t = cp.t0 + x;
    const bool valid = live(x);
    sm.bt[x] = valid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
    sm.start[x] = valid && p.doc_start != nullptr && p.doc_start[cp.b * p.doc_sb + t] != 0 ? 1.f : 0.f;
  }
  __syncthreads();
  if (tid < CH) {  // the segment index: document starts up to x
    float s = 0.f;
    for (int y = 0; y <= tid; ++y) s += sm.start[y];
    sm.s[tid] = s;
  }
  // G: a thread a key dim (consecutive dims: coalesced gate reads), sequential over tokens;
  // a segment start adds 0, a gate below kKdaGateFloor (-inf among them) adds the floor
  for (int i = tid; i < D; i += NT) {
    const float* gp = p.g + cp.b * p.gsb + cp.t0 * p.gst + cp.h * p.gsh + i;
    float acc = 0.f;
#pragma unroll 16
    for (int x = 0; x < CH; ++x) {
      if (live(x) && sm.start[x] == 0.f) acc += fmaxf(gp[x * p.gst], kKdaGateFloor);
      sm.G[x * D + i] = acc;
    }
  }
  cp_async_wait_all();
  __syncthreads();
  const float* GL = sm.G + (CH - 1) * D;
  const float sL = sm.s[CH - 1];
  {  // qg, kd (16-bit rows) and eL
    T* qg = static_cast<T*>(out.qg) + cp.row0 * D;
    T* kd = static_cast<T*>(out.kd) + cp.row0 * D;
    for (int e = tid; e < CH * D / 2; e += NT) {
      const int x = e / (D / 2), i = 2 * (e % (D / 2));
      const float2 q2 = unpack2<T>(load_u32(sm.qv + x * LD + i)), k2 = unpack2<T>(load_u32(sm.k + x * LD + i));
      const float2 G2 = *reinterpret_cast<const float2*>(sm.G + x * D + i);
      const bool first = sm.s[x] == 0.f, last = sm.s[x] == sL;
      const float a0 = first ? p.scale * __expf(G2.x) : 0.f, a1 = first ? p.scale * __expf(G2.y) : 0.f;
      const float d0 = last ? __expf(GL[i] - G2.x) : 0.f, d1 = last ? __expf(GL[i + 1] - G2.y) : 0.f;
      store_u32(qg + x * D + i, pack2<T>(q2.x * a0, q2.y * a1));
      store_u32(kd + x * D + i, pack2<T>(k2.x * d0, k2.y * d1));
    }
    for (int i = tid; i < D; i += NT) out.eL[chunk * D + i] = sL == 0.f ? __expf(GL[i]) : 0.f;
  }
  {  // L (fp32, shared) and P (16-bit, global) of this warp's sub-chunk X = warp
    const int X = warp, r = kSub * X;
    T* qs = sm.sub[warp][0];
    T* ks = sm.sub[warp][1];
    T* kr = sm.sub[warp][2];
    T* pg = static_cast<T*>(out.p) + chunk * CH * CH;
    for (int e = lane; e < kSub * D / 2; e += 32) {
      const int a = e / (D / 2), i = 2 * (e % (D / 2)), x = r + a;
      const float f0 = __expf(sm.G[x * D + i] - sm.G[r * D + i]), f1 = __expf(sm.G[x * D + i + 1] - sm.G[r * D + i + 1]);
      const float2 q2 = unpack2<T>(load_u32(sm.qv + x * LD + i)), k2 = unpack2<T>(load_u32(sm.k + x * LD + i));
      store_u32(qs + a * LD + i, pack2<T>(q2.x * f0, q2.y * f1));
      store_u32(ks + a * LD + i, pack2<T>(k2.x * f0, k2.y * f1));
    }
    // key sub-chunks after X: P is zero there
    for (int e = lane; e < kSub * (CH - r - kSub) / 2; e += 32) {
      const int w2 = (CH - r - kSub) / 2, a = e / w2, y = r + kSub + 2 * (e % w2);
      store_u32(pg + (r + a) * CH + y, pack2<T>(0.f, 0.f));
    }
    for (int Y = 0; Y < X; ++Y) {
      const int y0 = kSub * Y;
      for (int e = lane; e < kSub * D / 2; e += 32) {
        const int a = e / (D / 2), i = 2 * (e % (D / 2)), y = y0 + a;
        const float f0 = __expf(sm.G[r * D + i] - sm.G[y * D + i]);
        const float f1 = __expf(sm.G[r * D + i + 1] - sm.G[y * D + i + 1]);
        const float2 k2 = unpack2<T>(load_u32(sm.k + y * LD + i));
        store_u32(kr + a * LD + i, pack2<T>(k2.x * f0, k2.y * f1));
      }
      __syncwarp();
      float accL[2][4] = {}, accP[2][4] = {};
      mma_acc<T, 2, false, true>(accL, ks, LD, kr, LD, 0, 0, 0, D / 16, 1, lane);
      mma_acc<T, 2, false, true>(accP, qs, LD, kr, LD, 0, 0, 0, D / 16, 1, lane);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = r + (lane >> 2) + 8 * hf, y = y0 + 8 * nt + 2 * (lane & 3);
          const bool in0 = sm.s[x] == sm.s[y], in1 = sm.s[x] == sm.s[y + 1];
          sm.L[x * LDL + y] = in0 ? sm.bt[x] * accL[nt][2 * hf] : 0.f;
          sm.L[x * LDL + y + 1] = in1 ? sm.bt[x] * accL[nt][2 * hf + 1] : 0.f;
          store_u32(pg + x * CH + y,
                    pack2<T>(in0 ? p.scale * accP[nt][2 * hf] : 0.f, in1 ? p.scale * accP[nt][2 * hf + 1] : 0.f));
        }
      __syncwarp();  // kr is rewritten for the next Y
    }
    // the diagonal sub-chunk, elementwise: pair (a, b), b <= a, one lane; each lane
    // starts its walk over the dims at 2 lane (different banks for different rows)
    for (int pi = lane; pi < kSub * (kSub + 1) / 2; pi += 32) {
      int a = 0;
      while ((a + 1) * (a + 2) / 2 <= pi) ++a;
      const int b = pi - a * (a + 1) / 2, x = r + a, y = r + b;
      float sk = 0.f, sq = 0.f;
#pragma unroll 4
      for (int j = 0; j < D; j += 2) {
        const int i = (j + 2 * lane) & (D - 1);
        const float2 gx = *reinterpret_cast<const float2*>(sm.G + x * D + i);
        const float2 gy = *reinterpret_cast<const float2*>(sm.G + y * D + i);
        const float e0 = __expf(gx.x - gy.x), e1 = __expf(gx.y - gy.y);
        const float2 kx = unpack2<T>(load_u32(sm.k + x * LD + i)), ky = unpack2<T>(load_u32(sm.k + y * LD + i));
        const float2 qx = unpack2<T>(load_u32(sm.qv + x * LD + i));
        sk += kx.x * ky.x * e0 + kx.y * ky.y * e1;
        sq += qx.x * ky.x * e0 + qx.y * ky.y * e1;
      }
      const bool in = sm.s[x] == sm.s[y];
      if (b < a) sm.L[x * LDL + y] = in ? sm.bt[x] * sk : 0.f;
      pg[x * CH + y] = from_float<T>(in ? p.scale * sq : 0.f);
    }
    for (int pi = lane; pi < kSub * kSub; pi += 32) {  // above the diagonal: zero
      const int a = pi / kSub, b = pi % kSub;
      if (b > a) pg[(r + a) * CH + r + b] = from_float<T>(0.f);
    }
  }
  __syncthreads();
  // q is done with: v over it, in flight while T is formed
  load_tile<T, D, NT>(sm.qv, rows_of<T>(p.v, cp.b, cp.h, cp.t0), p.v.st, cp.nvalid, D, tid);
  cp_async_commit();
  invert_unit_lower(sm.L, sm.Tm, tid);
  // (e^G . k) [s = 0] in place of k; tb = T diag(beta) (16-bit, entries above the
  // diagonal blocks of T are unwritten: zero here)
  for (int e = tid; e < CH * D / 2; e += NT) {
    const int x = e / (D / 2), i = 2 * (e % (D / 2));
    const float2 k2 = unpack2<T>(load_u32(sm.k + x * LD + i));
    const float2 G2 = *reinterpret_cast<const float2*>(sm.G + x * D + i);
    const bool first = sm.s[x] == 0.f;
    store_u32(sm.k + x * LD + i, pack2<T>(first ? k2.x * __expf(G2.x) : 0.f, first ? k2.y * __expf(G2.y) : 0.f));
  }
  T* tb = sm.sub[0][0];
  T* tg = out.t != nullptr ? static_cast<T*>(out.t) + chunk * CH * CH : nullptr;
  for (int e = tid; e < CH * CH; e += NT) {
    const int x = e / CH, y = e % CH;
    tb[x * kLdP + y] = from_float<T>(y <= x ? sm.Tm[x * LDL + y] * sm.bt[y] : 0.f);
    if (tg != nullptr) tg[e] = from_float<T>(y <= x ? sm.Tm[x * LDL + y] : 0.f);
  }
  cp_async_wait_all();
  __syncthreads();
  // w = tb (e^G . k) [s = 0], u = tb v
  lower_product<T, D>(static_cast<T*>(out.w) + cp.row0 * D, tb, sm.k, warp, lane);
  lower_product<T, D>(static_cast<T*>(out.u) + cp.row0 * D, tb, sm.qv, warp, lane);
}

// ---- the state pass and the part summary ------------------------------------------------------
// One block per (b, h) and BV = 16 columns, sequential over the chunks, the next chunk's
// w, kd, u and eL in flight (two buffers). Blocks either carry 16 state columns (from
// `entering`, or zero) or, for the summary, 16 columns of A (from I, u = 0) or of M.
template <typename T, int D>
struct KdaStateBuf {
  static constexpr int LD = TcTile<D>::LD;
  T w[CH * LD];
  T kd[CH * LD];
  T u[CH * LDV];
  float eL[D];
};
template <typename T, int D>
struct KdaStateSmem {
  KdaStateBuf<T, D> buf[2];
  T xb[D * LDV];  // the carried columns (16-bit copy), [d][16]
  T ys[CH * LDV];  // v_new of the chunk (16-bit)
};

template <typename T, int D>
__device__ __forceinline__ void load_kda_chunk(const Problem& p, const KdaPrep& prep, KdaStateBuf<T, D>& B, int c,
                                               int64_t bh, int j0, bool with_u, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_tile<T, D, NT>(B.w, static_cast<const T*>(prep.w) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NT>(B.kd, static_cast<const T*>(prep.kd) + cp.row0 * D, D, CH, D, tid);
  if (with_u) load_cols<T>(B.u, static_cast<const T*>(prep.u) + cp.row0 * D, D, j0, CH, tid);
  if (tid < D / 4) cp_async16(B.eL + 4 * tid, prep.eL + (bh * chunk_count(p) + c) * D + 4 * tid, true);
}

template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_state_kernel(Problem p, KdaPrep prep, ChunkStatesOut fo,
                                                       ChunkSummaryOut sum) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int MT = D / 64;  // 16-row m-tiles of state rows a warp
  constexpr int NTL = BV / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaStateSmem<T, D>& sm = *reinterpret_cast<KdaStateSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool summary = sum.A != nullptr;
  const bool amap = summary && blockIdx.x < D / BV;  // columns of A: u = 0, from I
  const int j0 = (summary && !amap ? blockIdx.x - D / BV : blockIdx.x) * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH;
  const int64_t se = static_cast<int64_t>(D) * D;
  const float* entering = summary ? nullptr : fo.entering;

  float S[MT][NTL][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * (e >> 1);
        const int col = j0 + 8 * nt + 2 * (lane & 3) + (e & 1);
        S[mt][nt][e] = amap ? (row == col ? 1.f : 0.f) : entering != nullptr ? entering[bh * se + row * D + col] : 0.f;
      }
  if (amap)
    for (int i = tid; i < 2 * CH * LDV; i += NT) sm.buf[i / (CH * LDV)].u[i % (CH * LDV)] = from_float<T>(0.f);
  load_kda_chunk<T, D>(p, prep, sm.buf[0], 0, bh, j0, !amap, tid);
  cp_async_commit();
  for (int c = 0; c < nck; ++c) {
    KdaStateBuf<T, D>& B = sm.buf[c & 1];
    cp_async_wait_all();  // chunk c has landed (the only group in flight)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * hf;
          const int cl = 8 * nt + 2 * (lane & 3);
          const uint32_t packed = pack2<T>(S[mt][nt][2 * hf], S[mt][nt][2 * hf + 1]);
          store_u32(sm.xb + row * LDV + cl, packed);
          if (!summary && fo.states != nullptr)
            store_u32(static_cast<T*>(fo.states) + (bh * nck + c) * se + row * D + j0 + cl, packed);
        }
    // every warp is past chunk c - 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c + 1 < nck) load_kda_chunk<T, D>(p, prep, sm.buf[(c + 1) & 1], c + 1, bh, j0, !amap, tid);
    cp_async_commit();
    {  // v_new = u - w S (this warp's token rows)
      float acc[NTL][4];
      zero(acc);
      mma_rows<T, NTL, false>(acc, B.w, LD, sm.xb, LDV, 16 * warp, 0, D / 16, lane);
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = 16 * warp + (lane >> 2) + 8 * hf, cl = 8 * nt + 2 * (lane & 3);
          const float2 uu = unpack2<T>(load_u32(B.u + x * LDV + cl));
          const uint32_t packed = pack2<T>(uu.x - acc[nt][2 * hf], uu.y - acc[nt][2 * hf + 1]);
          if (!summary && fo.v_new != nullptr)
            store_u32(static_cast<T*>(fo.v_new) + (bh * npad + static_cast<int64_t>(c) * CH + x) * D + j0 + cl, packed);
          store_u32(sm.ys + x * LDV + cl, packed);
        }
    }
    __syncthreads();
    // S <- diag(eL) S + kd^T v_new
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const float e = B.eL[warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * hf];
#pragma unroll
        for (int nt = 0; nt < NTL; ++nt) {
          S[mt][nt][2 * hf] *= e;
          S[mt][nt][2 * hf + 1] *= e;
        }
      }
      mma_rows<T, NTL, true>(S[mt], B.kd, LD, sm.ys, LDV, warp * (D / 4) + 16 * mt, 0, CH / 16, lane);
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier
  }
  cp_async_wait_all();
  store_pass_end(fo, sum, amap, bh * se, [&](float* dst) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_state<D>(dst, S[mt], warp * (D / 4) + 16 * mt, j0, lane);
  });
}

// ---- the output pass: o = qg S_c + P v_new ------------------------------------------------------
template <typename T, int D>
struct KdaOutSmem {
  static constexpr int LD = TcTile<D>::LD;
  T qg[CH * LD];
  T x[CH * LD];  // v_new
  T ps[CH * kLdP];
  T st[D * LD];  // the 16-bit state entering the chunk
};

template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_output_kernel(Problem p, KdaPrep prep, const void* v_new,
                                                        const void* states, ForwardOut out) {
  constexpr int LD = TcTile<D>::LD;
  static_assert(TcTile<CH>::LD == kLdP, "the P tile copies as a 64-wide tile");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaOutSmem<T, D>& sm = *reinterpret_cast<KdaOutSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  load_tile<T, D, NT>(sm.qg, static_cast<const T*>(prep.qg) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NT>(sm.x, static_cast<const T*>(v_new) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, CH, NT>(sm.ps, static_cast<const T*>(prep.p) + chunk * CH * CH, CH, CH, CH, tid);
  const T* st = static_cast<const T*>(states) + chunk * static_cast<int64_t>(D) * D;
#pragma unroll
  for (int r = 0; r < D; r += CH) load_tile<T, D, NT>(sm.st + r * LD, st + r * D, D, CH, D, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  float acc[D / 8][4];
  zero(acc);
  mma_rows<T, D / 8, false>(acc, sm.qg, LD, sm.st, LD, 16 * warp, 0, D / 16, lane);
  mma_rows<T, D / 8, false>(acc, sm.ps, kLdP, sm.x, LD, 16 * warp, 0, warp + 1, lane);
  store_o_rows<T>(out, cp, acc, 16 * warp, lane);
}

// ---- the entering state's gradient from the part's own outputs (entering_dstate) ----------------
// The chunk computed v_new = u - w S0, S1 = diag(eL) S0 + kd^T v_new, O = qg S0 + P v_new;
// with X the gradient of S1 and r = -(P^T dO), the gradient of S0 is
// diag(eL) X + w^T (r - kd X) + qg^T dO (kda_chunk.h).
template <typename T, int D>
struct KdaRprepSmem {
  static constexpr int LD = TcTile<D>::LD;
  T ps[CH * kLdP];
  T d[CH * LD];
};

// r = -(P^T dO) of every chunk, 16-bit [rows][d]: r_y = -sum_{x >= y} P_xy dO_x.
template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_rprep_kernel(Problem p, KdaPrep prep, View dout, void* r) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaRprepSmem<T, D>& sm = *reinterpret_cast<KdaRprepSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  load_tile<T, CH, NT>(sm.ps, static_cast<const T*>(prep.p) + chunk * CH * CH, CH, CH, CH, tid);
  load_tile<T, D, NT>(sm.d, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, cp.nvalid, D, tid);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();
  float acc[D / 8][4];
  zero(acc);
  // P^T from the [x][y] tile: query blocks warp..3 (P is zero above its diagonal)
  mma_rows<T, D / 8, true>(acc, sm.ps, kLdP, sm.d, LD, 16 * warp, warp, CH / 16, lane);
  store_rows<T, D / 8, true>(static_cast<T*>(r) + cp.row0 * D, D, acc, 16 * warp, lane);
}

// One block per (b, h) and BV = 16 columns, backwards over the chunks (the next chunk's
// tiles in flight, two buffers): X (the gradient of the state leaving the chunk, from
// zero at the part's end) <- diag(eL) X + w^T (r - kd X) + qg^T dO; the last X is the
// entering state's gradient.
template <typename T, int D>
struct KdaRevBuf {
  static constexpr int LD = TcTile<D>::LD;
  T w[CH * LD];
  T kd[CH * LD];
  T qg[CH * LD];
  T r[CH * LDV];
  T d[CH * LDV];
  float eL[D];
};
template <typename T, int D>
struct KdaRevSmem {
  KdaRevBuf<T, D> buf[2];
  T xb[D * LDV];
  T ys[CH * LDV];
};

template <typename T, int D>
__device__ __forceinline__ void load_kda_rev_chunk(const Problem& p, const KdaPrep& prep, const View& dout,
                                                   const void* r, KdaRevBuf<T, D>& B, int c, int64_t bh, int j0,
                                                   int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_tile<T, D, NT>(B.w, static_cast<const T*>(prep.w) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NT>(B.kd, static_cast<const T*>(prep.kd) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NT>(B.qg, static_cast<const T*>(prep.qg) + cp.row0 * D, D, CH, D, tid);
  load_cols<T>(B.r, static_cast<const T*>(r) + cp.row0 * D, D, j0, CH, tid);
  load_cols<T>(B.d, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, j0, cp.nvalid, tid);
  if (tid < D / 4) cp_async16(B.eL + 4 * tid, prep.eL + (bh * chunk_count(p) + c) * D + 4 * tid, true);
}

template <typename T, int D>
__global__ void __launch_bounds__(NT) kda_rev_state_kernel(Problem p, KdaPrep prep, View dout, const void* r,
                                                           const float* leaving, void* dh, float* entering) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int MT = D / 64;
  constexpr int NTL = BV / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaRevSmem<T, D>& sm = *reinterpret_cast<KdaRevSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int j0 = blockIdx.x * BV;
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t se = static_cast<int64_t>(D) * D;
  float X[MT][NTL][4] = {};
  if (leaving != nullptr)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * (e >> 1);
          X[mt][nt][e] = leaving[bh * se + row * D + j0 + 8 * nt + 2 * (lane & 3) + (e & 1)];
        }
  load_kda_rev_chunk<T, D>(p, prep, dout, r, sm.buf[0], nck - 1, bh, j0, tid);
  cp_async_commit();
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i;
    KdaRevBuf<T, D>& B = sm.buf[i & 1];
    cp_async_wait_all();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * hf;
          const uint32_t packed = pack2<T>(X[mt][nt][2 * hf], X[mt][nt][2 * hf + 1]);
          store_u32(sm.xb + row * LDV + 8 * nt + 2 * (lane & 3), packed);
          if (dh != nullptr)
            store_u32(static_cast<T*>(dh) + (bh * nck + c) * se + row * D + j0 + 8 * nt + 2 * (lane & 3), packed);
        }
    // every warp is past chunk c + 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c > 0) load_kda_rev_chunk<T, D>(p, prep, dout, r, sm.buf[(i + 1) & 1], c - 1, bh, j0, tid);
    cp_async_commit();
    {  // ys = r - kd X (this warp's token rows)
      float acc[NTL][4];
      zero(acc);
      mma_rows<T, NTL, false>(acc, B.kd, LD, sm.xb, LDV, 16 * warp, 0, D / 16, lane);
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = 16 * warp + (lane >> 2) + 8 * hf, cl = 8 * nt + 2 * (lane & 3);
          const float2 rr = unpack2<T>(load_u32(B.r + x * LDV + cl));
          store_u32(sm.ys + x * LDV + cl, pack2<T>(rr.x - acc[nt][2 * hf], rr.y - acc[nt][2 * hf + 1]));
        }
    }
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      scale_rows(X[mt], B.eL, warp * (D / 4) + 16 * mt, lane);
      mma_rows<T, NTL, true>(X[mt], B.w, LD, sm.ys, LDV, warp * (D / 4) + 16 * mt, 0, CH / 16, lane);
      mma_rows<T, NTL, true>(X[mt], B.qg, LD, B.d, LDV, warp * (D / 4) + 16 * mt, 0, CH / 16, lane);
    }
  }
  cp_async_wait_all();
  if (entering == nullptr) return;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) store_state<D>(entering + bh * se, X[mt], warp * (D / 4) + 16 * mt, j0, lane);
}

// ---- launch helpers -------------------------------------------------------------------------------
constexpr const char* kWho = "lasp2 (CUDA KDA, chunked)";

void kda_check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

// Launches kernel<<<grid, NT, bytes>>>(args...) after raising its shared-memory limit.
template <typename Kernel, typename... Args>
void kda_launch(Kernel kernel, dim3 grid, int bytes, cudaStream_t s, const char* what, Args... args) {
  chunk_allow_smem(kernel, bytes, kWho, what);
  kernel<<<grid, NT, bytes, s>>>(args...);
  kda_check(cudaGetLastError(), what);
}

// f(T{}, integral_constant D) for p's 16-bit element type and d_k = d_v = 64 or 128 (the
// dims checked before the element type).
template <typename F>
void kda_dispatch(const Problem& p, F&& f) {
  if (p.dk != p.dv || (p.dk != 64 && p.dk != 128)) fail("lasp2 (CUDA KDA, chunked): d_k = d_v must be 64 or 128");
  chunk_dispatch<true>(p, kWho, f);
}

void kda_state_launch(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo, const ChunkSummaryOut& sum,
                      cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  kda_dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / BV;
    kda_launch(kda_state_kernel<T, D>, dim3(cols, static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaStateSmem<T, D>)), s, "KDA chunk state pass", p, prep, fo, sum);
  });
}

// Which prep runs (LASP2_DELTA_KDA_PREP, read at every launch so that the tests and the
// timing A/B can switch it): "levels" (the default, kda_prep.cu's 8 warps) or "old" (the
// 4-warp kda_prep_kernel above, kept for that A/B).
bool kda_prep_old() {
  const char* env = std::getenv("LASP2_DELTA_KDA_PREP");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "levels") == 0) return false;
  if (std::strcmp(env, "old") == 0) return true;
  fail(std::string(kWho) + ": LASP2_DELTA_KDA_PREP must be levels or old, not " + env);
}

}  // namespace

void launch_kda_prep(const Problem& p, const KdaPrep& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  if (!kda_prep_old()) {
    if (p.dk != p.dv || (p.dk != 64 && p.dk != 128)) fail("lasp2 (CUDA KDA, chunked): d_k = d_v must be 64 or 128");
    launch_kda_prep_levels(p, out, s);
    return;
  }
  kda_dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    kda_launch(kda_prep_kernel<T, D>, dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaPrepSmem<T, D>)), s, "KDA chunk prep", p, out);
  });
}

void launch_kda_states(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& out, cudaStream_t s) {
  kda_state_launch(p, prep, out, ChunkSummaryOut{}, s);
}

void launch_kda_summary(const Problem& p, const KdaPrep& prep, const ChunkSummaryOut& out, cudaStream_t s) {
  kda_state_launch(p, prep, ChunkStatesOut{}, out, s);
}

void launch_kda_output(const Problem& p, const KdaPrep& prep, const void* v_new, const void* states,
                       const ForwardOut& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  kda_dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    kda_launch(kda_output_kernel<T, D>, dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaOutSmem<T, D>)), s, "KDA chunk output", p, prep, v_new, states, out);
  });
}

void launch_kda_entering_dstate(const Problem& p, const KdaPrep& prep, View dout, void* r, float* entering,
                                cudaStream_t s) {
  launch_kda_rstates(p, prep, dout, r, nullptr, nullptr, entering, s);
}

void launch_kda_rstates(const Problem& p, const KdaPrep& prep, View dout, void* r, const float* leaving, void* dh,
                        float* entering, cudaStream_t s) {
  if (p.bh() == 0) return;
  if (chunk_count(p) == 0) {
    const size_t bytes = p.bh() * p.dk * p.dv * sizeof(float);
    if (entering != nullptr && leaving != nullptr) {
      kda_check(cudaMemcpyAsync(entering, leaving, bytes, cudaMemcpyDeviceToDevice, s), "KDA entering dstate");
    } else if (entering != nullptr) {
      kda_check(cudaMemsetAsync(entering, 0, bytes, s), "KDA entering dstate");
    }
    return;
  }
  kda_dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    kda_launch(kda_rprep_kernel<T, D>, dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaRprepSmem<T, D>)), s, "KDA chunk rprep", p, prep, dout, r);
    kda_launch(kda_rev_state_kernel<T, D>, dim3(D / BV, static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaRevSmem<T, D>)), s, "KDA chunk reverse state pass", p, prep, dout,
               static_cast<const void*>(r), leaving, dh, entering);
  });
}

}  // namespace lasp2::delta::gpu
