// Tensor-core dk/dv/dg pass (bf16/fp16 inputs, fp32 accumulation): one block per
// (b, h, segment) of NW = D/(8 RM) warps, walking the segment's chunks in REVERSE
// with the state gradient dS (dk x dv, fp32; the gradient of the state leaving the
// chunk) in mma accumulators. Warp w = (r, hc), r = w % (D/(16 RM)),
// hc = w / (D/(16 RM)), owns dS rows [16 RM r, +16 RM) (dk dims) x columns
// [hc D/2, +D/2) (dv dims). RM = m16 row tiles per warp:
//   RM = 1 at D = 64 (8 warps): 16 rows per warp;
//   RM = 2 at D = 128 (8 warps, 256 threads, up to 255 registers): each B fragment
//     read from shared memory (the v, k, dO tiles, P1, P2) feeds two m16 tiles, so
//     the row groups read them half as often as 16 warps of 16 rows (sessions 4-11,
//     512 threads; docs/history/kernels-log.md, session 12: ldmatrix per chunk and SM 1,664 ->
//     1,136, 977 -> 940 us at 64K tokens on an H200). The score tile's blocks are
//     spread over the four schedulers (tc_scores' Spread) and warps 6 and 7, which
//     then have none, compute the entry/exit weights.
// Session 13 (docs/history/kernels-log.md: 935 -> 821 us at 64K tokens, the same bits):
//   * no causal test inside an unrolled loop: the score tile's k loop
//     (tc_scores_split) and the causal products of C (specialized on hc) are straight
//     blocks, so ptxas loads the next step's fragments while this step's mma run (a
//     test per step made each step its own basic block, waiting for its ldmatrix);
//   * the k.dk partials of all RM x 4 n8 tiles reduced over a column's 8 lanes in one
//     exchange (xchg_step: 14 shuffles instead of 48 at RM = 2, the same pairs summed
//     in the same order as the per-tile butterfly);
//   * the dg warp (kDgWarp) is one without a score block (warp 7 at D = 128, 4 at
//     D = 64), not warp 0, whose scheduler also runs 3 of the 10 score blocks.
// Session 14 (docs/history/kernels-log.md; measured, then removed): the dk / dv stores through one
// 64-bit row pointer per token tile without a test per store, an exact 2-instruction bf16
// unpack and the dS tile written by stmatrix executed 13-15% fewer instructions and ran
// 0.6% slower (822.8 -> 827.5 / 828.3 us at 64K tokens on an H200): the chunk step is
// bound by the latency of its shared-memory loads and by the L1 pipe, not by issue.
// Every output element is computed with the same operations in the same order as by
// the 16-row warps it replaced (the same bits; compared on an H200 before their
// removal). Below, "rows [16r, +16)" means the warp's 16 RM rows. Per chunk:
//   A. P1 = scale W o (q k^T), P2 = scale W o (dO v^T) -> shared memory (16-bit),
//      the weights W computed once for both; every warp writes its part of dS
//      (16-bit) to shared memory; entry/exit weights.
//   C. warp (r, hc), for the token blocks {hc, 3 - hc} (balanced causal work):
//              dk^T rows [16r, +16) = dS v^T diag(w_exit) + q^T P2   (dS from smem)
//              dv^T rows [16r, +16) = dS^T k^T diag(w_exit) + dO^T P1 (dS^T from smem)
//      then its part dS = exp(G_last) dS + scale q^T diag(w_entry) dO;
//      k . dk per token (fp32, before rounding) -> per-row-block partial sums.
//   warp kDgWarp: dg = reverse cumulative sum of (q.dq - k.dk) within the segment, for
//   chunk c after the next chunk's first barrier (which publishes the k.dk partials:
//   one block barrier per chunk fewer); chunk c's q.dq values wait in its registers.
// Tile copies (session 16): by default (sm_90 code on an sm_90 device, views a tensor map
// can describe) one thread fetches the next chunk's q, k, v, dO tiles by tensor-map copies
// right after the loop-top barrier, counted on a per-stage mbarrier (kTma; H200, 64K
// tokens, H = 16, D = 128, bf16: 826.6 -> 812.7 us; graph fwd+bwd with tc_forward's
// tensor-map copies 1.98 -> 1.83 ms). Otherwise (sm_80, views a map cannot take,
// LASP2_CUDA_TILE_COPY=cp_async) every thread copies them by cp.async there (sessions
// 4-15): the same bits.
#include <atomic>
#include <type_traits>

#include "device_utils.cuh"
#include "env_knob.h"
#include "pdl.cuh"
#include "route.h"         // device_info: the opt-in shared memory of the staged stores
#include "tc_tile_map.cuh"  // the tensor maps (kTma); tma_copy.cuh's wrappers
#include "tc_tiles.cuh"

namespace lasp2::cuda {
namespace {

// One step of the exchange reduction of the k.dk partials (head comment): lanes paired
// across lane bit 2 + st; the lane with that bit set keeps values [HALF, 2 HALF) and
// sends [0, HALF), its partner the reverse; after it v[k] (k < HALF) holds the pair's sum. HALF is a
// template argument so that every index is a constant (with the loop bound computed
// from the step inside one loop, v went to local memory: a 64-byte stack frame).
template <int HALF, int N>
__device__ __forceinline__ void xchg_step(float (&v)[N], int lane, int st) {
  const bool up = ((lane >> (2 + st)) & 1) != 0;
#pragma unroll
  for (int k = 0; k < HALF; ++k) {
    const float send = up ? v[k] : v[k + HALF];
    const float keep = up ? v[k + HALF] : v[k];
    v[k] = keep + __shfl_xor_sync(0xffffffffu, send, 4 << st);
  }
}

// acc += dS B^T over all D dims (kTransposed: dS^T B^T), B's tokens the warp's token blocks
// tb: C's first product, dk's dS v^T and dv's dS^T k^T. The fragments a and bb are the
// caller's, declared where the loop had them: with them local here (earlier sessions' form;
// an inlined helper's arrays sit ahead of the kernel's own) the D = 64 kernels' registers
// were numbered apart. This form keeps the PTX as written out (session 22).
template <typename T, int D, int RM, bool kTransposed>
__device__ __forceinline__ void ds_product(float (&acc)[RM][4][4], uint32_t (&a)[RM][4], uint32_t (&bb)[2][4],
                                           const T* Dsm, const T* B, int r, const int (&tb)[2], int lane) {
  constexpr int LD = TcTile<D>::LD;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int m = 0; m < RM; ++m) {
      if constexpr (kTransposed)
        ldsm_x4_t(a[m], Dsm + frag_a_colmajor(lane, 16 * (RM * r + m), 16 * kk, LD));
      else
        ldsm_x4(a[m], Dsm + frag_a_rowmajor(lane, 16 * (RM * r + m), 16 * kk, LD));
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) ldsm_x4(bb[i], B + frag_b_nk(lane, 16 * kk, 16 * tb[i], LD));
#pragma unroll
    for (int m = 0; m < RM; ++m)
#pragma unroll
      for (int i = 0; i < 2; ++i) {
        mma16816<T>(acc[m][2 * i], a[m], bb[i][0], bb[i][1]);
        mma16816<T>(acc[m][2 * i + 1], a[m], bb[i][2], bb[i][3]);
      }
  }
}

// C's first products (dk: dS v^T, dv: dS^T k^T), each token column scaled by its exit
// weight: acc's n8 tile j holds tokens 16 tb[j / 2] + 8 (j % 2) + (0..7). One helper for
// both so that the two keep the same operations.
template <int RM>
__device__ __forceinline__ void scale_exit(float (&acc)[RM][4][4], const int (&tb)[2],
                                           const float* extw, int lane) {
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int y = 16 * tb[j >> 1] + 8 * (j & 1) + 2 * (lane & 3);
    const float e0 = extw[y], e1 = extw[y + 1];
#pragma unroll
    for (int m = 0; m < RM; ++m) {
      acc[m][j][0] *= e0;
      acc[m][j][1] *= e1;
      acc[m][j][2] *= e0;
      acc[m][j][3] *= e1;
    }
  }
}

template <int D>
struct DkdvLayout {
  static constexpr int kTiles = 8 * TcTile<D>::kBytes;  // [2 stages][q, k, v, dO]
  static constexpr int kMeta = kTiles;                  // [2][128] floats
  static constexpr int kQdq = kMeta + 2 * 128 * 4;      // [2][64] floats
  static constexpr int kP1 = kQdq + 2 * 64 * 4;
  static constexpr int kP2 = kP1 + kPBytes;
  static constexpr int kDs = kP2 + kPBytes;             // [D][LD] 16-bit
  static constexpr int kW = kDs + D * TcTile<D>::LD * 2;
  static constexpr int kRed = kW + 2 * 64 * 4;
  static constexpr int kBytes = kRed + (D / 16) * 64 * 4;
  static constexpr int RM = D == 128 ? 2 : 1;  // m16 row tiles per warp (head comment)
  static constexpr int NW = D / 8 / RM;        // warps: 8 at both sizes
};

// The kTma kernel's argument: DkdvArgs plus the tensor maps of q, k, v, dO (their rows
// as [LD columns, past dk / dv zero][64 tokens] boxes: the padded tile layout, zero
// columns and rows past the part filled by the copy engine; tc_tile_map.cuh) and where
// each map put the h, t, b dimensions (1..3; the host orders them by stride).
struct DkdvTmaArgs : DkdvArgs {
  CUtensorMap map[4];
  int hdim[4], tdim[4], bdim[4];
};
// The staged-store kernel's argument (session 17, the default at D = 128): also
// the maps of dk_out (omap[0], dk columns) and dv_out (omap[1], dv columns), written in the
// same [64 tokens][LD] boxes from the staging tiles (the copy engine writes only the part's
// tokens and the view's dims).
struct DkdvTmaStoreArgs : DkdvTmaArgs {
  CUtensorMap omap[2];
  int ohdim[2], otdim[2], obdim[2];
};

// kTma (session 16; the same bits either way, only how the next chunk's tiles are copied
// differs): true (sm_90, P = DkdvTmaArgs): the four tiles as tensor-map copies issued by
// one thread after the loop-top barrier and counted on a per-stage mbarrier (meta and
// q.dq stay cp.async): no per-thread copy instructions for the tiles. false: every
// thread's cp.async there (sessions 4-15). The H200 profile of the cp.async kernel
// (docs/history/kernels-log.md, session 16) had 9.6% of the warps' samples in the copy burst, a third
// of them register-reuse waits behind its own LDGSTS; spreading the cp.async copies over
// the chunk's body (after the score tile, between the dk and dv products, before the dS
// update) measured slower and was removed.
// P = DkdvTmaStoreArgs (kStore; session 17, D = 128 only, the default where it fits):
// kTma with the chunk's dk and dv tiles staged in shared memory by stmatrix.trans (two
// [64][LD] tiles past the layout, 34,816 B: 231,440 B a block with the barriers, under the
// H200's 232,448) and written by one tensor-map store each, issued by the copy thread at the
// next chunk's loop-top barrier, instead of 16 movmatrix + 16 STG per thread and product
// (the H200 profile, docs/history/kernels-log.md session 16: dk partials + stores 10.4 %, dv stores
// 9.5 % of the warp-stall samples). Each dk / dv element is final in the one warp that
// computes it (the k loop covers all D; only the k.dk partials for dg are summed across
// warps), so the staged values are the stored ones: the same bits. The kernel keeps its
// template signature (the store is chosen by P) so that the default kernel's PTX and name
// stay as they were. D = 64 stays on the per-thread stores: the two staging tiles would
// take its block to 122,880 B, one block per SM instead of two.
template <typename T, int D, bool kTma = false, typename P = DkdvArgs>
__global__ void __launch_bounds__(32 * DkdvLayout<D>::NW, D == 128 ? 1 : 2)
    tc_dkdv_kernel(const __grid_constant__ P args) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  using L = DkdvLayout<D>;
  constexpr bool kStore = std::is_same_v<P, DkdvTmaStoreArgs>;
  static_assert(!kStore || (kTma && D == 128), "staged dk / dv stores: the D = 128 tensor-map kernel only");
  static_assert(!kStore || L::kBytes % 128 == 0, "staged dk / dv tiles: 128-byte aligned");
  constexpr int RM = L::RM;
  constexpr bool Spread = RM == 2;  // see the head comment
  constexpr int kDgWarp = Spread ? 7 : 4;  // writes dg: no score block (head comment)
  constexpr int NW = L::NW;
  constexpr int NR = D / 16 / RM;  // row groups of RM m16 tiles
  constexpr int HC = D / 2;        // dS columns per warp
  constexpr int NTHREADS = 32 * NW;
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem[];
  T* tiles = reinterpret_cast<T*>(smem);
  float* meta_s = reinterpret_cast<float*>(smem + L::kMeta);
  float* qdq_s = reinterpret_cast<float*>(smem + L::kQdq);
  T* P1s = reinterpret_cast<T*>(smem + L::kP1);
  T* P2s = reinterpret_cast<T*>(smem + L::kP2);
  T* Dsm = reinterpret_cast<T*>(smem + L::kDs);
  float* entw = reinterpret_cast<float*>(smem + L::kW);
  float* extw = entw + 64;
  float* red = reinterpret_cast<float*>(smem + L::kRed);

  const Geom& g = args.g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int r = warp % NR, hc = warp / NR;
  const SegmentBlock blk = segment_block(g);
  // the chunk range as locals: with blk's members in the walk, the staged-store kernel's
  // stage and barrier-phase arithmetic compiled to other PTX
  const int c_begin = blk.c_begin, c_end = blk.c_end;
  const int dk = args.dk, dv = args.dv;
  const bool has_dg = args.dg != nullptr;

  // Gradient of the state leaving the segment, [dk][dv]: rows [16 RM r, +16 RM)
  // (m16 tile m: row block RM r + m) x columns [hc D/2, +D/2).
  float Ds[RM][HC / 8][4];
  {
    const float* E = seg_state(args.dstate, blk.bh, blk.seg, args.dstate_bh, args.dstate_seg);
#pragma unroll
    for (int m = 0; m < RM; ++m) {
#pragma unroll
      for (int j = 0; j < HC / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = 16 * (RM * r + m) + (lane >> 2) + 8 * (e >> 1);
          const int jj = hc * HC + 8 * j + 2 * (lane & 3) + (e & 1);
          Ds[m][j][e] = (E != nullptr && i < dk && jj < dv) ? E[i * dv + jj] : 0.f;
        }
      }
    }
  }

  const T* q_b = head_base<T>(args.q, blk.b, blk.h, g.begin);
  const T* k_b = head_base<T>(args.k, blk.b, blk.h, g.begin);
  const T* v_b = head_base<T>(args.v, blk.b, blk.h, g.begin);
  const T* o_b = head_base<T>(args.dout, blk.b, blk.h, g.begin);
  T* dk_b = head_base<T>(args.dk_out, blk.b, blk.h, g.begin);
  T* dv_b = head_base<T>(args.dv_out, blk.b, blk.h, g.begin);
  const float* meta = head_meta(args.meta, g, blk.bh);
  auto tile = [&](int stage, int i) { return tiles + (stage * 4 + i) * kChunk * LD; };

  // chunk c's meta and q.dq (nvalid tokens from t0) into `stage` by cp.async (both copy
  // paths), not committed
  auto load_meta_at = [&](int c, int stage, int nvalid, int64_t t0) {
    if (tid < 32) cp_async16(meta_s + stage * 128 + tid * 4, meta + c * 128 + tid * 4, true);
    if (has_dg && tid < 64) {
      const bool valid = tid < nvalid;
      const float* src = args.qdq + bth(g, blk.b, g.begin + (valid ? t0 + tid : 0), blk.h);
      cp_async4(qdq_s + stage * 64 + tid, src, valid);
    }
  };
  // !kTma: chunk c's tiles, meta and q.dq by cp.async, committed
  auto load = [&](int c, int stage) {
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    load_tile<T, D, NTHREADS>(tile(stage, 0), q_b + t0 * args.q.st, args.q.st, nvalid, dk, tid);
    load_tile<T, D, NTHREADS>(tile(stage, 1), k_b + t0 * args.k.st, args.k.st, nvalid, dk, tid);
    load_tile<T, D, NTHREADS>(tile(stage, 2), v_b + t0 * args.v.st, args.v.st, nvalid, dv, tid);
    load_tile<T, D, NTHREADS>(tile(stage, 3), o_b + t0 * args.dout.st, args.dout.st, nvalid, dv,
                              tid);
    load_meta_at(c, stage, nvalid, t0);
    cp_async_commit();
  };
  // kTma: chunk c's meta and q.dq alone (the tiles come by tensor map), not committed
  auto load_meta = [&](int c, int stage) {
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    load_meta_at(c, stage, nvalid, t0);
  };

  // kTma: the four tiles of chunk c into `stage`, by one thread, counted on bars[stage]
  // (its one arrival with the bytes expected; every box counts its full 136 x 64
  // elements, the zero-filled ones too).
  // kStore: the staging tiles [dk, dv] at L::kBytes, the barriers after them
  T* const stg = reinterpret_cast<T*>(smem + L::kBytes);
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::kBytes + (kStore ? 2 * TcTile<D>::kBytes : 0));
  constexpr int kTmaThread = 32 * kDgWarp;
  // kStore: chunk c's staged dk and dv tiles, by the copy thread (whose bulk groups they are)
  auto store_tiles = [&](int c) {
    if constexpr (kStore) {
      for (int i = 0; i < 2; ++i)
        tile_map_store(&args.omap[i], args.ohdim[i], args.otdim[i], blk.h, c * kChunk, blk.b,
                       smem_u32(stg + i * kChunk * LD));
    }
  };
  auto issue_tiles = [&](int c, int stage) {
    if constexpr (kTma) {
      if (tid == kTmaThread) {
        using namespace lasp2::delta::gpu;
        mbar_arrive_expect_tx(&bars[stage], 4 * kChunk * LD * static_cast<int>(sizeof(T)));
        const int t = c * kChunk;
#pragma unroll
        for (int i = 0; i < 4; ++i)
          tile_map_box(smem_u32(tile(stage, i)), &args.map[i], args.hdim[i], args.tdim[i], blk.h, t, blk.b, &bars[stage]);
      }
    }
  };
  if constexpr (kTma) {
    if (tid == kTmaThread) lasp2::delta::gpu::init_ring_barriers<2>(bars);
    __syncthreads();
  }

  float carry = (has_dg && args.fold_offset && args.dg_offset != nullptr) ? args.dg_offset[blk.bh] : 0.f;
  // The warp has a row below dk (dv); its other m16 tiles (RM = 2, dims < D) compute
  // zeros: the rows of dS and of the q, k, v, dO tiles past the dims are zero, and
  // their stores are masked.
  const bool krows = 16 * RM * r < dk;
  const bool vrows = 16 * RM * r < dv;
  // This warp's two 16-token output blocks: {hc, 3 - hc} (equal causal work).
  const int tb[2] = {hc, 3 - hc};
  // warp kDgWarp: the chunk whose dg is still to be written (its q.dq per lane, tokens)
  float pend_qdq[2] = {0.f, 0.f};
  int pend_nvalid = 0;
  int64_t pend_t0 = 0;
  bool pending = false;
  auto finish_dg = [&]() {  // warp kDgWarp, after a barrier following the chunk's k.dk writes
    const int nact = (dk + 15) / 16;
    float v[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int y = 2 * lane + e;
      float kd = 0.f;
      for (int w = 0; w < nact; ++w) kd += red[w * 64 + y];
      v[e] = y < pend_nvalid ? pend_qdq[e] - kd : 0.f;
    }
    float s = v[0] + v[1];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float t = __shfl_down_sync(0xffffffffu, s, o);
      if (lane + o < 32) s += t;
    }
    const float total = __shfl_sync(0xffffffffu, s, 0);
    if (2 * lane < pend_nvalid) args.dg[bth(g, blk.b, g.begin + pend_t0 + 2 * lane, blk.h)] = carry + s;
    if (2 * lane + 1 < pend_nvalid)
      args.dg[bth(g, blk.b, g.begin + pend_t0 + 2 * lane + 1, blk.h)] = carry + s - v[0];
    carry += total;
  };

  if constexpr (kTma) {
    if (c_begin < c_end) {
      issue_tiles(c_end - 1, 0);
      load_meta(c_end - 1, 0);
      cp_async_commit();
    }
  } else {
    if (c_begin < c_end) load(c_end - 1, 0);
  }
  for (int c = c_end - 1; c >= c_begin; --c) {
    const int stage = (c_end - 1 - c) & 1;
    cp_async_wait_all();
    if constexpr (kTma) {
      // stage's fill k (chunks 2k + stage of the walk) completes the barrier's phase k
      lasp2::delta::gpu::mbar_wait(&bars[stage], ((c_end - 1 - c) >> 1) & 1);
    }
    __syncthreads();
    if constexpr (kStore) {
      // the previous (later) chunk's staged dk and dv (their stmatrix and proxy fences before
      // the barrier above)
      if (tid == kTmaThread && c < c_end - 1) store_tiles(c + 1);
    }
    if (has_dg && warp == kDgWarp && pending) finish_dg();  // the previous (later) chunk
    const bool next = c - 1 >= c_begin;  // block-uniform
    if constexpr (kTma) {
      if (next) {
        // the stage's last (generic-proxy) reads were in the previous chunk, before the
        // barrier above; order them before the copy engine's writes
        if (tid == kTmaThread) lasp2::delta::gpu::fence_proxy_async_shared();
        issue_tiles(c - 1, stage ^ 1);
        load_meta(c - 1, stage ^ 1);
      }
      cp_async_commit();
    } else if (next) {
      load(c - 1, stage ^ 1);
    }
    const T* Qs = tile(stage, 0);
    const T* Ks = tile(stage, 1);
    const T* Vs = tile(stage, 2);
    const T* Os = tile(stage, 3);
    const float* ms = meta_s + stage * 128;
    const float Gl = ms[126], sl = ms[127];
    const float through = sl == 0.f ? __expf(Gl) : 0.f;
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    const bool full = nvalid == kChunk && dk == D && dv == D;  // block-uniform

    // ---- A -----------------------------------------------------------------------
    const int wt = Spread ? tid - (NTHREADS - 64) : tid;  // the weights' threads
    if (wt >= 0 && wt < 64) {
      const float G = ms[2 * wt], s = ms[2 * wt + 1];
      entw[wt] = s == 0.f ? args.scale * __expf(G) : 0.f;
      extw[wt] = s == sl ? __expf(Gl - G) : 0.f;
    }
    {
      const T* const as[2] = {Qs, Os};
      const T* const bs[2] = {Ks, Vs};
      T* const ps[2] = {P1s, P2s};
      tc_scores_split<T, D, NW, 2, Spread>(as, bs, ms, args.scale, ps, warp, lane);
    }
    if (has_dg && warp == kDgWarp) {  // this chunk's q.dq, before its stage is refilled
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int y = 2 * lane + e;
        pend_qdq[e] = y < nvalid ? qdq_s[stage * 64 + y] : 0.f;
      }
      pend_nvalid = nvalid;
      pend_t0 = t0;
      pending = true;
    }
    if constexpr (kStore) {
      // C rewrites the staging tiles: the stores issued at this chunk's top have read them
      if (tid == kTmaThread) bulk_store_wait<0, true>();
    }
    {  // every warp writes its part (zeros past dk): the products may read all D rows
#pragma unroll
      for (int m = 0; m < RM; ++m) {
#pragma unroll
        for (int j = 0; j < HC / 8; ++j) {
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const int i = 16 * (RM * r + m) + (lane >> 2) + 8 * hf;
            const int jj = hc * HC + 8 * j + 2 * (lane & 3);
            *reinterpret_cast<uint32_t*>(Dsm + i * LD + jj) =
                pack2<T>(Ds[m][j][2 * hf], Ds[m][j][2 * hf + 1]);
          }
        }
      }
    }
    __syncthreads();

    // ---- C -----------------------------------------------------------------------
    uint32_t qf[RM][4][4];
#pragma unroll
    for (int m = 0; m < RM; ++m)
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        ldsm_x4_t(qf[m][kk], Qs + frag_a_colmajor(lane, 16 * (RM * r + m), 16 * kk, LD));
    if (krows) {
      // dk^T rows [16r, +16), token blocks tb: dS v^T (exit-weighted) + q^T P2
      float acc[RM][4][4];  // n8 tiles: 2i + t = tokens 16 tb[i] + 8t + (0..7)
      uint32_t a[RM][4], bb[2][4];  // ds_product's fragments (see there why here)
      tc_zero(acc);
      ds_product<T, D, RM, false>(acc, a, bb, Dsm, Vs, r, tb, lane);
      scale_exit<RM>(acc, tb, extw, lane);
      // key block tb gets the queries of blocks >= tb
      // token blocks {H0, 3 - H0} known at compile time: one straight block per hc
      auto causal = [&](auto h0) {
        constexpr int H0 = decltype(h0)::value;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int tbi = i == 0 ? H0 : 3 - H0;
            if (tbi <= kk) {
              uint32_t bb[4];
              ldsm_x4_t(bb, P2s + frag_b_kn(lane, 16 * kk, 16 * tbi, kLdP));
#pragma unroll
              for (int m = 0; m < RM; ++m) {
                mma16816<T>(acc[m][2 * i], qf[m][kk], bb[0], bb[1]);
                mma16816<T>(acc[m][2 * i + 1], qf[m][kk], bb[2], bb[3]);
              }
            }
          }
        }
      };
      if (hc == 0) causal(std::integral_constant<int, 0>{});
      else causal(std::integral_constant<int, 1>{});
      // k . dk partials and the dk store. k at this thread's accumulator positions
      // (dims d, tokens y and y + 1) is a 32-bit pair of an A fragment of k^T: one
      // ldmatrix.trans per 16 tokens instead of 16 16-bit loads.
      float parts[RM * 8];  // the partials [m][j][0 / 1] of all tiles
#pragma unroll
      for (int m = 0; m < RM; ++m) {
        const int rb = RM * r + m;  // row block
        uint32_t kf[4];
        uint32_t pk[4];  // kStore: the 8x8 blocks (j & 1, hf) of token block tb[j >> 1]
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const int jt = 2 * tb[j >> 1] + (j & 1);  // n8 tile of the chunk's 64 tokens
          if ((j & 1) == 0) ldsm_x4_t(kf, Ks + frag_a_colmajor(lane, 16 * rb, 16 * tb[j >> 1], LD));
          float part0 = 0.f, part1 = 0.f;
#pragma unroll
          for (int hf = 0; hf < 2; ++hf) {
            const float2 kv = unpack2<T>(kf[2 * (j & 1) + hf]);  // k[y][d], k[y + 1][d]
            part0 += acc[m][j][2 * hf] * kv.x;
            part1 += acc[m][j][2 * hf + 1] * kv.y;
            if constexpr (kStore) {
              pk[2 * (j & 1) + hf] = pack2<T>(acc[m][j][2 * hf], acc[m][j][2 * hf + 1]);
            } else {
              const uint32_t tr = movm_trans(pack2<T>(acc[m][j][2 * hf], acc[m][j][2 * hf + 1]));
              const int yt = 8 * jt + (lane >> 2);
              const int dt = 16 * rb + 8 * hf + 2 * (lane & 3);
              if (full || (yt < nvalid && dt < dk))
                *reinterpret_cast<uint32_t*>(dk_b + (t0 + yt) * args.dk_out.st + dt) = tr;
            }
          }
          if constexpr (kStore) {
            // the four 8x8 (dims x tokens) blocks of token block tb[j >> 1], transposed into
            // the [token][dim] staging tile: lane l addresses token 16 tb + 8 (l / 16) + l % 8,
            // dims 16 rb + 8 (l / 8 % 2)
            if (j & 1)
              stsm_x4_t(smem_u32(stg + (16 * tb[j >> 1] + 8 * (lane >> 4) + (lane & 7)) * LD + 16 * rb +
                                 8 * ((lane >> 3) & 1)),
                        pk);
          }
          parts[8 * m + 2 * j] = part0;
          parts[8 * m + 2 * j + 1] = part1;
        }
      }
      if (has_dg) {
        // step s pairs lanes across lane bit 2 + s (offset 4 << s), as the per-tile
        // butterfly; after it parts[k] holds the sum of index k + (N/2) b2 + (N/4) b3
        // + (N/8) b4 (b = this lane's bits), k < N / 8
        constexpr int N = RM * 8;
        xchg_step<N / 2>(parts, lane, 0);
        xchg_step<N / 4>(parts, lane, 1);
        xchg_step<N / 8>(parts, lane, 2);
#pragma unroll
        for (int k = 0; k < N / 8; ++k) {
          const int idx =
              k + (N / 2) * ((lane >> 2) & 1) + (N / 4) * ((lane >> 3) & 1) + (N / 8) * ((lane >> 4) & 1);
          const int m = idx >> 3, j = (idx >> 1) & 3;
          const int jt = 2 * ((j >> 1) == 0 ? hc : 3 - hc) + (j & 1);  // tb[j >> 1], not indexed
          red[(RM * r + m) * 64 + 8 * jt + 2 * (lane & 3) + (idx & 1)] = parts[k];
        }
      }
    }
    if (vrows) {
      // dv^T rows [16r, +16), token blocks tb: dS^T k^T (exit-weighted) + dO^T P1
      float acc[RM][4][4];
      uint32_t a[RM][4], bb[2][4];  // ds_product's fragments (see there why here)
      tc_zero(acc);
      ds_product<T, D, RM, true>(acc, a, bb, Dsm, Ks, r, tb, lane);
      scale_exit<RM>(acc, tb, extw, lane);
      // as in dk: one straight block per hc; the dO fragments of token blocks below
      // both of the warp's key blocks (kk = 0 for hc = 1) are not loaded
      auto causal = [&](auto h0) {
        constexpr int H0 = decltype(h0)::value;
#pragma unroll
        for (int kk = 0; kk < 4; ++kk) {
          if (kk < H0) continue;  // H0 = min(H0, 3 - H0)
          uint32_t a[RM][4];
#pragma unroll
          for (int m = 0; m < RM; ++m)
            ldsm_x4_t(a[m], Os + frag_a_colmajor(lane, 16 * (RM * r + m), 16 * kk, LD));
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const int tbi = i == 0 ? H0 : 3 - H0;
            if (tbi <= kk) {
              uint32_t bb[4];
              ldsm_x4_t(bb, P1s + frag_b_kn(lane, 16 * kk, 16 * tbi, kLdP));
#pragma unroll
              for (int m = 0; m < RM; ++m) {
                mma16816<T>(acc[m][2 * i], a[m], bb[0], bb[1]);
                mma16816<T>(acc[m][2 * i + 1], a[m], bb[2], bb[3]);
              }
            }
          }
        }
      };
      if (hc == 0) causal(std::integral_constant<int, 0>{});
      else causal(std::integral_constant<int, 1>{});
      if constexpr (kStore) {
        // as dk's, into the second staging tile
        T* const vst = stg + kChunk * LD;
#pragma unroll
        for (int m = 0; m < RM; ++m) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            uint32_t pk[4];
#pragma unroll
            for (int q = 0; q < 4; ++q)
              pk[q] = pack2<T>(acc[m][2 * i + (q >> 1)][2 * (q & 1)], acc[m][2 * i + (q >> 1)][2 * (q & 1) + 1]);
            stsm_x4_t(smem_u32(vst + (16 * tb[i] + 8 * (lane >> 4) + (lane & 7)) * LD + 16 * (RM * r + m) +
                               8 * ((lane >> 3) & 1)),
                      pk);
          }
        }
      } else {
#pragma unroll
        for (int m = 0; m < RM; ++m) {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int jt = 2 * tb[j >> 1] + (j & 1);
#pragma unroll
            for (int hf = 0; hf < 2; ++hf) {
              const uint32_t tr = movm_trans(pack2<T>(acc[m][j][2 * hf], acc[m][j][2 * hf + 1]));
              const int yt = 8 * jt + (lane >> 2);
              const int dt = 16 * (RM * r + m) + 8 * hf + 2 * (lane & 3);
              if (full || (yt < nvalid && dt < dv))
                *reinterpret_cast<uint32_t*>(dv_b + (t0 + yt) * args.dv_out.st + dt) = tr;
            }
          }
        }
      }
    }
    // kStore: this thread's stmatrix writes before the copy engine reads them (the store is
    // issued after the next barrier)
    if constexpr (kStore) lasp2::delta::gpu::fence_proxy_async_shared();
    if (krows) {
      // this warp's part of dS = exp(G_last) dS + scale q^T diag(w_entry) dO
#pragma unroll
      for (int m = 0; m < RM; ++m)
#pragma unroll
        for (int j = 0; j < HC / 8; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) Ds[m][j][e] *= through;
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int x = 16 * kk + 2 * (lane & 3);
        const float w0 = entw[x], w1 = entw[x + 1], w2 = entw[x + 8], w3 = entw[x + 9];
        uint32_t a[RM][4];
#pragma unroll
        for (int m = 0; m < RM; ++m) {
          scale_a_tokens<T>(a[m], qf[m][kk], w0, w1, w2, w3);
        }
#pragma unroll
        for (int np = 0; np < HC / 16; ++np) {
          uint32_t bb[4];
          ldsm_x4_t(bb, Os + frag_b_kn(lane, 16 * kk, hc * HC + 16 * np, LD));
#pragma unroll
          for (int m = 0; m < RM; ++m) {
            mma16816<T>(Ds[m][2 * np], a[m], bb[0], bb[1]);
            mma16816<T>(Ds[m][2 * np + 1], a[m], bb[2], bb[3]);
          }
        }
      }
    }
  }
  cp_async_wait_all();
  if constexpr (kStore) {
    // the segment's first chunk's staged dk and dv; the block's shared memory must outlive
    // the stores
    __syncthreads();
    if (tid == kTmaThread && c_begin < c_end) {
      store_tiles(c_begin);
      bulk_store_wait<0, false>();
    }
  }
  if (has_dg) {
    __syncthreads();
    if (warp == kDgWarp && pending) finish_dg();  // the segment's first chunk
  }
  if (has_dg && !args.fold_offset && tid == 32 * kDgWarp) args.seg_total[blk.bh * g.nseg + blk.seg] = carry;
}

// The staged dk / dv tiles and their tensor-map stores (kStore, session 17: 814 -> 640 us at
// 64K, D = 128 on an H200) run by default at D = 128 where they fit;
// LASP2_CUDA_DKDV_STORE=direct forces the per-thread stores of the kTma kernel (the same
// bits; read per launch so that a test can compare the two); unset or empty: the default,
// anything else a lasp2::Error (env_knob.h).
inline bool dkdv_store_staged() { return env_choice("LASP2_CUDA_DKDV_STORE", {"direct"}, -1) < 0; }

// Which kernel the last launch_tc_dkdv ran (tc_dkdv_last_kernel, for the tests).
std::atomic<int> g_last_kernel{-1};  // atomic: launches may come from several host threads

// The kTma kernel (P = DkdvTmaArgs) or its staged-store form (P = DkdvTmaStoreArgs) where it
// can run (sm_90 code on an sm_90 device, every map encodable, the block's shared memory within
// the device's opt-in limit); false (nothing launched) otherwise.
template <typename T, int D, typename P>
bool launch_dkdv_tma(const DkdvArgs& a, cudaStream_t s) {
  constexpr bool kStore = std::is_same_v<P, DkdvTmaStoreArgs>;
  auto k = tc_dkdv_kernel<T, D, true, P>;
  if (!lasp2::delta::gpu::runs_sm90(k) || a.g.n <= 0) return false;
  // + the two stage barriers (kStore: after the two staging tiles)
  constexpr int smem = DkdvLayout<D>::kBytes + (kStore ? 2 * TcTile<D>::kBytes : 0) + 16;
  if (kStore && smem > device_info().smem_optin) return false;
  P ta;
  static_cast<DkdvArgs&>(ta) = a;
  const View* views[4] = {&a.q, &a.k, &a.v, &a.dout};
  const int dims[4] = {a.dk, a.dk, a.dv, a.dv};
  if (!encode_tile_maps<T, D>(ta, 4, views, dims, a.g)) return false;
  if constexpr (kStore) {
    if (!encode_tile_map<T, D>(&ta.omap[0], ta.ohdim[0], ta.otdim[0], ta.obdim[0], a.dk_out, a.g, a.dk) ||
        !encode_tile_map<T, D>(&ta.omap[1], ta.ohdim[1], ta.otdim[1], ta.obdim[1], a.dv_out, a.g, a.dv))
      return false;
  }
  allow_dynamic_smem(reinterpret_cast<const void*>(k), smem);
  launch_kernel("tc_dkdv_kernel", k, static_cast<unsigned>(a.g.bh() * a.g.nseg), 32 * DkdvLayout<D>::NW, smem,
                s, ta);
  g_last_kernel.store(kStore ? 2 : 1, std::memory_order_relaxed);
  return true;
}

// The tensor-map copies unless forced off (LASP2_CUDA_TILE_COPY=cp_async) or they cannot
// run (at D = 128 first their staged-store form); then the cp.async kernel.
template <typename T, int D>
void launch_dkdv_t(const DkdvArgs& a, cudaStream_t s) {
  if (!tile_copy_forced_cp_async()) {
    if constexpr (D == 128) {
      if (dkdv_store_staged() && launch_dkdv_tma<T, D, DkdvTmaStoreArgs>(a, s)) return;
    }
    if (launch_dkdv_tma<T, D, DkdvTmaArgs>(a, s)) return;
  }
  constexpr int smem = DkdvLayout<D>::kBytes;
  auto k = tc_dkdv_kernel<T, D, false>;
  allow_dynamic_smem(reinterpret_cast<const void*>(k), smem);
  launch_kernel("tc_dkdv_kernel", k, static_cast<unsigned>(a.g.bh() * a.g.nseg), 32 * DkdvLayout<D>::NW, smem,
                s, a);
  g_last_kernel.store(0, std::memory_order_relaxed);
}

}  // namespace

int tc_dkdv_last_kernel() { return g_last_kernel.load(std::memory_order_relaxed); }

int tc_dkdv_smem(int D) { return D == 64 ? DkdvLayout<64>::kBytes : DkdvLayout<128>::kBytes; }

void launch_tc_dkdv(Elem e, int D, const DkdvArgs& a, cudaStream_t s) {
  dispatch_tc(e, D, [&](auto t, auto d) { launch_dkdv_t<decltype(t), decltype(d)::value>(a, s); });
}

}  // namespace lasp2::cuda
