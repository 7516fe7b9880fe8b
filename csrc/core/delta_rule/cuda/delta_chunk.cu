// The chunked tensor-core kernels of the scalar-gate delta rule (see delta_chunk.h):
// mma.sync m16n8k16 in the input dtype (fp16 / bf16) with fp32 accumulation, the
// shared-memory tiles and PTX wrappers of the scalar family (csrc/core/cuda), 4 warps
// a block. Warp w owns tokens [16 w, 16 w + 16) of a chunk in the token-row products
// and state rows [w d / 4, (w + 1) d / 4) in the state products.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstddef>
#include <cstdlib>
#include <cstring>
#include <iterator>
#include <string>
#include <type_traits>
#include <utility>

#include "delta_rule/cuda/delta_chunk.h"
#include "cuda/route.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_invert.cuh"
#include "delta_rule/cuda/delta_chunk_tma.cuh"
#include "delta_rule/cuda/tma_copy.cuh"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- prep: meta, T = (I + L)^-1, w, u ----------------------------------------------------
// L and T in fp32 [64][LDL]. Once T is read into registers, V is loaded over T's bytes
// and L's hold the 16-bit tw tile, then (after w) the tu tile: 51 KiB a block at d = 128,
// four blocks an SM (V beside T from the start, three: 0.89 against 0.80 ms at T = 64K,
// H = 16 on an H200, docs/history/delta-rule-log.md, sixth round).
template <typename T, int D>
struct PrepSmem {
  static constexpr int LD = TcTile<D>::LD;
  static constexpr int kTmBytes = CH * LDL * 4, kVBytes = CH * LD * static_cast<int>(sizeof(T));
  T k[CH * LD];
  float L[CH * LDL];
  alignas(16) unsigned char tv[kTmBytes > kVBytes ? kTmBytes : kVBytes];  // T (fp32), then V
  float bt[CH], G[CH], s[CH];
  __device__ float* Tm() { return reinterpret_cast<float*>(tv); }
  __device__ T* v() { return reinterpret_cast<T*>(tv); }
};
static_assert(CH * kLdP * 2 <= CH * LDL * 4, "tw (and later tu) fit where L was");

// Blocks an SM that prep's shared memory allows at d = 128 (228 KiB on sm_90, 164 KiB
// on sm_80), held by the register bound (128 registers a thread for four).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
constexpr int kPrepBlocksPerSm = 3;
#else
constexpr int kPrepBlocksPerSm = 4;
#endif

// kNew (the default since the thirteenth round; LASP2_DELTA_PREP_KERNEL=old runs the
// twelfth round's kernel, the equality test's reference): the same products in the same
// order, so the same bits, with
// - w and u out through shared memory (w over K's bytes once every warp is past K, then
//   u there) in 16-byte stores of whole rows, instead of each lane's 4-byte pieces of 8
//   rows (global store requests 1.05 M -> 0.27 M at T = 16K);
// - tu held two entries a register (ptxas: 24 bytes of stack instead of 56 at d = 128);
// - the balanced 32-block merge of invert_unit_lower (shared-memory wavefronts with the
//   staged stores 23.7 M -> 19.9 M at T = 16K) and T's copy in 4-byte pairs (one shuffle with the neighbouring
//   column's lane) instead of 2-byte stores.
// 0.70 -> 0.57 ms at T = 64K, H = 16 (docs/history/delta-rule-log.md, "Prep and rprep, thirteenth round").
template <typename T, int D, bool kNew>
__global__ void __launch_bounds__(NT, kPrepBlocksPerSm) prep_kernel(Problem p, ChunkPrep out) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  PrepSmem<T, D>& sm = *reinterpret_cast<PrepSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  load_tile<T, D, NT>(sm.k, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, cp.nvalid, D, tid);
  cp_async_commit();
  if (warp == 0) {
    // tokens 2 lane, 2 lane + 1: the cumulative gate G and segment index s by a warp
    // scan (a segment start, document start or -inf gate, adds 0 to G)
    const int head_end = out.head_end != nullptr ? out.head_end[cp.b] : -1;
    float lg[2], st[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int x = 2 * lane + i;
      const int64_t t = cp.t0 + x;
      // past the head (head maps only): an identity transition
      const bool valid = x < cp.nvalid && (head_end < 0 || cp.c * CH + x < head_end);
      const float g = valid ? p.g[cp.b * p.gsb + t * p.gst + cp.h * p.gsh] : 0.f;
      const bool start =
          valid && ((p.doc_start != nullptr && p.doc_start[cp.b * p.doc_sb + t] != 0) || g == -INFINITY);
      sm.bt[x] = valid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
      lg[i] = start ? 0.f : g;
      st[i] = start ? 1.f : 0.f;
    }
    float gsum = lg[0] + lg[1], ssum = st[0] + st[1];
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const float go = __shfl_up_sync(0xffffffffu, gsum, off), so = __shfl_up_sync(0xffffffffu, ssum, off);
      if (lane >= off) {
        gsum += go;
        ssum += so;
      }
    }
    float gex = __shfl_up_sync(0xffffffffu, gsum, 1), sex = __shfl_up_sync(0xffffffffu, ssum, 1);
    if (lane == 0) gex = sex = 0.f;
    const float G0 = gex + lg[0], G1 = G0 + lg[1], s0 = sex + st[0], s1 = s0 + st[1];
    sm.G[2 * lane] = G0;
    sm.G[2 * lane + 1] = G1;
    sm.s[2 * lane] = s0;
    sm.s[2 * lane + 1] = s1;
    *reinterpret_cast<float4*>(out.meta + 2 * (cp.row0 + 2 * lane)) = make_float4(G0, s0, G1, s1);
  }
  cp_async_wait_all();
  __syncthreads();
  {  // L_xy = beta_x e^{G_x - G_y} k_x . k_y, y < x in one segment
    float acc[8][4];
    zero(acc);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      ldsm_x4(a, sm.k + frag_a_rowmajor(lane, 16 * warp, 16 * kk, LD));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        if (np > warp) continue;
        uint32_t bb[4];
        ldsm_x4(bb, sm.k + frag_b_nk(lane, 16 * kk, 16 * np, LD));
        mma16816<T>(acc[2 * np], a, bb[0], bb[1]);
        mma16816<T>(acc[2 * np + 1], a, bb[2], bb[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int x = 16 * warp + (lane >> 2) + 8 * (e >> 1), y = 8 * j + 2 * (lane & 3) + (e & 1);
        const bool in = y < x && sm.s[x] == sm.s[y];
        // exp_ftz: G_x <= G_y here (one MUFU.EX2 instead of __expf's seven instructions)
        if (y < 16 * warp + 16) sm.L[x * LDL + y] = in ? sm.bt[x] * acc[j][e] * lasp2::cuda::exp_ftz(sm.G[x] - sm.G[y]) : 0.f;
      }
  }
  __syncthreads();
  invert_unit_lower<NT, kNew>(sm.L, sm.Tm(), tid);
  // tw = T diag(beta e^G [s = 0]), tu = T diag(beta) (16-bit); w = tw K, u = tu V
  constexpr int kPer = CH * CH / NT;
  // held here while w is formed (kNew: two entries a register, against spills)
  T tu[kNew ? 1 : kPer];
  uint32_t tu2[kNew ? kPer / 2 : 1];
  {
    float t[kPer];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + NT * i, x = e / CH, y = e % CH;
      t[i] = y <= x ? sm.Tm()[x * LDL + y] : 0.f;
    }
    __syncthreads();
    // T is in registers: V over its bytes, in flight while tw and w are formed
    load_tile<T, D, NT>(sm.v(), rows_of<T>(p.v, cp.b, cp.h, cp.t0), p.v.st, cp.nvalid, D, tid);
    cp_async_commit();
    T* tw = reinterpret_cast<T*>(sm.L);
    T* const tcopy = out.t != nullptr ? static_cast<T*>(out.t) + cp.row0 * CH + tid : nullptr;
    // every entry of this thread is in column y = tid % CH: its weights once, not per entry
    // (the compiler formed __expf(G_y) kPer times)
    static_assert(NT % CH == 0, "one column a thread");
    const int yc = tid % CH;
    const float entry = sm.s[yc] == 0.f ? __expf(sm.G[yc]) : 0.f, by = sm.bt[yc];
#pragma unroll
    for (int i = 0; i < kPer; ++i) {
      const int e = tid + NT * i, x = e / CH, y = e % CH;
      tw[x * kLdP + y] = from_float<T>(t[i] * by * entry);
      if constexpr (kNew) {
        if (i & 1) tu2[i / 2] = pack2<T>(t[i - 1] * by, t[i] * by);
        // the backward's copy of T: entries i - 1 and i of lanes 2 j and 2 j + 1 (columns
        // y, y + 1) as two pairs, row x_{i-1} from the even lane, row x_i from the odd one
        if ((i & 1) && tcopy != nullptr) {
          const bool odd = (tid & 1) != 0;
          const float got = __shfl_xor_sync(0xffffffffu, odd ? t[i - 1] : t[i], 1);
          store_u32(tcopy + (odd ? NT * i - 1 : NT * (i - 1)), odd ? pack2<T>(got, t[i]) : pack2<T>(t[i - 1], got));
        }
      } else {
        tu[i] = from_float<T>(t[i] * by);
        if (tcopy != nullptr) tcopy[NT * i] = from_float<T>(t[i]);  // the backward's copy of T
      }
    }
  }
  __syncthreads();
  const T* tw = reinterpret_cast<const T*>(sm.L);
  T* const w_out = static_cast<T*>(out.w) + cp.row0 * D;
  T* const u_out = static_cast<T*>(out.u) + cp.row0 * D;
  float acc[D / 8][4];
  if constexpr (kNew) {
    zero(acc);
    mma_rows<T, D / 8, false>(acc, tw, kLdP, sm.k, LD, 16 * warp, 0, warp + 1, lane);
  } else {
    lower_product<T, D>(w_out, tw, sm.k, warp, lane);
  }
  __syncthreads();  // every warp is past tw (and K): tu takes tw's place (and w K's)
  T* tu_s = reinterpret_cast<T*>(sm.L);
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int e = tid + NT * i, x = e / CH, y = e % CH;
    if constexpr (kNew) {
      reinterpret_cast<uint16_t*>(tu_s)[x * kLdP + y] = static_cast<uint16_t>(tu2[i / 2] >> (16 * (i & 1)));
    } else {
      tu_s[x * kLdP + y] = tu[i];
    }
  }
  if constexpr (kNew) store_rows<T, D / 8>(sm.k, LD, acc, 16 * warp, lane);
  cp_async_wait_all();
  __syncthreads();
  if constexpr (kNew) {
    copy_rows_out<T, D, NT>(w_out, sm.k, LD, tid);
    zero(acc);
    mma_rows<T, D / 8, false>(acc, tu_s, kLdP, sm.v(), LD, 16 * warp, 0, warp + 1, lane);
    __syncthreads();  // every thread has copied w out of K's bytes
    store_rows<T, D / 8>(sm.k, LD, acc, 16 * warp, lane);
    __syncthreads();
    copy_rows_out<T, D, NT>(u_out, sm.k, LD, tid);
  } else {
    lower_product<T, D>(u_out, tu_s, sm.v(), warp, lane);
  }
}

// ---- the reverse state pass (sequential over chunks; the forward one is fwd_state_kernel) ---
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
struct StateSmem {
  StateBuf<T, D> buf[kRevStages];
  T xb[D * LDV];  // the carried state (16-bit copy), [d][16]
  T ys[CH * LDV];
};

template <typename T, int D, int NTH = NT>
__device__ __forceinline__ void load_state_chunk(const Problem& p, const View& dout, const ChunkPrep& prep,
                                                 StateBuf<T, D>& B, int c, int64_t bh, int j0, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  const T* w = static_cast<const T*>(prep.w) + cp.row0 * D;
  const T* k = rows_of<T>(p.k, cp.b, cp.h, cp.t0);
  const T* r = static_cast<const T*>(prep.u) + cp.row0 * D;
  load_tile<T, D, NTH>(B.a1, k, p.k.st, cp.nvalid, D, tid);
  load_tile<T, D, NTH>(B.a2, w, D, CH, D, tid);
  load_tile<T, D, NTH>(B.a3, rows_of<T>(p.q, cp.b, cp.h, cp.t0), p.q.st, cp.nvalid, D, tid);
  if (tid < NT) {  // the column tiles: 2 CH = NT pieces
    load_cols<T>(B.d, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, j0, cp.nvalid, tid);
    load_cols<T>(B.r, r, D, j0, CH, tid);
  }
  load_meta(B.meta, prep.meta, cp.row0, tid);
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
    if (ro.doc_end_idx != nullptr && ro.doc_end_idx[bh * nck + c] >= 0) {  // F in X's place (delta_chunk_docs.h)
      const float* F = ro.doc_final + static_cast<int64_t>(ro.doc_end_idx[bh * nck + c]) * se;
      __syncthreads();  // dh's copy of xb is done
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) load_state_xb<T, D>(S[mt], sm.xb, LDV, F, warp * (D / 4) + 16 * mt, j0, lane);
      __syncthreads();
      GL = ro.doc_end_g[bh * nck + c];
      sL = 0.f;
    }
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
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[nt][q] *= e;
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

// ---- the forward state pass and the part summary -------------------------------------
// One block per (b, h) and C columns, sequential over chunks, with the inputs of the next
// NS - 1 chunks in flight (cp.async ring of NS buffers). Every block reads the chunk's
// whole w and K. A block either carries 16 columns of
// the state (S from `entering`, or zero) or, for the part summary, 16 columns of the
// map A (from I, with u = 0: the columns of A evolve like state columns with v = 0).
template <typename T, int D, int C>
struct FwdStateBuf {
  static constexpr int LD = TcTile<D>::LD, LDC = C + 8;
  T w[CH * LD];
  T k[CH * LD];
  T u[CH * LDC];
  float meta[2 * CH];
};
template <typename T, int D, int C, int NS>
struct FwdStateSmem {
  static constexpr int LDC = C + 8;
  FwdStateBuf<T, D, C> buf[NS];
  T xb[D * LDC];  // the carried columns (16-bit copy), [d][C]
  T ys[CH * LDC];
};

// Columns [0, C) of the first 64 rows of src (row pitch ld) into a [64][C + 8] tile;
// rows >= nvalid are zero-filled. NTH threads, C / 8 16-byte pieces a row.
template <typename T, int C, int NTH>
__device__ __forceinline__ void load_col_block(T* dst, const T* src, int64_t ld, int nvalid, int tid) {
#pragma unroll
  for (int i = tid; i < CH * C / 8; i += NTH) {
    const int row = i / (C / 8), part = i % (C / 8);
    const bool valid = row < nvalid;
    cp_async16(dst + row * (C + 8) + 8 * part, valid ? src + row * ld + 8 * part : src, valid);
  }
}

template <typename T, int D, int C, int NTH = NT>
__device__ __forceinline__ void load_fwd_chunk(const Problem& p, const ChunkPrep& prep, FwdStateBuf<T, D, C>& B,
                                               int c, int64_t bh, int j0, bool with_u, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_tile<T, D, NTH>(B.w, static_cast<const T*>(prep.w) + cp.row0 * D, D, CH, D, tid);
  load_tile<T, D, NTH>(B.k, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, cp.nvalid, D, tid);
  // columns j0..j0+C of u
  if (with_u) load_col_block<T, C, NTH>(B.u, static_cast<const T*>(prep.u) + cp.row0 * D + j0, D, CH, tid);
  load_meta(B.meta, prep.meta, cp.row0, tid);
}

// The initial state H (weight f) that a document begun inside chunk c carries out of it
// when the chunk's last token lies in that document's first segment (delta_chunk_docs.h),
// else null. Read once a chunk, only when fo.doc_f is set (never without document states).
template <int D>
__device__ __forceinline__ const float* doc_carry(const Problem& p, const ChunkStatesOut& fo, int64_t bh, int c,
                                                  int64_t npad, float& f) {
  const int64_t left = p.n - static_cast<int64_t>(c) * CH;
  const int64_t r = bh * npad + static_cast<int64_t>(c) * CH + (left < CH ? left : CH) - 1;
  f = fo.doc_f[r];
  return f != 0.f ? fo.doc_initial + static_cast<int64_t>(fo.doc_idx[r]) * D * D : nullptr;
}

// v_new = u - w S; S <- e S + K^T diag(d) v_new for every chunk. Blocks x < D / C carry
// state columns; with `sum` (grid x = 2 D / C) blocks x < D / C carry the columns of A
// and the others those of M (the state from zero), written at the end to sum.{A, M,
// head_A, head_M}.
template <typename T, int D, int C, int NS>
__global__ void __launch_bounds__(NT) fwd_state_kernel(Problem p, ChunkPrep prep, ChunkStatesOut fo,
                                                       ChunkSummaryOut sum) {
  constexpr int LD = TcTile<D>::LD;
  constexpr int MT = D / 64;  // 16-row m-tiles of state rows per warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  constexpr int LDC = C + 8, NTL = C / 8;  // n8 tiles of the block's columns
  FwdStateSmem<T, D, C, NS>& sm = *reinterpret_cast<FwdStateSmem<T, D, C, NS>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool summary = sum.A != nullptr;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(summary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH;
  const int64_t se = static_cast<int64_t>(D) * D;
  const float* entering = summary ? nullptr : fo.entering;

  float S[MT][NTL][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) load_state<D>(S[mt], amap, entering, bh * se, warp * (D / 4) + 16 * mt, j0, lane);
  if (amap) {  // u = 0 in every buffer
    for (int i = tid; i < NS * CH * LDC; i += NT) sm.buf[i / (CH * LDC)].u[i % (CH * LDC)] = from_float<T>(0.f);
  }
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load_fwd_chunk<T, D, C>(p, prep, sm.buf[i], i, bh, j0, !amap, tid);
    cp_async_commit();
  }
  for (int c = 0; c < nck; ++c) {
    FwdStateBuf<T, D, C>& B = sm.buf[c % NS];
    cp_async_wait_upto<NS - 2>();  // chunk c's group has landed
    // the carried columns: 16-bit copy for the products, and the per-chunk outputs
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int row = warp * (D / 4) + 16 * mt + (lane >> 2) + 8 * hf;
          const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
          const float s0 = S[mt][nt][2 * hf], s1 = S[mt][nt][2 * hf + 1];
          store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
          if (!summary) {
            const int64_t at = (bh * nck + c) * se;
            if (fo.states != nullptr) store_u32(static_cast<T*>(fo.states) + at + row * D + col, pack2<T>(s0, s1));
            if (fo.ckpt != nullptr) {
              fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
              fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
            }
          }
        }
    // every warp is past chunk c - 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c + NS - 1 < nck) load_fwd_chunk<T, D, C>(p, prep, sm.buf[(c + NS - 1) % NS], c + NS - 1, bh, j0, !amap, tid);
    cp_async_commit();
    const float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    {  // v_new = u - w S (token rows of this warp); ys = diag(d) v_new
      float acc[NTL][4];
      zero(acc);
      mma_rows<T, NTL, false>(acc, B.w, LD, sm.xb, LDC, 16 * warp, 0, D / 16, lane);
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = 16 * warp + (lane >> 2) + 8 * hf, cl = 8 * nt + 2 * (lane & 3);
          const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
          const float d = sx == sL ? __expf(GL - Gx) : 0.f;
          const float2 rr = unpack2<T>(load_u32(B.u + x * LDC + cl));
          const float v0 = rr.x - acc[nt][2 * hf], v1 = rr.y - acc[nt][2 * hf + 1];
          if (!summary && fo.v_new != nullptr)
            store_u32(static_cast<T*>(fo.v_new) + (bh * npad + static_cast<int64_t>(c) * CH + x) * D + j0 + cl,
                      pack2<T>(v0, v1));
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d, v1 * d));
        }
    }
    __syncthreads();
    {  // S <- e S + K^T ys
      const float e = sL == 0.f ? __expf(GL) : 0.f;
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        float(&acc)[NTL][4] = S[mt];
#pragma unroll
        for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
          for (int q = 0; q < 4; ++q) acc[nt][q] *= e;
        mma_rows<T, NTL, true>(acc, B.k, LD, sm.ys, LDC, warp * (D / 4) + 16 * mt, 0, CH / 16, lane);
      }
    }
    if (fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) add_state<D>(S[mt], f, H, warp * (D / 4) + 16 * mt, j0, lane);
      }
    }
    // no barrier: the next chunk writes xb (last read before the barrier above) and
    // ys (read just now) only after its first barrier
  }
  cp_async_wait_all();
  store_pass_end(fo, sum, amap, bh * se, [&](float* dst) {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) store_state<D>(dst, S[mt], warp * (D / 4) + 16 * mt, j0, lane);
  });
}

// ---- the state passes with 8 warps a block ---------------------------------------------------
// The tiles of fwd_state_kernel / rev_state_kernel with 8 warps a block: two on each
// scheduler, so that one warp's dependent instructions (the mma chains, the epilogues'
// loads and exponentials) hide behind the other's. The ncu profile of the 4-warp passes
// (T = 16K, H = 16, D = 128 on an H200) showed one warp a scheduler stalled 3.5 of every
// 4.5 cycles, mostly on fixed-latency dependencies, and L2 throughput at 76 %. Token
// products: warp w takes tokens 16 (w % 4) .. and C / 16 n8 tiles of columns from
// C / 2 (w / 4) (k-steps in two chains); state products: state rows 16 w .. 16 w + 15
// (d = 128 only), the chunk's tokens in two halves (chains of two).

// ---- a chunk's copies, addressed once a block (the lean state passes) -------------------
// The decays of the lean passes as one MUFU.EX2 (exp_ftz: their arguments are <= 0; a
// weight below 2^-126 becomes 0 instead of a denormal), else __expf's seven instructions.
template <bool kLean>
__device__ __forceinline__ float chunk_exp(float x) {
  if constexpr (kLean) {
    return lasp2::cuda::exp_ftz(x);
  } else {
    return __expf(x);
  }
}

// acc[t] (+)= A (16 rows from m0, stored [m][k], KS k-steps) x B (stored [k][n], n8 tile t
// from column n0), NTILES = 1 or 2 tiles, each as two chains (even and odd k-steps) that
// the tensor pipe overlaps, summed at the end.
template <typename T, int KS, int NTILES>
__device__ __forceinline__ void mma_row_tiles(float (&acc)[NTILES][4], const T* A, int lda, const T* B, int ldb,
                                              int m0, int n0, int lane) {
  static_assert(NTILES == 1 || NTILES == 2, "one or two n8 tiles");
  float odd[NTILES][4] = {};
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
    uint32_t a[4], b[4];
    ldsm_x4(a, A + frag_a_rowmajor(lane, m0, 16 * kk, lda));
    if constexpr (NTILES == 1) {
      ldsm_x2_t(reinterpret_cast<uint32_t(&)[2]>(b), B + frag_b_kn(lane & 15, 16 * kk, n0, ldb));
    } else {
      ldsm_x4_t(b, B + frag_b_kn(lane, 16 * kk, n0, ldb));
    }
#pragma unroll
    for (int t = 0; t < NTILES; ++t) mma16816<T>(kk & 1 ? odd[t] : acc[t], a, b[2 * t], b[2 * t + 1]);
  }
#pragma unroll
  for (int t = 0; t < NTILES; ++t)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[t][e] += odd[t][e];
}

// acc[NTILES][4] += A^T B over a chunk's tokens (mma_rows with kTransA: A stored [token][m],
// B [token][n]), the tokens in two halves: two chains of two a tile.
template <typename T, int NTILES>
__device__ __forceinline__ void mma_rows_halves(float (&acc)[NTILES][4], const T* A, int lda, const T* B, int ldb,
                                                int m0, int lane) {
  static_assert(CH / 16 == 4, "four k-steps over a chunk's tokens");
  float hi[NTILES][4] = {};
  mma_rows<T, NTILES, true>(acc, A, lda, B, ldb, m0, 0, 2, lane);
  mma_rows<T, NTILES, true>(hi, A, lda, B, ldb, m0, 2, 4, lane);
#pragma unroll
  for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[nt][e] += hi[nt][e];
}

// kLean: the copies of TileCopy / ColCopy / MetaCopy and the chunk states stored from xb
// (16 bytes a thread) instead of four 4-byte stores a thread from registers; else the
// earlier per-chunk addressing (LASP2_DELTA_STATE_KERNEL=w8calc, kept for the A/B).
template <typename T, int D, int C, int NS, bool kLean>
__global__ void __launch_bounds__(NT8, 2) fwd_state_kernel_w8(Problem p, ChunkPrep prep, ChunkStatesOut fo,
                                                          ChunkSummaryOut sum) {
  static_assert(D == 128, "8 warps x 16 state rows");
  constexpr int LD = TcTile<D>::LD, LDC = C + 8, NTL = C / 8, TPW = NTL / 2;  // n8 tiles: block, warp
  extern __shared__ __align__(16) unsigned char smem_raw[];
  FwdStateSmem<T, D, C, NS>& sm = *reinterpret_cast<FwdStateSmem<T, D, C, NS>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const bool summary = sum.A != nullptr;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(summary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH;
  const int64_t se = static_cast<int64_t>(D) * D;
  const float* entering = summary ? nullptr : fo.entering;
  const int r0 = 16 * warp;                        // state rows of this warp
  const int x0 = 16 * (warp & 3), n0 = 8 * TPW * (warp >> 2);  // tokens and columns of its token tiles

  float S[NTL][4];
  load_state<D>(S, amap, entering, bh * se, r0, j0, lane);
  if (amap) {  // u = 0 in every buffer
    for (int i = tid; i < NS * CH * LDC; i += NT8) sm.buf[i / (CH * LDC)].u[i % (CH * LDC)] = from_float<T>(0.f);
  }
  [[maybe_unused]] TileCopy<T, D, NT8> cw, ck;
  [[maybe_unused]] ColCopy<T, C, NT8> cu;
  [[maybe_unused]] MetaCopy cm;
  [[maybe_unused]] T* vn = nullptr;    // this thread's first v_new element of chunk 0
  [[maybe_unused]] T* st16 = nullptr;  // this thread's 16 bytes of chunk 0's state
  // the chunk states from xb when one 16-byte piece a thread covers them (C = 16; the
  // 32-column blocks run the summary, which writes no chunk states)
  constexpr bool kXbStates = kLean && D * C / 8 <= NT8;
  if constexpr (kLean) {
    const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
    const int64_t row0 = bh * npad;
    cw.init(static_cast<const T*>(prep.w) + row0 * D, D, sm.buf[0].w, tid);
    ck.init(rows_of<T>(p.k, b, h, p.begin), p.k.st, sm.buf[0].k, tid);
    cu.init(static_cast<const T*>(prep.u) + row0 * D + j0, D, sm.buf[0].u, tid);
    cm.init(prep.meta, row0, sm.buf[0].meta, tid);
    if (!summary && fo.v_new != nullptr)
      vn = static_cast<T*>(fo.v_new) + (row0 + x0 + (lane >> 2)) * D + j0 + n0 + 2 * (lane & 3);
    if (kXbStates && !summary && fo.states != nullptr && tid < D * C / 8)
      st16 = static_cast<T*>(fo.states) + bh * nck * se + (tid / (C / 8)) * D + j0 + 8 * (tid % (C / 8));
  }
  // chunk c into buffer c % NS
  auto load = [&](int c) {
    if constexpr (kLean) {
      const uint32_t off = static_cast<uint32_t>((c % NS) * sizeof(FwdStateBuf<T, D, C>));
      cw.issue(c, off, CH);
      ck.issue(c, off, chunk_rows(p, c));
      if (!amap) cu.issue(c, off, CH);
      cm.issue(c, off);
    } else {
      load_fwd_chunk<T, D, C, NT8>(p, prep, sm.buf[c % NS], c, bh, j0, !amap, tid);
    }
  };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) {
    if (i < nck) load(i);
    cp_async_commit();
  }
  for (int c = 0; c < nck; ++c) {
    FwdStateBuf<T, D, C>& B = sm.buf[c % NS];
    cp_async_wait_upto<NS - 2>();  // chunk c's group has landed
    // the carried columns: 16-bit copy for the products, and the per-chunk outputs
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = r0 + (lane >> 2) + 8 * hf;
        const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
        const float s0 = S[nt][2 * hf], s1 = S[nt][2 * hf + 1];
        store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
        if (!summary) {
          const int64_t at = (bh * nck + c) * se;
          if (!kXbStates && fo.states != nullptr)
            store_u32(static_cast<T*>(fo.states) + at + row * D + col, pack2<T>(s0, s1));
          if (fo.ckpt != nullptr) {
            fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
            fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
          }
        }
      }
    // every warp is past chunk c - 1 (its buffer is free) and sees chunk c and xb
    __syncthreads();
    if (c + NS - 1 < nck) load(c + NS - 1);
    cp_async_commit();
    if constexpr (kXbStates) {  // the chunk's 16-bit state from xb, 16 bytes a thread (all NT8 at C = 16)
      if (st16 != nullptr) {
        const int row = tid / (C / 8), part = tid % (C / 8);
        *reinterpret_cast<uint4*>(st16 + static_cast<int64_t>(c) * se) =
            *reinterpret_cast<const uint4*>(sm.xb + row * LDC + 8 * part);
      }
    }
    const float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
    {  // v_new = u - w S (this warp's token tiles); ys = diag(d) v_new
      float acc[TPW][4] = {};
      mma_row_tiles<T, D / 16, TPW>(acc, B.w, LD, sm.xb, LDC, x0, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
        const float Gx = B.meta[2 * x], sx = B.meta[2 * x + 1];
        const float d = sx == sL ? chunk_exp<kLean>(GL - Gx) : 0.f;
#pragma unroll
        for (int t = 0; t < TPW; ++t) {
          const int cl = n0 + 8 * t + 2 * (lane & 3);
          const float2 rr = unpack2<T>(load_u32(B.u + x * LDC + cl));
          const float v0 = rr.x - acc[t][2 * hf], v1 = rr.y - acc[t][2 * hf + 1];
          if constexpr (kLean) {
            if (vn != nullptr) store_u32(vn + (static_cast<int64_t>(c) * CH + 8 * hf) * D + 8 * t, pack2<T>(v0, v1));
          } else if (!summary && fo.v_new != nullptr) {
            store_u32(static_cast<T*>(fo.v_new) + (bh * npad + static_cast<int64_t>(c) * CH + x) * D + j0 + cl,
                      pack2<T>(v0, v1));
          }
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d, v1 * d));
        }
      }
    }
    __syncthreads();
    {  // S <- e S + K^T ys (this warp's state rows)
      const float e = sL == 0.f ? chunk_exp<kLean>(GL) : 0.f;
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] *= e;
      mma_rows_halves<T, NTL>(S, B.k, LD, sm.ys, LDC, r0, lane);
    }
    if (fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) add_state<D>(S, f, H, r0, j0, lane);
    }
    // no barrier: the next chunk writes xb (last read before the barrier above) and
    // ys (read just now) only after its first barrier
  }
  cp_async_wait_all();
  float* dst[2] = {amap ? sum.A : sum.M, amap ? sum.head_A : sum.head_M};
  if (!summary) dst[0] = fo.leaving, dst[1] = nullptr;
#pragma unroll
  for (int which = 0; which < 2; ++which) {
    if (dst[which] == nullptr) continue;
    store_state<D>(dst[which] + bh * se, S, r0, j0, lane);
  }
}

// ---- the state passes on whole-tile copies (sm_90: "tma", the default there) ------------
// w8 copies each chunk's w and K (the reverse pass k, w and q) as 4 cp.async pieces a
// thread and tile, each with its predicate and offsets (9 / 13 copies a thread a chunk);
// the pass is latency-bound with two warps a scheduler, so those instructions sit on the
// chunk's path. Here thread 0 copies each tile as two 64-column boxes of a tensor map
// (128-byte swizzle, the ldmatrix addresses swizzled to match), counted on one mbarrier a
// ring buffer (`full`); the 16 columns of u (reverse: r, dO) and the meta stay cp.async
// pieces. At T = 64K, H = 16 on an H200: states 1.34 -> 0.95 ms, rstates 1.81 -> 1.32
// (docs/history/delta-rule-log.md, twelfth round; there also the clusters of 2 with multicast copies,
// 1.64 / 1.94 ms, not kept).
// Tile layout: a chunk's w and K each as two [64][64] halves (columns 0..63, 64..127) of
// 128-byte rows, the 16-byte pieces of row r at piece index XOR (r % 8) (the tensor
// map's 128-byte swizzle: conflict-free for ldmatrix, like the padded rows of TileCopy).
template <typename T, int NS, int C = kChunkCols>
struct TmaStateSmem {
  static constexpr int LDC = C + 8;
  unsigned char tiles[NS][2][2 * kSwzHalf];  // [buffer][w, K]: 1024-byte aligned (the swizzle)
  T u[NS][CH * LDC];
  float meta[NS][2 * CH];
  T xb[128 * LDC];  // the carried columns (16-bit copy), [d][C]
  T ys[CH * LDC];
  uint64_t full[NS];  // buffer s holds its chunk's w and K
};

// The forward state pass (v_new, the 16-bit chunk states, the leaving state; C = 16) or,
// with kSummary, the part summary (C columns of [A | M], launched with 32; 16 measured
// slower, docs/history/delta-rule-log.md thirteenth round: grid x = 2 D / C,
// blocks x < D / C the columns of A from I with u = 0, the others M's from zero; no
// per-chunk outputs) of fwd_state_kernel_w8 (kLean) with the tiles above: the same
// products in the same order, so every output equals w8's (at the same C) bit for bit.
// The epilogue's decays d, its u values and the state's decay e are formed before the
// token product: written after it, the second token half's meta loads, MUFU and u loads
// follow the first half's ys stores (ptxas cannot tell the shared addresses apart), two
// dependent chains after the last HMMA. At T = 64K on an H200 states 0.95 -> 0.91 ms
// (16K: 0.25 -> 0.24); issuing the ring's refill after the product instead (where the warp
// waits on the mma chain) measured slower, 1.05 ms, and so did both (docs/history/delta-rule-log.md,
// "State passes, fifteenth round").
template <typename T, int NS, int C = kChunkCols, bool kSummary = false>
__global__ void __launch_bounds__(NT8, 2)
    fwd_state_kernel_tma(Problem p, ChunkPrep prep, ChunkStatesOut fo, const __grid_constant__ CUtensorMap wmap,
                         const __grid_constant__ CUtensorMap kmap, KMapDims kd, ChunkSummaryOut sum) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  __trap();  // the host launches it on sm_90 and later only
#else
  constexpr int D = 128, LDC = C + 8, NTL = C / 8, TPW = NTL / 2;  // n8 tiles: block, warp (token product)
  static_assert(C == kChunkCols || (kSummary && C == 2 * kChunkCols), "16 columns (32: the summary only)");
  constexpr uint32_t kBufBytes = 2 * 2 * kSwzHalf;  // w and K of a buffer
  extern __shared__ __align__(16) unsigned char smem_raw[];
  TmaStateSmem<T, NS, C>& sm =
      *reinterpret_cast<TmaStateSmem<T, NS, C>*>(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u));
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, C>(kSummary, amap);
  const int64_t bh = blockIdx.y;
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t npad = static_cast<int64_t>(nck) * CH, row0 = bh * npad;
  const int64_t se = static_cast<int64_t>(D) * D;
  const int r0 = 16 * warp;                          // state rows of this warp
  const int x0 = 16 * (warp & 3), n0 = 8 * TPW * (warp >> 2);  // tokens and columns of its token tiles

  float S[NTL][4];
  load_state<D>(S, amap, kSummary ? nullptr : fo.entering, bh * se, r0, j0, lane);
  init_full_barriers(sm.full, tid);
  __syncthreads();
  ColCopy<T, C, NT8> cu;
  MetaCopy cm;
  cu.init(static_cast<const T*>(prep.u) + row0 * D + j0, D, sm.u[0], tid);
  cm.init(prep.meta, row0, sm.meta[0], tid);
  T* const vn = !kSummary && fo.v_new != nullptr
                    ? static_cast<T*>(fo.v_new) + (row0 + x0 + (lane >> 2)) * D + j0 + n0 + 2 * (lane & 3)
                    : nullptr;
  T* const st16 = !kSummary && fo.states != nullptr
                      ? static_cast<T*>(fo.states) + bh * nck * se + (tid >> 1) * D + j0 + 8 * (tid & 1)
                      : nullptr;
  const uint32_t tiles0 = smem_u32(&sm.tiles[0][0][0]);
  // this lane's ldmatrix pieces at k-step 0: w (token rows x0..), K^T (state rows r0..)
  const uint32_t aw = (x0 + (lane & 15)) * 128 + (((lane >> 4) ^ (lane & 7)) << 4);
  const uint32_t ak = (r0 >> 6) * kSwzHalf + (8 * (lane >> 4) + (lane & 7)) * 128 +
                      ((((r0 & 63) >> 3) + ((lane >> 3) & 1)) ^ (lane & 7)) * 16;
  // chunk c's w and K into buffer c % NS (thread 0), both halves of each
  const int hb[3] = {static_cast<int>(bh % p.heads), 0, static_cast<int>(bh / p.heads)};
  auto issue_tiles = [&](int c) {
    const int s = c % NS, t = c * CH;
    mbar_arrive_expect_tx(&sm.full[s], kBufBytes);
    const uint32_t dst = tiles0 + s * kBufBytes;
    // the K map's coordinates 1..3 (h, t, b in the host's order)
    const int y = kd.h == 1 ? hb[0] : kd.t == 1 ? t : hb[2];
    const int z = kd.h == 2 ? hb[0] : kd.t == 2 ? t : hb[2];
    const int w = kd.h == 3 ? hb[0] : kd.t == 3 ? t : hb[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      tma_box_2d(dst + half * kSwzHalf, &wmap, 64 * half, static_cast<int>(row0) + t, &sm.full[s]);
      tma_box_4d(dst + (2 + half) * kSwzHalf, &kmap, 64 * half, y, z, w, &sm.full[s]);
    }
  };
  auto issue_own = [&](int c) {  // chunk c's u and meta into buffer c % NS
    if (!amap) cu.issue(c, (c % NS) * sizeof(sm.u[0]), CH);
    cm.issue(c, (c % NS) * sizeof(sm.meta[0]));
  };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int c = 0; c < nck; ++c) {
    const int s = c % NS;
    cp_async_wait_upto<NS - 2>();  // chunk c's u and meta have landed
    // the carried columns: 16-bit copy for the products (and the chunk state), checkpoints
#pragma unroll
    for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int row = r0 + (lane >> 2) + 8 * hf;
        const int cl = 8 * nt + 2 * (lane & 3), col = j0 + cl;
        const float s0 = S[nt][2 * hf], s1 = S[nt][2 * hf + 1];
        store_u32(sm.xb + row * LDC + cl, pack2<T>(s0, s1));
        if (!kSummary && fo.ckpt != nullptr) {
          const int64_t at = (bh * nck + c) * se;
          fo.ckpt[at + static_cast<int64_t>(col) * D + row] = s0;
          fo.ckpt[at + static_cast<int64_t>(col + 1) * D + row] = s1;
        }
      }
    mbar_wait(&sm.full[s], (c / NS) & 1);  // chunk c's w and K have landed
    // every warp is past chunk c - 1 (its buffer is free here) and sees chunk c and xb
    __syncthreads();
    // the ring's refill of buffer (c - 1) % NS (free: every warp is past chunk c - 1) and
    // the chunk's 16-bit state from xb (rewritten only after the next chunk's first barrier)
    ring_issue(c + NS - 1, nck, tid, issue_tiles, issue_own);
    if (st16 != nullptr) store_xb_piece(st16 + static_cast<int64_t>(c) * se, sm.xb, LDC, tid);
    const float* meta = sm.meta[s];
    const T* u = sm.u[s];
    const float GL = meta[2 * (CH - 1)], sL = meta[2 * (CH - 1) + 1];
    const uint32_t wt = tiles0 + s * kBufBytes;
    // the state's decay e, off the second product's path
    const float e = sL == 0.f ? lasp2::cuda::exp_ftz(GL) : 0.f;
    {  // v_new = u - w S (this warp's token tiles; u = 0 for the columns of A); ys = diag(d) v_new
      // both token halves' d and u before the product
      float d[2];
      float2 uu[2][TPW];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
        const float Gx = meta[2 * x], sx = meta[2 * x + 1];
        d[hf] = sx == sL ? lasp2::cuda::exp_ftz(GL - Gx) : 0.f;
#pragma unroll
        for (int t = 0; t < TPW; ++t)
          uu[hf][t] = amap ? make_float2(0.f, 0.f) : unpack2<T>(load_u32(u + x * LDC + n0 + 8 * t + 2 * (lane & 3)));
      }
      float acc[TPW][4] = {};
      mma_w_swizzled<T, TPW>(acc, wt + aw, sm.xb, LDC, n0, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = x0 + (lane >> 2) + 8 * hf;
#pragma unroll
        for (int t = 0; t < TPW; ++t) {
          const int cl = n0 + 8 * t + 2 * (lane & 3);
          const float v0 = uu[hf][t].x - acc[t][2 * hf], v1 = uu[hf][t].y - acc[t][2 * hf + 1];
          if (vn != nullptr) store_u32(vn + (static_cast<int64_t>(c) * CH + 8 * hf) * D + 8 * t, pack2<T>(v0, v1));
          store_u32(sm.ys + x * LDC + cl, pack2<T>(v0 * d[hf], v1 * d[hf]));
        }
      }
    }
    __syncthreads();
    {  // S <- e S + K^T ys (this warp's state rows)
#pragma unroll
      for (int nt = 0; nt < NTL; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] *= e;
      mma_k_swizzled<T, NTL>(S, wt + 2 * kSwzHalf + ak, sm.ys, LDC, lane);
    }
    if (!kSummary && fo.doc_f != nullptr) {  // S += f H: a document begun inside the chunk (delta_chunk_docs.h)
      float f = 0.f;
      const float* H = doc_carry<D>(p, fo, bh, c, npad, f);
      if (H != nullptr) add_state<D>(S, f, H, r0, j0, lane);
    }
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
      if (dh16 != nullptr)
        *reinterpret_cast<uint4*>(dh16 + static_cast<int64_t>(c) * se) =
            *reinterpret_cast<const uint4*>(sm.xb + (tid >> 1) * LDV + 8 * (tid & 1));
    } else if (ro.dh != nullptr) {  // xb's rows, 16 bytes a store: one a thread
      T* dst = static_cast<T*>(ro.dh) + (bh * nck + c) * se + j0;
      const int row = tid >> 1, part = tid & 1;  // NT8 = 2 D
      *reinterpret_cast<uint4*>(dst + row * D + 8 * part) = *reinterpret_cast<const uint4*>(sm.xb + row * LDV + 8 * part);
    }
    float GL = B.meta[2 * (CH - 1)], sL = B.meta[2 * (CH - 1) + 1];
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
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] *= e;
      mma_rows_halves<T, 2>(S, B.a2, LD, sm.ys, LDV, r0, lane);
      mma_rows_halves<T, 2>(oq, B.a3, LD, B.d, LDV, r0, lane);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] += oq[nt][q];
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier, and
    // refills this buffer after it
  }
  cp_async_wait_all();
  if (ro.entering != nullptr) store_state<D>(ro.entering + bh * se, S, r0, j0, lane);
}

// The reverse state pass (dh, the entering gradient) of rev_state_kernel_w8 (kLean) on the
// tiles of fwd_state_kernel_tma: each chunk's k, w and q as tensor-map boxes (three tiles,
// 48 KiB), dO's and r's 16 columns and the meta as cp.async pieces, a ring of kRevStages buffers
// walked backwards. The same products in the same order as w8, so every output equals
// w8's bit for bit.
template <typename T>
struct TmaRevSmem {
  static constexpr int NS = kRevStages;
  unsigned char tiles[NS][3][2 * kSwzHalf];  // [buffer][k, w, q]: 1024-byte aligned (the swizzle)
  T r[NS][CH * LDV];
  T d[NS][CH * LDV];
  float meta[NS][2 * CH];
  T xb[128 * LDV];  // the carried gradient (16-bit copy), [d][16]
  T ys[CH * LDV];
  uint64_t full[NS];  // buffer s holds its chunk's k, w and q
};

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
  TmaRevSmem<T>& sm =
      *reinterpret_cast<TmaRevSmem<T>*>(smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u));
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
  ColCopy<T, BV, NT8> cd, cr;
  MetaCopy cm;
  cd.init(rows_of<T>(dout, b, h, p.begin) + j0, dout.st, sm.d[0], tid);
  cr.init(static_cast<const T*>(prep.u) + row0 * D + j0, D, sm.r[0], tid);
  cm.init(prep.meta, row0, sm.meta[0], tid);
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
  auto issue_own = [&](int i) {
    const int c = nck - 1 - i, s = i % NS;
    cd.issue(c, s * sizeof(sm.d[0]), chunk_rows(p, c));
    cr.issue(c, s * sizeof(sm.r[0]), CH);
    cm.issue(c, s * sizeof(sm.meta[0]));
  };
#pragma unroll
  for (int i = 0; i < NS - 1; ++i) ring_issue(i, nck, tid, issue_tiles, issue_own);
  for (int i = 0; i < nck; ++i) {
    const int c = nck - 1 - i, s = i % NS;
    cp_async_wait_upto<NS - 2>();  // chunk c's column tiles and meta have landed
    store_rows<T, 2>(sm.xb, LDV, S, r0, lane);
    mbar_wait(&sm.full[s], (i / NS) & 1);  // chunk c's k, w and q have landed
    // every warp is past chunk c + 1 (its buffer is free here) and sees chunk c and xb
    __syncthreads();
    // the ring's refill of buffer (i - 1) % NS (free: every warp is past chunk c + 1) and
    // dh's 16 bytes of this thread from xb (before a document's end gradient overwrites xb
    // with F below)
    ring_issue(i + NS - 1, nck, tid, issue_tiles, issue_own);
    if (dh16 != nullptr) store_xb_piece(dh16 + static_cast<int64_t>(c) * se, sm.xb, LDV, tid);  // xb's rows
    const float* meta = sm.meta[s];
    T* const dd_t = sm.d[s];
    float GL = meta[2 * (CH - 1)], sL = meta[2 * (CH - 1) + 1];
    if (ro.doc_end_idx != nullptr && ro.doc_end_idx[bh * nck + c] >= 0) {  // F in X's place (delta_chunk_docs.h)
      const float* F = ro.doc_final + static_cast<int64_t>(ro.doc_end_idx[bh * nck + c]) * se;
      __syncthreads();  // dh's copy of xb is done
      load_state_xb<T, D>(S, sm.xb, LDV, F, r0, j0, lane);
      __syncthreads();
      GL = ro.doc_end_g[bh * nck + c];
      sL = 0.f;
    }
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
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] *= e;
      mma_k_swizzled<T>(S, kt + 2 * kSwzHalf + ak, sm.ys, LDV, lane);
      mma_k_swizzled<T>(oq, kt + 4 * kSwzHalf + ak, dd_t, LDV, lane);
#pragma unroll
      for (int nt = 0; nt < 2; ++nt)
#pragma unroll
        for (int q = 0; q < 4; ++q) S[nt][q] += oq[nt][q];
    }
    // no barrier: the next chunk writes xb and ys only after its first barrier
  }
  cp_async_wait_all();
  if (ro.entering != nullptr) store_state<D>(ro.entering + bh * se, S, r0, j0, lane);
#endif
}

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
  load_tile<T, D, NT>(sm.q, rows_of<T>(p.q, cp.b, cp.h, cp.t0), p.q.st, cp.nvalid, D, tid);
  load_tile<T, D, NT>(sm.k, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, cp.nvalid, D, tid);
  if constexpr (kOut) {
    load_tile<T, D, NT>(sm.x, static_cast<const T*>(xin.ptr) + cp.row0 * D, D, CH, D, tid);
    const T* st = static_cast<const T*>(states) + (cp.bh * nck + cp.c) * static_cast<int64_t>(D) * D;
#pragma unroll
    for (int r = 0; r < D; r += CH) load_tile<T, D, NT>(sm.st + r * LD, st + r * D, D, CH, D, tid);
  } else {
    load_tile<T, D, NT>(sm.x, rows_of<T>(xin, cp.b, cp.h, cp.t0), xin.st, cp.nvalid, D, tid);
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
  load_tile<T, D, NT>(sm.q, rows_of<T>(p.q, cp.b, cp.h, cp.t0), p.q.st, cp.nvalid, D, tid);
  load_tile<T, D, NT>(sm.k, rows_of<T>(p.k, cp.b, cp.h, cp.t0), p.k.st, cp.nvalid, D, tid);
  load_tile<T, D, NT>(sm.x, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, cp.nvalid, D, tid);
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

// ---- launch helpers ---------------------------------------------------------------------
constexpr const char* kWho = "lasp2 (CUDA delta rule, chunked)";

void check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

template <typename Kernel>
void allow(Kernel kernel, int bytes, const char* what) {
  chunk_allow_smem(kernel, bytes, kWho, what);
}

// Calls f(T{}, integral_constant D) for p (16-bit inputs, d = 64 or 128).
template <typename F>
void dispatch(const Problem& p, F&& f) {
  chunk_dispatch<false>(p, kWho, f);
}

dim3 chunk_grid(const Problem& p) {
  return dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh()));
}

// A kernel choice read at every launch (the tests compare the two): true where `name` is
// `old`, false where it is unset, empty or `dflt`; anything else is an error.
bool env_is(const char* name, const char* old, const char* dflt) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == 0 || std::strcmp(env, dflt) == 0) return false;
  if (std::strcmp(env, old) == 0) return true;
  fail(std::string("lasp2 (CUDA delta rule, chunked): ") + name + " must be " + dflt + " or " + old + ", not " + env);
}

}  // namespace

void launch_chunk_prep(const Problem& p, const ChunkPrep& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const int bytes = static_cast<int>(sizeof(PrepSmem<T, D>));
    auto run = [&](auto kernel) {
      allow(kernel, bytes, "chunk prep smem");
      kernel<<<chunk_grid(p), NT, bytes, s>>>(p, out);
    };
    if (env_is("LASP2_DELTA_PREP_KERNEL", "old", "new")) return run(prep_kernel<T, D, false>);
    run(prep_kernel<T, D, true>);
  });
  check(cudaGetLastError(), "chunk prep kernel");
}

// Which state passes run (LASP2_DELTA_STATE_KERNEL, read at every launch: the tests
// compare them). Unset: "tma" where it runs (sm_90, d = 128, strides a tensor map takes),
// else "w8". "tile": fwd_state_kernel and rev_state_kernel (4 warps a block); "w8": their
// 8-warp versions with the copies addressed once a block (d = 128, else tile); "w8calc":
// the 8-warp versions addressing every chunk's copies anew (kept for the ninth round's
// A/B); "tma": the forward and reverse passes and the part summary (32-column blocks) on
// whole-tile tensor-map copies (fwd_state_kernel_tma, rev_state_kernel_tma; chosen by
// name where they cannot run, an error). docs/history/delta-rule-log.md, twelfth, thirteenth and
// fifteenth rounds.
enum class StatePass { kTile, kW8, kW8Calc, kTma, kDefault };
StatePass state_pass() {
  const char* env = std::getenv("LASP2_DELTA_STATE_KERNEL");
  if (env == nullptr || *env == 0) return StatePass::kDefault;
  if (std::strcmp(env, "w8") == 0) return StatePass::kW8;
  if (std::strcmp(env, "w8calc") == 0) return StatePass::kW8Calc;
  if (std::strcmp(env, "tile") == 0) return StatePass::kTile;
  if (std::strcmp(env, "tma") == 0) return StatePass::kTma;
  fail(std::string("lasp2 (CUDA delta rule, chunked): LASP2_DELTA_STATE_KERNEL must be tile, w8, w8calc or tma, "
                   "not ") +
       env);
}

// LASP2_DELTA_STATE_KERNEL=tma where its kernels cannot run: an error, not a silent w8
// (the tests compare the two).
[[noreturn]] void fail_tma_unavailable() {
  fail("lasp2 (CUDA delta rule, chunked): LASP2_DELTA_STATE_KERNEL=tma needs sm_90 "
       "and tensor-map strides (16-byte multiples)");
}


// ---- the tensor maps of fwd_state_kernel_tma ---------------------------------------------

// The part's token rows of a [B, T, H, D]-strided 16-bit view (from token p.begin, p.n
// of them; rows past the part read as zeros) as a 4-d map {d, ...} whose other three
// dimensions go by stride (one of extent 1 last); kd says where h, t and b went.
template <typename T>
bool encode_token_map(CUtensorMap* map, KMapDims& kd, const View& v, const Problem& p, int rows) {
  const auto dm = token_dims_by_stride(v, p.heads, p.n, p.batch);
  cuuint64_t dims[4] = {128, 0, 0, 0}, strides[3];
  int row_dim = 0;
  for (int i = 0; i < 3; ++i) {
    dims[i + 1] = static_cast<cuuint64_t>(dm[i].extent);
    strides[i] = static_cast<cuuint64_t>(dm[i].stride) * sizeof(T);
    (dm[i].which == 0 ? kd.h : dm[i].which == 1 ? kd.t : kd.b) = i + 1;
    if (dm[i].which == 1) row_dim = i + 1;
  }
  return encode_rows_map<T>(map, 4, static_cast<const T*>(v.ptr) + p.begin * v.st, dims, strides, row_dim, rows);
}
// A tma state kernel: its shared memory allowed, launched with NT8 threads a block.
template <typename... Params, typename... Args>
void launch_tma_pass(void (*kernel)(Params...), dim3 grid, int bytes, cudaStream_t s, Args&&... args) {
  allow(kernel, bytes, "chunk state smem (tma)");
  kernel<<<grid, NT8, bytes, s>>>(std::forward<Args>(args)...);
}

// The forward state pass (C = 16) or, with kSummary, the part summary (sum) on
// fwd_state_kernel_tma; false (nothing launched) where it cannot run: before sm_90, a
// binary without sm_90 code, strides a tensor map cannot take.
template <typename T, int C = kChunkCols, bool kSummary = false>
bool launch_fwd_states_tma(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out,
                           const ChunkSummaryOut& sum, cudaStream_t s) {
  constexpr int D = 128;
  const int64_t nck = chunk_count(p), rows = p.bh() * nck * CH;
  if (rows >= (int64_t{1} << 31) || p.heads <= 0 || p.batch <= 0) return false;
  CUtensorMap wmap, kmap;
  {  // w: [bh * nck * 64 rows][D], contiguous
    const cuuint64_t dims[2] = {D, static_cast<cuuint64_t>(rows)}, strides[1] = {D * sizeof(T)};
    if (!encode_rows_map<T>(&wmap, 2, prep.w, dims, strides, 1, CH)) return false;
  }
  KMapDims kd{};
  if (!encode_token_map<T>(&kmap, kd, p.k, p, CH)) return false;
  const dim3 grid((kSummary ? 2 : 1) * D / C, static_cast<unsigned>(p.bh()));
  auto run = [&](auto kernel, int ns) {
    if (!runs_sm90(kernel)) return false;
    // + 1024: the tiles' alignment for the swizzle
    const int bytes =
        static_cast<int>((ns == 4 ? sizeof(TmaStateSmem<T, 4, C>) : sizeof(TmaStateSmem<T, 2, C>)) + 1024);
    launch_tma_pass(kernel, grid, bytes, s, p, prep, out, wmap, kmap, kd, sum);
    return true;
  };
  // ring depth 4 when the blocks fit the device in one wave (one block an SM), else 2
  const bool one_wave = static_cast<int64_t>(grid.x) * p.bh() <= lasp2::cuda::device_info().sms;
  return one_wave ? run(fwd_state_kernel_tma<T, 4, C, kSummary>, 4) : run(fwd_state_kernel_tma<T, 2, C, kSummary>, 2);
}

// The reverse state pass on rev_state_kernel_tma; false (nothing launched) where it
// cannot run, as launch_fwd_states_tma.
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
  const cuuint64_t dims[2] = {D, static_cast<cuuint64_t>(rows)}, strides[1] = {D * sizeof(T)};
  if (!encode_rows_map<T>(&wmap, 2, prep.w, dims, strides, 1, CH) || !encode_token_map<T>(&kmap, kd, p.k, p, CH) ||
      !encode_token_map<T>(&qmap, qd, p.q, p, CH))
    return false;
  const int bytes = static_cast<int>(sizeof(TmaRevSmem<T>) + 1024);  // + the swizzle's alignment
  launch_tma_pass(kernel, dim3(D / BV, static_cast<unsigned>(p.bh())), bytes, s, p, dout, prep, out, kmap, wmap, qmap,
                  kd, qd);
  return true;
}

// The forward state pass and the part summary. At d = 128 the 8-warp kernel: 16 columns
// a block for the state pass, 32 for the summary (whose 2 d columns a (b, h) would
// otherwise take two blocks an SM, each reading w and K). Measured at T = 64K, H = 16,
// bf16 on an H200 (docs/history/delta-rule-log.md, "State passes, seventh round"): states 1.36 ms
// with 8 warps against 1.42 with 4 (2.19 with 32 columns: half the SMs, twice the
// work each); summary 1.50 with 32 columns against 1.70 (4 warps) and 1.73 (8 warps,
// 16 columns). The copies addressed once a block (w8 against w8calc, ninth round):
// states 1.37 -> 1.22, summary 1.43 -> 1.36 ms. Ring depth 4 when the blocks fit the
// device in one wave (one block an SM), else 2 (two blocks an SM hide each other's loads).
// On sm_90 the state pass runs on tensor-map copies by default (fwd_state_kernel_tma:
// 1.34 -> 0.95 ms against w8 in one call, twelfth round), and so does the summary, in
// 32-column blocks (1.43 -> 1.03 ms; 16-column blocks 1.20, thirteenth round).
template <typename T, int D>
void launch_fwd_states(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out, const ChunkSummaryOut& sum,
                       cudaStream_t s) {
  const StatePass pass = state_pass();
  if constexpr (D == 128) {
    auto w8 = [&](auto cols_tag, auto lean_tag) {
      constexpr int CW = decltype(cols_tag)::value;
      constexpr bool kLean = decltype(lean_tag)::value;
      const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / CW;
      const dim3 grid(cols, static_cast<unsigned>(p.bh()));
      auto run = [&](auto kernel, int bytes) {
        allow(kernel, bytes, "chunk state smem");
        kernel<<<grid, NT8, bytes, s>>>(p, prep, out, sum);
      };
      if (static_cast<int64_t>(cols) * p.bh() <= lasp2::cuda::device_info().sms)
        return run(fwd_state_kernel_w8<T, D, CW, 4, kLean>, static_cast<int>(sizeof(FwdStateSmem<T, D, CW, 4>)));
      run(fwd_state_kernel_w8<T, D, CW, 2, kLean>, static_cast<int>(sizeof(FwdStateSmem<T, D, CW, 2>)));
    };
    auto w8_cols = [&](auto lean_tag) {
      if (sum.A != nullptr) return w8(std::integral_constant<int, 2 * kChunkCols>{}, lean_tag);
      w8(std::integral_constant<int, kChunkCols>{}, lean_tag);
    };
    if (pass == StatePass::kTma || pass == StatePass::kDefault) {
      const bool done = sum.A == nullptr ? launch_fwd_states_tma<T>(p, prep, out, sum, s)
                                         : launch_fwd_states_tma<T, 2 * kChunkCols, true>(p, prep, out, sum, s);
      if (done) return;
      if (pass == StatePass::kTma) fail_tma_unavailable();
    }
    if (pass == StatePass::kW8 || pass == StatePass::kDefault) return w8_cols(std::true_type{});
    if (pass == StatePass::kW8Calc) return w8_cols(std::false_type{});
  }
  constexpr int C = kChunkCols;
  const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / C;
  const dim3 grid(cols, static_cast<unsigned>(p.bh()));
  if (static_cast<int64_t>(cols) * p.bh() <= lasp2::cuda::device_info().sms) {
    const int bytes = static_cast<int>(sizeof(FwdStateSmem<T, D, C, 4>));
    allow(fwd_state_kernel<T, D, C, 4>, bytes, "chunk state smem");
    fwd_state_kernel<T, D, C, 4><<<grid, NT, bytes, s>>>(p, prep, out, sum);
  } else {
    const int bytes = static_cast<int>(sizeof(FwdStateSmem<T, D, C, 2>));
    allow(fwd_state_kernel<T, D, C, 2>, bytes, "chunk state smem");
    fwd_state_kernel<T, D, C, 2><<<grid, NT, bytes, s>>>(p, prep, out, sum);
  }
}

void launch_chunk_states(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out, cudaStream_t s) {
  if (p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    launch_fwd_states<decltype(tag), decltype(dim)::value>(p, prep, out, ChunkSummaryOut{}, s);
  });
  check(cudaGetLastError(), "chunk state kernel");
}

void launch_chunk_summary(const Problem& p, const ChunkPrep& prep, const ChunkSummaryOut& out, cudaStream_t s) {
  if (p.bh() == 0) return;
  if (out.A == nullptr || out.M == nullptr) fail("lasp2 (CUDA delta rule, chunked): the summary needs A and M");
  dispatch(p, [&](auto tag, auto dim) {
    launch_fwd_states<decltype(tag), decltype(dim)::value>(p, prep, ChunkStatesOut{}, out, s);
  });
  check(cudaGetLastError(), "chunk summary kernel");
}

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
