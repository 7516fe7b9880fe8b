// The chunk-parallel backward of the chunked GDN kernels (see delta_chunk_bwd.h): one
// block of 8 warps per (chunk, b, h), mma.sync m16n8k16 in the input dtype with fp32
// accumulation. Warp w owns tokens [16 (w % 4), +16) of the chunk and half of
// the columns (w / 4) in every product; per-token sums (the G and beta gradients) meet
// in shared memory.
#include <string>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "cuda/tc_tile_map.cuh"  // tile_map_box, tile_copy_forced_cp_async
#include "delta_rule/cuda/chunk_grad_maps.cuh"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// One block runs two phases in the same tiles, so that they stay under half of an
// SM's shared memory (two blocks an SM hide one block's loads and barriers behind the
// other's; the one-phase kernel of 224 KiB ran one block an SM). The values phase
// takes the side of dU: dU, dB, dv, dA and the dk terms of U dh^T and dA; the keys
// phase the side of the scores and of h: dP, dq and the rest of dk, then dg and dbeta.
// The keys phase's tiles load into the values phase's as each one falls free (lean: q
// over v, dO over dB, h over dh, dP over dA; dB goes out through dq's rows and comes
// back over v_new once the scores are formed, dk's first terms through dk's, 16 bits, as
// fla's two dk halves; early and ordered, the default: below, at the kernel's forms).
template <typename T, int D>
struct BwdSmem {
  static constexpr int LD = TcTile<D>::LD;
  T k[CH * LD];
  T u[CH * LD];     // v_new; keys: dB
  T vq[CH * LD];    // v; keys: q
  T x[CH * LD];     // r, then dU, then dB; keys: dO
  T s[D * LD];      // dh; keys: h
  T tt[CH * kLdP];  // T = (I + L)^-1 (from prep), then dA; keys: dP
  float meta[2 * CH];
  float bt[CH];
  // The per-token sums of dg and dbeta, [column half][dG, dbeta][token]. The atomic forms
  // (early, lean) add every warp's share into [0] with shared-memory atomics. The
  // ordered form (the default) gives each lane one place of its warp's column half (below,
  // own_row_slot) and sums the halves once, in a fixed order, at the end.
  float rsum[2][2][CH];
  float wsum[16];  // ordered: each warp's dU total into the last token [w], its <dh, h> share [8 + w]
  float dot;       // the atomic forms' <dh, h>
  __device__ float* dG() { return rsum[0][0]; }
  __device__ float* db() { return rsum[0][1]; }
};

constexpr int kThreads = 256;  // 8 warps
// sm_90: 228 KiB of shared memory an SM, 1 KiB of it reserved per block
constexpr size_t kTwoBlocks = 228 * 1024 / 2 - 1024;
// kTma's two barriers: 16 bytes after the tiles, 16-byte aligned
template <typename T, int D>
constexpr size_t kBarOff = (sizeof(BwdSmem<T, D>) + 15) / 16 * 16;
static_assert(kBarOff<__half, 128> + 16 <= kTwoBlocks, "two blocks an SM (with kTma's barriers)");

// Both kernels (ninth round) take the cheap instructions: decays are one MUFU.EX2 each
// (exp_ftz: every argument is <= 0; a weight below 2^-126 becomes 0 instead of a denormal)
// instead of __expf's seven instructions; the score epilogues read the {G, s} pairs of a
// fragment's two key columns as one 16-byte shared load and the row's once per row (read
// per element, they are reloaded: the tile stores between them are generic stores the
// compiler cannot prove apart); b and h come from a 32-bit division (bh < 65536, a grid
// dimension) instead of the 64-bit one.
// This lane's places in a 16-bit [token][d] output (dq, dk, dv) for its two fragment rows,
// formed once per use: a fragment's column tile j is then at + 8 j (an immediate in the
// store) instead of each 64-bit address formed anew (4 integer instructions a store).
template <typename T>
__device__ __forceinline__ void out_rows(T* (&at)[2], T* row, int64_t st, int m0, int n0, int lane) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) at[hf] = row + (m0 + (lane >> 2) + 8 * hf) * st + n0 + 2 * (lane & 3);
}

// The kernel's three forms (LASP2_DELTA_CHUNK_BWD_KERNEL): ordered (kOrd: the production
// form; session 17: dg and dbeta summed without atomics in a fixed order, own_rows below;
// the rest of its changes to early below, at the kernel), early (twelfth round, ordered's
// reference) and lean (ninth round, early's reference). early and lean are TEST
// REFERENCES only (EarlyEqualsLean: ordered and early against lean, dq / dk / dv bit for
// bit); session 16's sums form (ordered's products with dg and dbeta in shared-memory
// atomics; 4 % slower at 64K on the H200 and not the same bits from run to run) was
// removed in session 17.
// The lean kernel hands dB from the values phase to the keys phase through
// dq's rows and dk's first terms through dk's (16-bit stores, read back); the early
// kernel writes dq and dk once: it keeps dB in its tile and dk's first terms in
// registers, rounded to 16 bits as the hand-over through dk rounds them, so its dq, dk
// and dv are the lean kernel's bit for bit. What makes the room: dO comes in over v (free
// after dB) instead of over dB, and the scores' two products are split: dP = scale Gam o
// dO U^T is formed while U is still in its tile (its fp32 values stay in registers for
// the gate terms), then q comes in over U for P = scale Gam o Q K^T. Its dk term
// diag(d) U dh^T is formed next to dU (the fp32 fragments held in registers through dB
// and dA), so that h can take dh's tile as soon as dU is formed and lands behind dB, dA
// and dP. Keys phase order: Z (dB S0^T, while q lands), the rest of dk, P's gate terms,
// dq. (Measured on the H200 at 64K: docs/history/delta-rule-log.md, "Chunk backward, twelfth round"
// and "..., fourteenth round".) Since the sixteenth round kOrd (then sums) also reads some
// shared-memory values ahead of the stores that held them back (below, at the kernel).
__device__ __forceinline__ float bwd_exp(float x) { return lasp2::cuda::exp_ftz(x); }

// The ordered form's lane helpers. (Session 16's sums form added the same shuffled
// partial sums with shared-memory atomics, one compare-and-swap loop a lane: 9 loops a
// warp instead of early's 35; removed in session 17 for the ordered form below.)
// A lane's pick of v[0..3] by i (registers, not an indexed local array).
__device__ __forceinline__ float pick4(float v0, float v1, float v2, float v3, int i) {
  return i == 0 ? v0 : i == 1 ? v1 : i == 2 ? v2 : v3;
}
// After col_sum every lane of quad position q holds the sums of columns 8 j + 2 q + par
// of 4 n8 tiles; lane 4 g + q takes j = g / 2, par = g % 2.
// col_one: this lane's column sum, col_of: its column (from c0).
__device__ __forceinline__ float col_one(const float (&c)[4][2], int lane) {
  float s[8];
#pragma unroll
  for (int j = 0; j < 4; ++j)
#pragma unroll
    for (int par = 0; par < 2; ++par) s[2 * j + par] = col_sum(c[j][par]);
  const int g = lane >> 2;
  float v = s[0];
#pragma unroll
  for (int i = 1; i < 8; ++i) v = g == i ? s[i] : v;
  return v;
}
__device__ __forceinline__ int col_of(int lane) {
  const int g = lane >> 2;
  return 8 * (g >> 1) + 2 * (lane & 3) + (g & 1);
}

// The ordered form's sums (session 17; kOrd below): no atomics, so dg and dbeta are the
// same bits from run to run (the atomics' order between warps is not). Lane 4 g + q of a
// warp owns one place for the whole kernel: dG (q < 2) or dbeta (q >= 2) of row
// m0 + g + 8 (q & 1) in its column half's slots, and adds each of the warp's row sums
// there by a plain load and store (no other thread touches it until the last barrier,
// so program order is the order). A lane's column sum (col_of's column) of N (dA's
// epilogue) stays in a register until M's (the keys phase), when dB's tile is free: the
// two go to a [row block][token] slot there. The warps' dU totals into the last token
// and their <dh, h> shares go to one slot a warp. The dg loop adds the slots in one
// fixed order. No extra barrier; 576 bytes more shared memory a block.
template <typename T, int D>
__device__ __forceinline__ float* own_row_slot(BwdSmem<T, D>& sm, int nh, int m0, int lane) {
  return sm.rsum[nh][(lane & 3) >> 1] + m0 + (lane >> 2) + 8 * (lane & 1);
}
// The row sums of va (dG, kG) and vb (dbeta, kB) into this lane's place: stored (kFirst:
// the array's first sum) or added.
template <bool kG, bool kB, bool kFirst = false>
__device__ __forceinline__ void own_rows(float* own, const float (&va)[2], const float (&vb)[2], int lane) {
  const float a0 = kG ? row_sum(va[0]) : 0.f, a1 = kG ? row_sum(va[1]) : 0.f;
  const float b0 = kB ? row_sum(vb[0]) : 0.f, b1 = kB ? row_sum(vb[1]) : 0.f;
  const int q = lane & 3;
  if ((kG && q < 2) || (kB && q >= 2)) {
    const float v = pick4(a0, a1, b0, b1, q);
    *own = kFirst ? v : *own + v;
  }
}

// The blocks that both kernels run alike, each on its own tiles (keys phase, early: dO
// over v, q over U, dB in its own; lean: dO over dB, q over v, dB back over U), so that
// the two forms share one text (their PTX, sm_90a and sm_80, is unchanged by it).

// dq = scale diag(ent) dO S0^T + dP K (dP[x][y] is zero for y > x: key blocks 0..mw);
// dG_x += q_x . (the first term)_x. qd: the row sums' room, the caller's (a local array
// here moves the kernel's PTX: see kz_terms).
template <typename T, int D, bool kOrd = false>
__device__ __forceinline__ void dq_terms(float (&dq)[D / 16][4], float (&qd)[2], BwdSmem<T, D>& sm, const T* dO,
                                         const T* q, const Problem& p, int m0, int n0, int mw, int lane,
                                         [[maybe_unused]] float* own = nullptr) {
  constexpr int LD = TcTile<D>::LD, NH = D / 16;
  zero(dq);
  mma_acc<T, NH, false, true>(dq, dO, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
  qd[0] = qd[1] = 0.f;
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int x = m0 + (lane >> 2) + 8 * hf;
    const float c = sm.meta[2 * x + 1] == 0.f ? p.scale * bwd_exp(sm.meta[2 * x]) : 0.f;
#pragma unroll
    for (int j = 0; j < NH; ++j) {
      const int col = n0 + 8 * j + 2 * (lane & 3);
      dq[j][2 * hf] *= c;
      dq[j][2 * hf + 1] *= c;
      const float2 qq = unpack2<T>(load_u32(q + x * LD + col));
      qd[hf] += dq[j][2 * hf] * qq.x + dq[j][2 * hf + 1] * qq.y;
    }
  }
  if constexpr (kOrd) {
    own_rows<true, false>(own, qd, qd, lane);
  } else {
    add_rows(sm.dG(), qd, m0, lane);
  }
  mma_acc<T, NH, false, false>(dq, sm.tt, kLdP, sm.k, LD, m0, n0, 0, mw + 1, NH / 2, lane);
}

// dk's first term diag(d) U dh^T, d_x = exp(G_L - G_x) for the tokens of the chunk's last
// segment (0 before it): U in its tile, dh in the state tile (early forms it next to dU,
// lean in the values phase's dk terms).
template <typename T, int D>
__device__ __forceinline__ void ud_terms(float (&acc)[D / 16][4], BwdSmem<T, D>& sm, float GL, float sL, int m0,
                                         int n0, int lane) {
  constexpr int LD = TcTile<D>::LD, NH = D / 16;
  zero(acc);
  mma_acc<T, NH, false, true>(acc, sm.u, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    const int x = m0 + (lane >> 2) + 8 * hf;
    const float d = sm.meta[2 * x + 1] == sL ? bwd_exp(GL - sm.meta[2 * x]) : 0.f;
#pragma unroll
    for (int j = 0; j < NH; ++j) {
      acc[j][2 * hf] *= d;
      acc[j][2 * hf + 1] *= d;
    }
  }
}

// This lane's fragment rows of a 16-bit output (places from out_rows), the chunk's valid
// tokens only.
template <typename T, int NH>
__device__ __forceinline__ void store_rows(T* const (&at)[2], const float (&acc)[NH][4], int m0, int nvalid,
                                           int lane) {
#pragma unroll
  for (int j = 0; j < NH; ++j)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf)
      if (m0 + (lane >> 2) + 8 * hf < nvalid) store_u32(at[hf] + 8 * j, pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]));
}

// Z's gate terms, kz_x = k_x . Z_x: dG_x -= beta_x kz_x, dbeta_x -= kz_x. kzb and kzm:
// the two row vectors' room, the caller's: with local arrays here (allocas that, once
// inlined, likely sit ahead of the kernel's own) the d = 64 kernels' PTX changed
// (registers coalesced otherwise in the values phase), though the work was the same.
template <typename T, int D, bool kOrd = false>
__device__ __forceinline__ void kz_terms(BwdSmem<T, D>& sm, const float (&kz)[2], float (&kzb)[2], float (&kzm)[2],
                                         int m0, int lane, [[maybe_unused]] float* own = nullptr) {
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    kzb[hf] = -sm.bt[m0 + (lane >> 2) + 8 * hf] * kz[hf];
    kzm[hf] = -kz[hf];
  }
  if constexpr (kOrd) {
    own_rows<true, true>(own, kzb, kzm, lane);
  } else {
    add_rows(sm.dG(), kzb, m0, lane);
    add_rows(sm.db(), kzm, m0, lane);
  }
}

// kOrd (the ordered form; its changes to early came in three steps: the sums form of the
// fourteenth and sixteenth rounds, then the ordered sums of session 17, above at own_rows):
// early with these changes. The gate gradients' sums run without atomics (above; session
// 16's sums form ran them in 9 compare-and-swap loops a warp instead of early's 35, dU's
// sum into the chunk's last token reduced over the warp first). And h is read once: the 32 KiB of h that
// every thread loads into registers at the start for <dh, h> stay there until dh's tile
// is free and are stored into it from the registers (early reads h from global memory a
// second time, into that tile, by cp.async); <dh, h> is formed after dU and diag(d) U
// dh^T, so that those products need not wait for h's loads. The products are early's in
// the same order: dq, dk, dv equal bit for bit, dg and dbeta up to the order of the sums.
// It also moves the loads that the H200 profile at 64K found waiting behind stores
// ahead of them (sixteenth round): in the dv / dbeta loop (9.5 % of the kernel's stall
// samples: each pair's beta and v loads came after the previous pair's global store, a
// branch of its own) and the key columns' {G, s} of the dA and dP epilogues (reloaded
// after every store into T's tile); beta comes by cp.async with the first group instead
// of a load stored at once. 1.73 -> 1.62 ms at 64K (docs/history/delta-rule-log.md, "Chunk backward
// and reverse pass, sixteenth round"); nothing is computed otherwise.
//
// kTma (session 16, the default on sm_90; chunk_bwd_kernel_tma): the tiles (k, dh, r,
// v_new; then T and v; then dO over v and q over U) arrive as tensor-map copies that
// thread 0 issues, one box a 64-row tile, counted on two mbarriers (phase 0: the first
// two groups, phase 1: dO and q) instead of 4-8 cp.async pieces a thread and tile; the
// output, dq and dk/dv passes measured 12-15 % faster so. The boxes are the padded tiles
// (tc_tile_map.cuh): the same bytes in the places the products read (rows past the part
// zero, as load_tile's zero-fill), so the same bits. The meta and beta stay cp.async,
// h comes from registers (kOrd).
struct BwdMaps {
  // 0 k, 1 dh, 2 r, 3 v_new, 4 T, 5 v, 6 dO, 7 q (hdim / tdim / bdim: tile_map_box's)
  CUtensorMap map[8];
  int hdim[8], tdim[8], bdim[8];
};
constexpr int kMapK = 0, kMapDh = 1, kMapR = 2, kMapVnew = 3, kMapT = 4, kMapV = 5, kMapDo = 6, kMapQ = 7;
// Thread 0 of a kTma block: the view tile of map m at chunk c of (b, h) into dst, its bytes
// on bar, after the block's earlier reads of dst (ordered before this thread by a
// __syncthreads) are ordered before the copy engine's writes.
template <typename T, int D>
__device__ __forceinline__ void tma_view_tile_after_reads(const BwdMaps* maps, int m, const T* dst, const ChunkPos& cp,
                                                          uint64_t* bar) {
  fence_proxy_async_shared();
  mbar_arrive_expect_tx(bar, CH * TcTile<D>::LD * sizeof(T));
  lasp2::cuda::tile_map_box(smem_u32(dst), &maps->map[m], maps->hdim[m], maps->tdim[m], cp.h, cp.c * CH, cp.b, bar);
}

template <typename T, int D, bool kEarly, bool kOrd, bool kTma>
__device__ __forceinline__ void chunk_bwd_body(const Problem& p, const ChunkBackwardArgs& a,
                                               [[maybe_unused]] const BwdMaps* maps) {
  static_assert(kEarly || !kOrd, "ordered is a form of early");
  static_assert(!kTma || kOrd, "tensor-map copies: the ordered form");
  constexpr int LD = TcTile<D>::LD;
  constexpr int NH = D / 16;  // n8 tiles across half a head dim
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BwdSmem<T, D>& sm = *reinterpret_cast<BwdSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5;
  const WarpPart wp(tid, D);
  const int lane = wp.lane, mw = wp.mw, m0 = wp.m0, n0 = wp.n0, c0 = wp.c0;
  ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  {  // (the 64-bit division's results are then unused and not computed)
    const unsigned bh32 = blockIdx.y, heads = static_cast<unsigned>(p.heads);
    cp.b = static_cast<int>(bh32 / heads);
    cp.h = static_cast<int>(bh32 - static_cast<unsigned>(cp.b) * heads);
  }
  // ordered: this lane's place in the row sums (own_row_slot; formed where used)
  [[maybe_unused]] auto own = [&] { return own_row_slot(sm, warp >> 2, m0, lane); };
  const int nck = static_cast<int>(chunk_count(p));
  const int64_t at = (cp.bh * nck + cp.c) * static_cast<int64_t>(D) * D;
  T* dqrow = static_cast<T*>(a.dq) + cp.b * a.dqsb + cp.t0 * a.dqst + cp.h * a.dqsh;
  T* dkrow = static_cast<T*>(a.dk) + cp.b * a.dksb + cp.t0 * a.dkst + cp.h * a.dksh;

  // ---- values phase
  [[maybe_unused]] uint64_t* bars = reinterpret_cast<uint64_t*>(smem_raw + kBarOff<T, D>);  // kTma
  if constexpr (kTma) {
    if (tid == 0) {
      // chunk_bwd_body's kTma: one box a 64-row tile; the scratch arrays' maps take
      // (b, h) as "head" bh and their rows as tokens (launch_chunk_backward_tma)
      init_ring_barriers<2>(bars);
      constexpr uint32_t kTile = CH * LD * sizeof(T), kTileT = CH * kLdP * sizeof(T);
      const int bh = static_cast<int>(cp.bh), t = cp.c * CH;
      auto box = [&](int m, const T* dst, int hh, int tt, int bb, int bar) {
        lasp2::cuda::tile_map_box(smem_u32(dst), &maps->map[m], maps->hdim[m], maps->tdim[m], hh, tt, bb, &bars[bar]);
      };
      mbar_arrive_expect_tx(&bars[0], (3 + D / CH) * kTile);
      box(kMapK, sm.k, cp.h, t, cp.b, 0);
#pragma unroll
      for (int r = 0; r < D; r += CH) box(kMapDh, sm.s + r * LD, bh, cp.c * D + r, 0, 0);
      box(kMapR, sm.x, bh, t, 0, 0);
      box(kMapVnew, sm.u, bh, t, 0, 0);
      mbar_arrive_expect_tx(&bars[1], kTile + kTileT);
      box(kMapT, sm.tt, bh, t, 0, 1);
      box(kMapV, sm.vq, cp.h, t, cp.b, 1);
    }
  } else {
    load_chunk_rows<T, D, kThreads>(sm.k, p.k, cp, tid);
    {
      const T* dst = static_cast<const T*>(a.dh) + at;
#pragma unroll
      for (int r = 0; r < D; r += CH) load_tile<T, D, kThreads>(sm.s + r * LD, dst + r * D, D, CH, D, tid);
    }
    load_scratch_rows<T, D, kThreads>(sm.x, a.r, cp, tid);
    load_scratch_rows<T, D, kThreads>(sm.u, a.v_new, cp, tid);
  }
  load_meta(sm.meta, a.meta, cp.row0, tid);
  if constexpr (kOrd) {  // beta with the first group (zero past the valid tokens, as below)
    if (tid < CH) {
      const bool valid = tid < cp.nvalid;
      const float* src = p.beta + cp.b * p.bsb + (cp.t0 + tid) * p.bst + cp.h * p.bsh;
      lasp2::cuda::cp_async4(sm.bt + tid, valid ? src : p.beta, valid);
    }
  }
  cp_async_commit();  // what dU needs; T and v land while it is formed
  if constexpr (!kTma) {
    load_tile<T, CH, kThreads>(sm.tt, static_cast<const T*>(a.t) + cp.row0 * CH, CH, CH, CH, tid);
    load_chunk_rows<T, D, kThreads>(sm.vq, p.v, cp, tid);
  }
  cp_async_commit();  // (kTma: empty, so that the waits below count the same groups)
  // h meets dh only in <dh, h>: straight into registers, 16 bytes a load (dh's tile
  // takes h only after dh's last use)
  constexpr int kDotVecs = D * D / 8 / kThreads;
  uint4 hv[kDotVecs];
  {
    const uint4* hs = reinterpret_cast<const uint4*>(static_cast<const T*>(a.states) + at);
#pragma unroll
    for (int i = 0; i < kDotVecs; ++i) hv[i] = hs[tid + i * kThreads];
  }
  if (tid < CH) {
    const int64_t t = cp.t0 + tid;
    if constexpr (!kOrd) sm.bt[tid] = tid < cp.nvalid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
    if constexpr (!kOrd) {  // (ordered: each place's first sum is a store)
      sm.dG()[tid] = 0.f;
      sm.db()[tid] = 0.f;
    }
  }
  if (!kOrd && tid == 0) sm.dot = 0.f;
  cp_async_wait_group1();
  __syncthreads();
  if constexpr (kTma) mbar_wait(&bars[0], 0);  // (after the barrier: thread 0 has initialised it)
  const float GL = sm.meta[2 * (CH - 1)], sL = sm.meta[2 * (CH - 1) + 1];
  auto Gof = [&](int x) { return sm.meta[2 * x]; };
  auto sof = [&](int x) { return sm.meta[2 * x + 1]; };
  // <dh, h> for the gate of the chunk's one-segment map (kOrd: after dU and ud_terms)
  auto dot_terms = [&] {
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < kDotVecs; ++i) {
      const int e = tid + i * kThreads, r = (8 * e) / D, c = (8 * e) % D;
      const uint4 x = *reinterpret_cast<const uint4*>(sm.s + r * LD + c);
      const uint32_t xs[4] = {x.x, x.y, x.z, x.w}, ys[4] = {hv[i].x, hv[i].y, hv[i].z, hv[i].w};
#pragma unroll
      for (int m = 0; m < 4; ++m) {
        const float2 f = unpack2<T>(xs[m]), g = unpack2<T>(ys[m]);
        part += f.x * g.x + f.y * g.y;
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
    if constexpr (kOrd) {
      if (lane == 0) sm.wsum[8 + warp] = part;
    } else if (lane == 0) {
      atomicAdd(&sm.dot, part);
    }
  };
  if constexpr (!kOrd) dot_terms();
  {  // dU = diag(d) K dh - r (rows y of this warp); dG_y -= d_y (K dh)_y . U_y, dG_last += the same
    float acc[NH][4];
    zero(acc);
    mma_acc<T, NH, false, false>(acc, sm.k, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
    float cu[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < NH; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = m0 + (lane >> 2) + 8 * hf, col = n0 + 8 * j + 2 * (lane & 3);
        const float2 uu = unpack2<T>(load_u32(sm.u + y * LD + col));
        cu[hf] += acc[j][2 * hf] * uu.x + acc[j][2 * hf + 1] * uu.y;
      }
    [[maybe_unused]] float cs[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int y = m0 + (lane >> 2) + 8 * hf;
      const float d = sof(y) == sL ? bwd_exp(GL - Gof(y)) : 0.f;
      const float c = d * row_sum(cu[hf]);
      if constexpr (kOrd) {
        cs[hf] = c;
      } else if ((lane & 3) == 0) {
        atomicAdd(sm.dG() + y, -c);
        atomicAdd(sm.dG() + CH - 1, c);
      }
      // r and dU share the tile: each lane reads and writes only its own fragment's places
#pragma unroll
      for (int j = 0; j < NH; ++j) {
        T* at_x = sm.x + y * LD + n0 + 8 * j + 2 * (lane & 3);
        const float2 rr = unpack2<T>(load_u32(at_x));
        store_u32(at_x, pack2<T>(d * acc[j][2 * hf] - rr.x, d * acc[j][2 * hf + 1] - rr.y));
      }
    }
    if constexpr (kOrd) {  // lanes q = 0, 1 store their rows' -c (dG's first sums), lane 0 the warp's total
      const float total = col_sum(cs[0] + cs[1]);
      if ((lane & 3) < 2) *own() = (lane & 1) ? -cs[1] : -cs[0];
      if (lane == 0) sm.wsum[warp] = total;
    }
  }
  // early: diag(d) U dh^T (dk's first term) now, while dh is in its tile
  [[maybe_unused]] float ud[NH][4];
  if constexpr (kEarly) ud_terms(ud, sm, GL, sL, m0, n0, lane);
  if constexpr (kOrd) dot_terms();
  cp_async_wait_all();
  if constexpr (kTma) mbar_wait(&bars[1], 0);  // T and v
  __syncthreads();
  if constexpr (kOrd) {  // every warp has read dh: h takes its tile, from the registers
#pragma unroll
    for (int i = 0; i < kDotVecs; ++i) {
      const int e = tid + i * kThreads;
      *reinterpret_cast<uint4*>(sm.s + ((8 * e) / D) * LD + (8 * e) % D) = hv[i];
    }
  } else if constexpr (kEarly) {  // every warp has read dh: h takes its tile
    const T* st = static_cast<const T*>(a.states) + at;
#pragma unroll
    for (int r = 0; r < D; r += CH) load_tile<T, D, kThreads>(sm.s + r * LD, st + r * D, D, CH, D, tid);
    cp_async_commit();
  }
  {  // dB = T^T dU; dv = diag(beta) dB; dbeta_y += dB_y . v_y; dB out through dq's rows
    float acc[NH][4];
    zero(acc);
    // T^T[y][x] = T[x][y], zero for x < y: blocks mw..3
    mma_acc<T, NH, true, false>(acc, sm.tt, kLdP, sm.x, LD, m0, n0, mw, CH / 16, NH / 2, lane);
    T* dvrow = static_cast<T*>(a.dv) + cp.b * a.dvsb + cp.t0 * a.dvst + cp.h * a.dvsh;
    T *dvat[2], *dqat[2];
    out_rows(dvat, dvrow, a.dvst, m0, n0, lane);
    out_rows(dqat, dqrow, a.dqst, m0, n0, lane);
    float dbv[2] = {0.f, 0.f};
    if constexpr (kOrd) {
      // v's pairs and beta read before the first store (in the loop below each store is
      // a branch of its own, and every load after it waits ~30 cycles: 9.5 % of the
      // kernel's stall samples on the H200); the same products, sums and stores
      uint32_t vw[2][NH];
      float bb[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = m0 + (lane >> 2) + 8 * hf;
        bb[hf] = sm.bt[y];
#pragma unroll
        for (int j = 0; j < NH; ++j) vw[hf][j] = load_u32(sm.vq + y * LD + n0 + 8 * j + 2 * (lane & 3));
      }
#pragma unroll
      for (int j = 0; j < NH; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
          if (m0 + (lane >> 2) + 8 * hf < cp.nvalid) {
            const float2 vv = unpack2<T>(vw[hf][j]);
            dbv[hf] += acc[j][2 * hf] * vv.x + acc[j][2 * hf + 1] * vv.y;
          }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        if (m0 + (lane >> 2) + 8 * hf < cp.nvalid)
#pragma unroll
          for (int j = 0; j < NH; ++j)
            store_u32(dvat[hf] + 8 * j, pack2<T>(bb[hf] * acc[j][2 * hf], bb[hf] * acc[j][2 * hf + 1]));
    } else {
#pragma unroll
      for (int j = 0; j < NH; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int y = m0 + (lane >> 2) + 8 * hf, col = n0 + 8 * j + 2 * (lane & 3);
          if (y < cp.nvalid) {
            const float2 vv = unpack2<T>(load_u32(sm.vq + y * LD + col));
            dbv[hf] += acc[j][2 * hf] * vv.x + acc[j][2 * hf + 1] * vv.y;
            const float b = sm.bt[y];
            store_u32(dvat[hf] + 8 * j, pack2<T>(b * acc[j][2 * hf], b * acc[j][2 * hf + 1]));
            if constexpr (!kEarly) store_u32(dqat[hf] + 8 * j, pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]));
          }
        }
    }
    if constexpr (kOrd) {
      own_rows<false, true, true>(own(), dbv, dbv, lane);  // dbeta's first sums
    } else {
      add_rows(sm.db(), dbv, m0, lane);
    }
    __syncthreads();  // every warp has read dU, T and v: q (early: dO) takes v's tile
    if constexpr (kTma) {
      if (tid == 0) tma_view_tile_after_reads<T, D>(maps, kMapDo, sm.vq, cp, &bars[0]);
    } else if constexpr (kEarly) {
      load_chunk_rows<T, D, kThreads>(sm.vq, a.dout, cp, tid);
    } else {
      load_chunk_rows<T, D, kThreads>(sm.vq, p.q, cp, tid);
    }
    cp_async_commit();
#pragma unroll
    for (int j = 0; j < NH; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = m0 + (lane >> 2) + 8 * hf, col = n0 + 8 * j + 2 * (lane & 3);
        store_u32(sm.x + y * LD + col, pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]));
      }
  }
  __syncthreads();
  [[maybe_unused]] float colv = 0.f;  // ordered: this lane's column sum of N, until M's
  {  // dL = -(dB U^T) (strict, same segment) and L = Gam o K K^T (without beta) on the same
     // fragments: dA = dL o beta_x Gam (into T's tile), dbeta_x += sum_y dL_xy L_xy,
     // N = beta_x dL o L: dG_x += sum_y N_xy, dG_y -= sum_x N_xy
    float acc[4][4], kk[4][4];
    zero(acc);
    zero(kk);
    mma_acc<T, 4, false, true>(acc, sm.x, LD, sm.u, LD, m0, c0, 0, D / 16, wp.tri, lane);
    mma_acc<T, 4, false, true>(kk, sm.k, LD, sm.k, LD, m0, c0, 0, D / 16, wp.tri, lane);
    float rowN[2] = {0.f, 0.f}, rowB[2] = {0.f, 0.f}, colN[4][2];
    float2 mx[2];
    float bxr[2];
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int x = m0 + (lane >> 2) + 8 * hf;
      mx[hf] = *reinterpret_cast<const float2*>(sm.meta + 2 * x);
      bxr[hf] = sm.bt[x];
    }
    // kOrd: the key columns' {G, s} pairs before dA's first store into T's tile (after
    // it each reload waits on the store: the compiler cannot tell the places apart)
    [[maybe_unused]] float4 myh[4];
    if constexpr (kOrd) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        myh[j] = *reinterpret_cast<const float4*>(sm.meta + 2 * (c0 + 8 * j + 2 * (lane & 3)));
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      colN[j][0] = colN[j][1] = 0.f;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = m0 + (lane >> 2) + 8 * hf, y0 = c0 + 8 * j + 2 * (lane & 3);
        const float bx = bxr[hf];
        const float4 my = kOrd ? myh[j] : *reinterpret_cast<const float4*>(sm.meta + 2 * y0);
        float dav[2];
#pragma unroll
        for (int par = 0; par < 2; ++par) {
          const int y = y0 + par, e = 2 * hf + par;
          const float Gx = mx[hf].x, sx = mx[hf].y;
          const float Gy = par ? my.z : my.x, sy = par ? my.w : my.y;
          const bool in = y < x && sx == sy;
          const float dec = in ? bwd_exp(Gx - Gy) : 0.f;
          const float dl = in ? -acc[j][e] : 0.f;
          const float lr = dec * kk[j][e];
          rowB[hf] += dl * lr;
          const float n = bx * dl * lr;
          rowN[hf] += n;
          colN[j][par] += n;
          dav[par] = dl * bx * dec;
        }
        store_u32(sm.tt + x * kLdP + y0, pack2<T>(dav[0], dav[1]));
      }
    }
    if constexpr (kOrd) {
      own_rows<true, true>(own(), rowN, rowB, lane);
      colv = col_one(colN, lane);
    } else {
      add_rows(sm.dG(), rowN, m0, lane);
      add_rows(sm.db(), rowB, m0, lane);
      add_cols<true>(sm.dG(), colN, c0, lane);
    }
  }
  __syncthreads();  // every warp has read dB: dO takes its tile (early: dB stays)
  if constexpr (!kEarly) {
    load_chunk_rows<T, D, kThreads>(sm.x, a.dout, cp, tid);
    cp_async_commit();
  }
  // early: dk's first terms, rounded to 16 bits as the lean kernel's hand-over through
  // dk's rows rounds them (a packed pair a fragment place)
  [[maybe_unused]] uint32_t dk1[NH][2];
  {  // dk's first terms: diag(d) U dh^T + dA K + dA^T K (out through dk's rows)
    T* dkat[2];
    out_rows(dkat, dkrow, a.dkst, m0, n0, lane);
    float acc[NH][4];
    if constexpr (kEarly) {
#pragma unroll
      for (int j = 0; j < NH; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[j][e] = ud[j][e];
    } else {
      ud_terms(acc, sm, GL, sL, m0, n0, lane);
    }
    mma_acc<T, NH, false, false>(acc, sm.tt, kLdP, sm.k, LD, m0, n0, 0, mw + 1, NH / 2, lane);
    mma_acc<T, NH, true, false>(acc, sm.tt, kLdP, sm.k, LD, m0, n0, mw, CH / 16, NH / 2, lane);
#pragma unroll
    for (int j = 0; j < NH; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = m0 + (lane >> 2) + 8 * hf;
        if constexpr (kEarly) {
          dk1[j][hf] = pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]);
        } else if (x < cp.nvalid) {
          store_u32(dkat[hf] + 8 * j, pack2<T>(acc[j][2 * hf], acc[j][2 * hf + 1]));
        }
      }
  }
  // early: dO and h, this thread's copies (the barrier shows all of them)
  if constexpr (kEarly) cp_async_wait_all();
  if constexpr (kTma) mbar_wait(&bars[0], 1);  // dO
  __syncthreads();  // every warp has read dh and dA: h takes dh's tile (dP will take dA's)
  if constexpr (!kEarly) {
    const T* st = static_cast<const T*>(a.states) + at;
#pragma unroll
    for (int r = 0; r < D; r += CH) load_tile<T, D, kThreads>(sm.s + r * LD, st + r * D, D, CH, D, tid);
    cp_async_commit();
  }

  // ---- keys phase
  if constexpr (kEarly) {
    // dO is in v's tile, dB in its own, dk's first terms in dk1, h in dh's.
    // dP = scale Gam o dO U^T while U is still in its tile; pe keeps dP in fp32 (0 off
    // the mask) for the gate terms with P once q is in
    float pe[4][4];
    {
      float ee[4][4];
      zero(ee);
      mma_acc<T, 4, false, true>(ee, sm.vq, LD, sm.u, LD, m0, c0, 0, D / 16, wp.tri, lane);
      float2 mx[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
        mx[hf] = *reinterpret_cast<const float2*>(sm.meta + 2 * (m0 + (lane >> 2) + 8 * hf));
      [[maybe_unused]] float4 myh[4];  // kOrd: as in dA's epilogue, before dP's first store
      if constexpr (kOrd) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          myh[j] = *reinterpret_cast<const float4*>(sm.meta + 2 * (c0 + 8 * j + 2 * (lane & 3)));
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = m0 + (lane >> 2) + 8 * hf, y0 = c0 + 8 * j + 2 * (lane & 3);
          const float4 my = kOrd ? myh[j] : *reinterpret_cast<const float4*>(sm.meta + 2 * y0);
#pragma unroll
          for (int par = 0; par < 2; ++par) {
            const int y = y0 + par, e = 2 * hf + par;
            const float Gy = par ? my.z : my.x, sy = par ? my.w : my.y;
            const float dec = (y <= x && mx[hf].y == sy) ? bwd_exp(mx[hf].x - Gy) : 0.f;
            pe[j][e] = p.scale * dec * ee[j][e];
          }
          store_u32(sm.tt + x * kLdP + y0, pack2<T>(pe[j][2 * hf], pe[j][2 * hf + 1]));
        }
    }
    cp_async_wait_all();  // (h: already in)
    __syncthreads();      // every warp has read U and written dP; h is in: q takes U's tile
    if constexpr (kTma) {
      if (tid == 0) tma_view_tile_after_reads<T, D>(maps, kMapQ, sm.u, cp, &bars[1]);
    } else {
      load_chunk_rows<T, D, kThreads>(sm.u, p.q, cp, tid);
    }
    cp_async_commit();
    T* dkat[2];
    out_rows(dkat, dkrow, a.dkst, m0, n0, lane);
    float dk[NH][4];
    {  // dk = (the first terms) - diag(beta) Z, Z = diag(ent) dB S0^T, while q lands;
       // dG_x -= beta_x k_x . Z_x, dbeta_x -= k_x . Z_x
      float kz[2] = {0.f, 0.f};
      zero(dk);
      mma_acc<T, NH, false, true>(dk, sm.x, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = m0 + (lane >> 2) + 8 * hf;
        const float ent = sof(x) == 0.f ? bwd_exp(Gof(x)) : 0.f;
        const float bx = sm.bt[x];
#pragma unroll
        for (int j = 0; j < NH; ++j) {
          const int col = n0 + 8 * j + 2 * (lane & 3);
          const float2 kx = unpack2<T>(load_u32(sm.k + x * LD + col));
          const float2 k1 = unpack2<T>(dk1[j][hf]);
          const float z0 = ent * dk[j][2 * hf], z1 = ent * dk[j][2 * hf + 1];
          kz[hf] += z0 * kx.x + z1 * kx.y;
          dk[j][2 * hf] = k1.x - bx * z0;
          dk[j][2 * hf + 1] = k1.y - bx * z1;
        }
      }
      float kzb[2], kzm[2];
      kz_terms<T, D, kOrd>(sm, kz, kzb, kzm, m0, lane, own());
    }
    cp_async_wait_all();  // q
    if constexpr (kTma) mbar_wait(&bars[1], 1);
    __syncthreads();
    // dk += dP^T Q (dP[x][y] is zero for x < y: row blocks mw..3)
    mma_acc<T, NH, true, false>(dk, sm.tt, kLdP, sm.u, LD, m0, n0, mw, CH / 16, NH / 2, lane);
    store_rows(dkat, dk, m0, cp.nvalid, lane);
    {  // P = scale Gam o Q K^T (registers only); M = P o (dO U^T) = (Q K^T) o pe:
       // dG_x += sum_y M_xy, dG_y -= sum_x M_xy
      float sq[4][4];
      zero(sq);
      mma_acc<T, 4, false, true>(sq, sm.u, LD, sm.k, LD, m0, c0, 0, D / 16, wp.tri, lane);
      float rowM[2] = {0.f, 0.f}, colM[4][2];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        colM[j][0] = colM[j][1] = 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf)
#pragma unroll
          for (int par = 0; par < 2; ++par) {
            const float m = sq[j][2 * hf + par] * pe[j][2 * hf + par];
            rowM[hf] += m;
            colM[j][par] += m;
          }
      }
      if constexpr (kOrd) {  // dB's tile is free (every warp has formed Z): N's and M's column sums there
        own_rows<true, false>(own(), rowM, rowM, lane);
        reinterpret_cast<float*>(sm.x)[mw * CH + c0 + col_of(lane)] = -(colv + col_one(colM, lane));
      } else {
        add_rows(sm.dG(), rowM, m0, lane);
        add_cols<true>(sm.dG(), colM, c0, lane);
      }
    }
    {  // dq, written once
      float dq[NH][4], qd[2];
      dq_terms<T, D, kOrd>(dq, qd, sm, sm.vq, sm.u, p, m0, n0, mw, lane, own());
      T* dqat[2];
      out_rows(dqat, dqrow, a.dqst, m0, n0, lane);
      store_rows(dqat, dq, m0, cp.nvalid, lane);
    }
  } else {
    cp_async_wait_group1();  // q and dO
    __syncthreads();
    {  // P = scale Gam o Q K^T (registers only), dP = scale Gam o dO U^T; the gate terms of
       // M = P o (dO U^T): dG_x += sum_y M_xy, dG_y -= sum_x M_xy
      float sq[4][4], ee[4][4];
      zero(sq);
      zero(ee);
      mma_acc<T, 4, false, true>(sq, sm.vq, LD, sm.k, LD, m0, c0, 0, D / 16, wp.tri, lane);
      mma_acc<T, 4, false, true>(ee, sm.x, LD, sm.u, LD, m0, c0, 0, D / 16, wp.tri, lane);
      float rowM[2] = {0.f, 0.f}, colM[4][2];
      float2 mx[2];
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) mx[hf] = *reinterpret_cast<const float2*>(sm.meta + 2 * (m0 + (lane >> 2) + 8 * hf));
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        colM[j][0] = colM[j][1] = 0.f;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int x = m0 + (lane >> 2) + 8 * hf, y0 = c0 + 8 * j + 2 * (lane & 3);
          const float4 my = *reinterpret_cast<const float4*>(sm.meta + 2 * y0);
          float dv[2];
#pragma unroll
          for (int par = 0; par < 2; ++par) {
            const int y = y0 + par, e = 2 * hf + par;
            const float Gx = mx[hf].x, sx = mx[hf].y;
            const float Gy = par ? my.z : my.x, sy = par ? my.w : my.y;
            const float dec = (y <= x && sx == sy) ? bwd_exp(Gx - Gy) : 0.f;
            dv[par] = p.scale * dec * ee[j][e];
            const float m = p.scale * dec * sq[j][e] * ee[j][e];
            rowM[hf] += m;
            colM[j][par] += m;
          }
          store_u32(sm.tt + x * kLdP + y0, pack2<T>(dv[0], dv[1]));
        }
      }
      add_rows(sm.dG(), rowM, m0, lane);
      add_cols<true>(sm.dG(), colM, c0, lane);
    }
    __syncthreads();  // every warp has read U: dB comes back from dq's rows into its tile
    load_tile<T, D, kThreads>(sm.u, dqrow, a.dqst, cp.nvalid, D, tid);
    cp_async_commit();
    cp_async_wait_group1();  // h
    __syncthreads();
    float dq[NH][4];
    {
      float qd[2];
      dq_terms(dq, qd, sm, sm.x, sm.vq, p, m0, n0, mw, lane);
    }
    cp_async_wait_all();
    __syncthreads();  // dB has left dq's rows (every thread's copies are done): dq may be written
    T* dqat[2];
    out_rows(dqat, dqrow, a.dqst, m0, n0, lane);
    store_rows(dqat, dq, m0, cp.nvalid, lane);
    {  // dk = (the first terms) - diag(beta) Z + dP^T Q, Z = diag(ent) dB S0^T;
       // dG_x -= beta_x k_x . Z_x, dbeta_x -= k_x . Z_x
      T* dkat[2];
      out_rows(dkat, dkrow, a.dkst, m0, n0, lane);
      float kz[2] = {0.f, 0.f};
      float acc[NH][4];
      zero(acc);
      mma_acc<T, NH, false, true>(acc, sm.u, LD, sm.s, LD, m0, n0, 0, D / 16, NH / 2, lane);
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = m0 + (lane >> 2) + 8 * hf;
        const float ent = sof(x) == 0.f ? bwd_exp(Gof(x)) : 0.f;
        const float bx = sm.bt[x];
        const bool valid = x < cp.nvalid;
#pragma unroll
        for (int j = 0; j < NH; ++j) {
          const int col = n0 + 8 * j + 2 * (lane & 3);
          const float2 kx = unpack2<T>(load_u32(sm.k + x * LD + col));
          // this lane wrote these dk places in the values phase
          const float2 k1 = valid ? unpack2<T>(load_u32(dkat[hf] + 8 * j)) : make_float2(0.f, 0.f);
          const float z0 = ent * acc[j][2 * hf], z1 = ent * acc[j][2 * hf + 1];
          kz[hf] += z0 * kx.x + z1 * kx.y;
          acc[j][2 * hf] = k1.x - bx * z0;
          acc[j][2 * hf + 1] = k1.y - bx * z1;
        }
      }
      mma_acc<T, NH, true, false>(acc, sm.tt, kLdP, sm.vq, LD, m0, n0, mw, CH / 16, NH / 2, lane);
      store_rows(dkat, acc, m0, cp.nvalid, lane);
      float kzb[2], kzm[2];
      kz_terms(sm, kz, kzb, kzm, m0, lane);
    }
  }
  __syncthreads();
  if (warp == 0) {  // dg: G's gradient summed backwards inside each segment (0 at its first token)
    // A segmented suffix scan, lane l holding tokens 2 l and 2 l + 1: a run restarts at the
    // chunk's last token and at each segment's last.
    const float eL = sL == 0.f ? bwd_exp(GL) : 0.f;
    const int xa = 2 * lane, xb = xa + 1;
    float va, vb, dba = 0.f, dbb = 0.f;
    if constexpr (kOrd) {
      // the slots in one order: the two column halves' row sums, then the four row
      // blocks' column sums
      auto two = [&](const float* s) { return *reinterpret_cast<const float2*>(s + xa); };
      const float* cs = reinterpret_cast<const float*>(sm.x);
      const float2 g0 = two(sm.rsum[0][0]), g1 = two(sm.rsum[1][0]), b0 = two(sm.rsum[0][1]), b1 = two(sm.rsum[1][1]);
      const float2 k0 = two(cs), k1 = two(cs + CH), k2 = two(cs + 2 * CH), k3 = two(cs + 3 * CH);
      va = (g0.x + g1.x) + ((k0.x + k1.x) + (k2.x + k3.x));
      vb = (g0.y + g1.y) + ((k0.y + k1.y) + (k2.y + k3.y));
      dba = b0.x + b1.x;
      dbb = b0.y + b1.y;
      if (xb == CH - 1) {  // the warps' dU totals and <dh, h> shares, warp 0 first
        float tot = 0.f, dot = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          tot += sm.wsum[w];
          dot += sm.wsum[8 + w];
        }
        vb += tot + eL * dot;
      }
    } else {
      va = sm.dG()[xa];
      vb = sm.dG()[xb] + (xb == CH - 1 ? eL * sm.dot : 0.f);
    }
    const bool fa = sof(xa) != sof(xb), fb = xb == CH - 1 || sof(xb + 1) != sof(xb);
    float run = va + (fa ? 0.f : vb);  // token xa's run over this lane's tokens
    bool cut = fa || fb;               // whether a run restarts inside them
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float r2 = __shfl_down_sync(0xffffffffu, run, o);
      const bool c2 = __shfl_down_sync(0xffffffffu, static_cast<int>(cut), o) != 0;
      if (lane + o < 32) {
        if (!cut) run += r2;
        cut = cut || c2;
      }
    }
    float in = __shfl_down_sync(0xffffffffu, run, 1);  // lanes l + 1..31, token xb + 1 onward
    if (lane == 31) in = 0.f;
    const float rb = vb + (fb ? 0.f : in), ra = va + (fa ? 0.f : rb);
    const bool first_a = xa == 0 ? sof(0) != 0.f : sof(xa) != sof(xa - 1), first_b = fa;
    const float outs[2] = {first_a ? 0.f : ra, first_b ? 0.f : rb};
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int x = xa + i;
      if (x < cp.nvalid) {
        const int64_t bth = (cp.b * p.seqlen + cp.t0 + x) * p.heads + cp.h;
        if (a.dg != nullptr) a.dg[bth] = outs[i];
        if (a.dbeta != nullptr) a.dbeta[bth] = kOrd ? (i == 0 ? dba : dbb) : sm.db()[x];
      }
    }
  }
}

template <typename T, int D, bool kEarly, bool kOrd>
__global__ void __launch_bounds__(kThreads, 2) chunk_bwd_kernel(Problem p, ChunkBackwardArgs a) {
  chunk_bwd_body<T, D, kEarly, kOrd, false>(p, a, nullptr);
}
// The ordered form with the tensor-map copies (kTma above); maps built per launch on the
// host.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2)
    chunk_bwd_kernel_tma(Problem p, ChunkBackwardArgs a, const __grid_constant__ BwdMaps maps) {
  chunk_bwd_body<T, D, true, true, true>(p, a, &maps);
}

constexpr const char* kWho = "lasp2 (CUDA delta rule, chunked backward)";

void check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

}  // namespace

int chunk_backward_smem_bytes(int d) {
  return d == 64 ? static_cast<int>(sizeof(BwdSmem<__nv_bfloat16, 64>))
                 : static_cast<int>(sizeof(BwdSmem<__nv_bfloat16, 128>));
}

// Which chunk backward runs (LASP2_DELTA_CHUNK_BWD_KERNEL, read at every launch so that
// the tests can switch it): ordered (the production form since session 17: dg and dbeta
// summed in a fixed order, the same bits from run to run; session 16's sums form, the same
// products with those sums in shared-memory atomics, measured 4 % slower and
// nondeterministic, removed), early or lean (test references only: EarlyEqualsLean holds
// ordered and early to lean, dq / dk / dv bit for bit).
enum class BwdForm { kLean, kEarly, kOrdered };
BwdForm chunk_backward_form() {
  constexpr BwdForm kNamed[] = {BwdForm::kOrdered, BwdForm::kEarly, BwdForm::kLean};
  return kNamed[env_choice("LASP2_DELTA_CHUNK_BWD_KERNEL", {"ordered", "early", "lean"}, 0)];
}

// The ordered form with the tensor-map copies where it can run (sm_90 code on
// an sm_90 device, every map encodable); false (nothing launched) otherwise.
template <typename T, int D>
bool launch_chunk_backward_tma(const Problem& p, const ChunkBackwardArgs& a, cudaStream_t s) {
  const int bytes = static_cast<int>(kBarOff<T, D>) + 16;  // + the two barriers
  return launch_grad_kernel_tma<T, D, BwdMaps, kThreads>(
      chunk_bwd_kernel_tma<T, D>, p, a, bytes, kWho, "chunk backward attributes", s,
      [&](ChunkGradMaps<T, BwdMaps>& e, int64_t nck, int64_t npad) {
        return e.template tokens<D>(kMapK, p.k) &&
               e.template tokens<D>(kMapV, p.v) &&
               e.template tokens<D>(kMapQ, p.q) &&
               e.template tokens<D>(kMapDo, a.dout) &&
               e.template scratch<D>(kMapDh, a.dh, nck * D, D) &&
               e.template scratch<D>(kMapR, a.r, npad, D) &&
               e.template scratch<D>(kMapVnew, a.v_new, npad, D) &&
               e.template scratch<CH>(kMapT, a.t, npad, CH);
      });
}

void launch_chunk_backward(const Problem& p, const ChunkBackwardArgs& a, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  const BwdForm form = chunk_backward_form();
  auto go = [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    // ordered: tensor-map copies unless LASP2_CUDA_TILE_COPY=cp_async or they cannot run
    const bool maps = !lasp2::cuda::tile_copy_forced_cp_async();
    if (maps && form == BwdForm::kOrdered && launch_chunk_backward_tma<T, D>(p, a, s)) return;
    const int bytes = static_cast<int>(sizeof(BwdSmem<T, D>));
    auto kernel = form == BwdForm::kOrdered ? chunk_bwd_kernel<T, D, true, true>
                  : form == BwdForm::kEarly ? chunk_bwd_kernel<T, D, true, false>
                                            : chunk_bwd_kernel<T, D, false, false>;
    chunk_allow_max_shared(kernel, bytes, kWho, "chunk backward attributes");
    kernel<<<dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())), kThreads, bytes, s>>>(p, a);
  };
  chunk_dispatch<true>(p, kWho, go);
  check(cudaGetLastError(), "chunk backward kernel");
}

}  // namespace lasp2::delta::gpu
