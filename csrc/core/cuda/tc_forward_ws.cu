// The output pass by job, not by phase (variant 16; the default output pass at D = 128 on
// sm_90 since session 30): its kernel and launcher. tc_forward.cu's launcher calls
// launch_tc_fwd_ws first and falls back to variant 10 where it declines.
#include "device_utils.cuh"
#include "launch.h"
#include "pdl.cuh"
#include "route.h"  // device_info: the opt-in shared memory
#include "tc_forward_step.cuh"
#include "tc_tile_map.cuh"
#include "tc_tiles.cuh"

namespace lasp2::cuda {
namespace {

// VAR 16 (the output mode at D = 128 on sm_90, session 30; the default there, variant 10
// under LASP2_CUDA_FWD_KERNEL=v10): variant 10's math with the block split by job instead of
// by phase. Warps 0-7 (consumers) each own their 16 rows of the state S_a^T and nothing
// else: the inter product, the intra product, the output slice and the state update of warp
// w need no other warp's values, only the chunk's tiles, P and the weights. Warps 8 and 9
// (producers) compute P (10 n8 tiles each) and the entry / exit weights one chunk ahead of
// the consumers, and warp 8's lane 0 issues the tile copies. The loop has no block barrier:
// stage s of a three-stage ring holds a chunk's tiles, meta, P and weights, ordered by three
// mbarriers (full: the copies landed; ready: P and the weights written; empty: the 8
// consumers are done with it, so the copy thread may refill it). Each consumer stages its
// own 64 x 16 output slice and writes it by its own tensor-map store (a 16-column box), so
// the warps drift apart by up to the ring's depth instead of waiting for the slowest at two
// block barriers a chunk (session 23's profile: latency-bound, two warps a scheduler). Same
// MMAs in the same order per output element and the same weight expressions: the same bits
// as variant 10. 162 registers (10 warps, no spills), 220,232 bytes of shared memory.
// Measured on H100s (session 30, seven machines, variant 10 alternating in each call; H = 16,
// gates): ncu of the output pass at 64K 477 -> 466-471 us; the graph forward at 64K from -3 %
// to +2.5 % by machine (variant 10 varies 1 % between machines, this kernel 5 %), 4K x 8
// -1 % on average, 256K -1 to -9 %. With the tiles re-read from L2 (a diagnostic build) its
// forward was 6 % faster while variant 10 was no faster than from HBM: its chunk step is
// shorter, which an H200's faster memory should expose (not measured there yet). Not used
// for the dq mode: with its fourth tile in the ring two stages fit (30-37 % slower: P waits on
// the refill), and with x arriving by per-warp boxes into the warp's output slice (three
// stages) it measured 5 % slower. Four producer warps measured 5 % slower where HBM bounds
// the pass (docs/kernels.md, "The output pass by job, not by phase").
struct FwdWsLayout {
  static constexpr int kThreads = 32 * (8 + 2);                  // 8 consumer, 2 producer warps
  static constexpr int NS = 3;
  static constexpr int NT = 3;                                   // qa, ka, va
  static constexpr int kTile = TcTile<128>::kBytes;
  static constexpr int kStage = NS * NT * kTile;                 // the consumers' output slices, two [64][16] a warp
  static constexpr int kSliceBytes = 2 * kChunk * 16 * 2;
  static constexpr int kMeta = kStage + 8 * kSliceBytes;
  static constexpr int kP = kMeta + NS * 128 * 4;
  static constexpr int kW = kP + NS * kPBytes;                   // entry, exit weights per stage
  static constexpr int kBars = kW + NS * 2 * 64 * 4;             // full, ready, empty per stage
  static constexpr int kBytes = kBars + 3 * NS * 8;
};

template <typename T>
__global__ void __launch_bounds__(FwdWsLayout::kThreads, 1)
    tc_fwd_ws_kernel(const __grid_constant__ FwdTmaStoreArgs args) {
  using L = FwdWsLayout;
  constexpr int D = 128, NS = L::NS, NT = L::NT, LD = TcTile<D>::LD;
  constexpr int kConsumers = 8, kProducers = L::kThreads / 32 - kConsumers, kCopyTid = 32 * kConsumers;
  static_assert(L::kStage % 128 == 0 && L::kMeta % 16 == 0, "tensor-map and bulk-copy alignment");
  pdl_wait();
  pdl_launch_dependents();
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + L::kBars);
  uint64_t* ready = full + NS;
  uint64_t* empty = ready + NS;
  auto tile = [&](int stage, int i) { return reinterpret_cast<T*>(smem) + (stage * NT + i) * kChunk * LD; };
  auto meta_of = [&](int stage) { return reinterpret_cast<float*>(smem + L::kMeta) + stage * 128; };
  auto p_of = [&](int stage) { return reinterpret_cast<T*>(smem + L::kP + stage * kPBytes); };
  auto w_of = [&](int stage) { return reinterpret_cast<float*>(smem + L::kW) + stage * 128; };

  const Geom& g = args.g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const SegmentBlock blk = segment_block(g);
  const int c_begin = blk.c_begin, c_end = blk.c_end;
  const int dv = args.dv;
  const float* meta = head_meta(args.meta, g, blk.bh);

  if (tid == kCopyTid) {
#pragma unroll
    for (int s = 0; s < NS; ++s) {
      lasp2::delta::gpu::mbar_init(&full[s], 1);
      lasp2::delta::gpu::mbar_init(&ready[s], 32 * kProducers);
      lasp2::delta::gpu::mbar_init(&empty[s], 32 * kConsumers);
    }
    lasp2::delta::gpu::mbar_init_fence();
  }
  __syncthreads();

  if (warp >= kConsumers) {
    // ---- producers -----------------------------------------------------------------
    // chunk c into stage s: the NT tiles and the meta's 512 bytes, counted on full[s]
    auto load = [&](int c, int s) {
      lasp2::delta::gpu::mbar_arrive_expect_tx(&full[s], NT * kChunk * LD * static_cast<int>(sizeof(T)) + 128 * 4);
#pragma unroll
      for (int i = 0; i < NT; ++i)
        tile_map_box(smem_u32(tile(s, i)), &args.map[i], args.hdim[i], args.tdim[i], blk.h, c * kChunk, blk.b,
                     &full[s]);
      bulk_copy_1d(smem_u32(meta_of(s)), meta + c * 128, 128 * 4, &full[s]);
    };
    const int x = tid - kCopyTid;  // the token whose weights this thread writes
    if (tid == kCopyTid)
      for (int c = c_begin; c < min(c_end, c_begin + NS); ++c) load(c, c - c_begin);
    const int pw = warp - kConsumers;
    for (int c = c_begin; c < c_end; ++c) {
      const int i = c - c_begin, s = i % NS;
      lasp2::delta::gpu::mbar_wait(&full[s], (i / NS) & 1);
      const T* Qs = tile(s, 0);
      const T* Ks = tile(s, 1);
      const float* ms = meta_of(s);
      T* Ps = p_of(s);
      // row block r has 2 r + 2 n8 key tiles at or below the diagonal: warp 8 takes row
      // blocks 3 and 0, warp 9 row blocks 2 and 1 (10 tiles each)
      if (pw == 0) {
        scores_slice<T, D, 3>(Qs, Ks, ms, args.scale, Ps, 3, 0, lane);
        scores_slice<T, D, 3>(Qs, Ks, ms, args.scale, Ps, 3, 3, lane);
        scores_slice<T, D, 2>(Qs, Ks, ms, args.scale, Ps, 3, 6, lane);
        scores_slice<T, D, 2>(Qs, Ks, ms, args.scale, Ps, 0, 0, lane);
      } else {
        scores_slice<T, D, 3>(Qs, Ks, ms, args.scale, Ps, 2, 0, lane);
        scores_slice<T, D, 3>(Qs, Ks, ms, args.scale, Ps, 2, 3, lane);
        scores_slice<T, D, 2>(Qs, Ks, ms, args.scale, Ps, 1, 0, lane);
        scores_slice<T, D, 2>(Qs, Ks, ms, args.scale, Ps, 1, 2, lane);
      }
      {
        // scale folded into the entry weights and P (variant 10's expressions)
        const float Gl = ms[126], sl = ms[127];
        const float G = ms[2 * x], sx = ms[2 * x + 1];
        float* w = w_of(s);
        w[x] = sx == 0.f ? args.scale * __expf(G) : 0.f;
        w[64 + x] = sx == sl ? __expf(Gl - G) : 0.f;
      }
      lasp2::delta::gpu::mbar_arrive(&ready[s]);
      // refill chunk c - 1's stage with chunk c - 1 + NS once the consumers are done with it
      if (tid == kCopyTid && i >= 1 && c - 1 + NS < c_end) {
        const int ip = i - 1, sp = ip % NS;
        lasp2::delta::gpu::mbar_wait(&empty[sp], (ip / NS) & 1);
        lasp2::delta::gpu::fence_proxy_async_shared();
        load(c - 1 + NS, sp);
      }
    }
    return;
  }

  // ---- consumers: warp w owns output dims [16w, 16w + 16) ----------------------------
  const bool active = 16 * warp < dv;
  float S[D / 8][4];
  load_entering_state<D>(S, args, blk, 1.f, warp, lane);
  T* const my_slices = reinterpret_cast<T*>(smem + L::kStage + warp * L::kSliceBytes);
  for (int c = c_begin; c < c_end; ++c) {
    const int i = c - c_begin, s = i % NS;
    const uint32_t par = (i / NS) & 1;
    lasp2::delta::gpu::mbar_wait(&full[s], par);
    const T* Qs = tile(s, 0);
    const T* Ks = tile(s, 1);
    const T* Vs = tile(s, 2);
    const float* ms = meta_of(s);
    if (active) {
      float o[8][4];
      inter_product<T, D>(o, S, Qs, lane);
      lasp2::delta::gpu::mbar_wait(&ready[s], par);
      const T* Ps = p_of(s);
      const float* entw = w_of(s);
      const float* extw = entw + 64;
      scale_by_entry(o, entw, lane);
      uint32_t vf[4][4];
      intra_product<T, D>(o, vf, Vs, Ps, warp, lane);
      // the warp's 64 x 16 output slice: staging slice i % 2 (its store two chunks ago has
      // read it once at most one of this lane's store groups still reads), then one store
      T* const ostg = my_slices + (i & 1) * kChunk * 16;
      if (lane == 0) bulk_store_wait<1, true>();
      __syncwarp();
#pragma unroll
      for (int j = 1; j < 8; j += 2) {
        const uint32_t pk[4] = {pack2<T>(o[j - 1][0], o[j - 1][1]), pack2<T>(o[j - 1][2], o[j - 1][3]),
                                pack2<T>(o[j][0], o[j][1]), pack2<T>(o[j][2], o[j][3])};
        // lane l addresses token 8 (j - 1 + l / 16) + l % 8, dims 8 (l / 8 % 2) of the slice
        stsm_x4_t(smem_u32(ostg + (8 * (j - 1 + (lane >> 4)) + (lane & 7)) * 16 + 8 * ((lane >> 3) & 1)), pk);
      }
      lasp2::delta::gpu::fence_proxy_async_shared();
      __syncwarp();
      if (lane == 0)
        tile_map_store_at(&args.omap, args.ohdim, args.otdim, blk.h, c * kChunk,
                          blk.b, 16 * warp, smem_u32(ostg));
      // state update
      const float Gl = ms[126], sl = ms[127];
      const float through = sl == 0.f ? __expf(Gl) : 0.f;
#pragma unroll
      for (int j = 0; j < D / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) S[j][e] *= through;
      add_chunk_to_state<T, D>(S, vf, Ks, extw, lane);
    } else {
      lasp2::delta::gpu::mbar_wait(&ready[s], par);  // an idle warp still releases the stage in turn
    }
    lasp2::delta::gpu::mbar_arrive(&empty[s]);
  }
  // the block's shared memory must outlive this warp's stores
  if (lane == 0) bulk_store_wait<0, false>();
}

// launch_tc_fwd_ws (launch.h) for one element type.
template <typename T>
bool launch_fwd_ws(const FwdArgs& a, cudaStream_t s) {
  auto k = tc_fwd_ws_kernel<T>;
  using L = FwdWsLayout;
  constexpr int smem = L::kBytes;
  if (!lasp2::delta::gpu::runs_sm90(k) || a.g.n <= 0 || reinterpret_cast<uintptr_t>(a.meta) % 16 != 0) return false;
  if (smem > device_info().smem_optin) return false;
  FwdTmaStoreArgs ta;
  static_cast<FwdArgs&>(ta) = a;
  const View* views[3] = {&a.qa, &a.ka, &a.va};
  const int dims[3] = {a.da, a.da, a.dv};
  if (!encode_tile_maps<T, 128>(ta, L::NT, views, dims, a.g)) return false;
  if (!encode_tile_map<T, 128>(&ta.omap, ta.ohdim, ta.otdim, ta.obdim, a.out, a.g, a.dv, 16)) return false;
  allow_dynamic_smem(reinterpret_cast<const void*>(k), smem);
  launch_kernel("tc_fwd_ws_kernel", k, static_cast<unsigned>(a.g.bh() * a.g.nseg), L::kThreads, smem, s, ta);
  return true;
}

}  // namespace

bool launch_tc_fwd_ws(Elem e, const FwdArgs& a, cudaStream_t s) {
  return e == Elem::kBF16 ? launch_fwd_ws<__nv_bfloat16>(a, s) : launch_fwd_ws<__half>(a, s);
}

}  // namespace lasp2::cuda
