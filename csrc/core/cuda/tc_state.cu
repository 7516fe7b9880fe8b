// Tensor-core segment states (bf16/fp16 inputs, fp32 accumulation).
// One block per (b, h, segment, block of DB = 64 state columns), D/16 warps; warp
// w owns rows [16w, 16w + 16) x the block's 64 columns of the da x db state, held
// in mma accumulators (32 per thread) for the whole segment, so that two blocks
// fit on an SM. Each 64-token chunk arrives by cp.async two chunks ahead (three
// stages: the kernel streams two tensors with little math per byte, so it needs
// many bytes in flight), then
//   M += carry * A^T diag(w) B,  carry *= exp(G_last)  (0 after a document start)
// walking the chunks forward with w = w_entry, carry = coef (entry mode) or
// backward from the segment's end with w = w_exit, carry = 1 (exit mode). Either
// way carry is the decay between the chunk and the segment's edge, so the walk
// stops once it underflows to zero (a document start, or strong decays: with
// per-token gates around -0.05 after about 32 chunks), or falls to StateArgs::stop
// (session 14: 2^-48 of its start, where the rest of the walk is far below the 16-bit
// rounding of the terms kept), and M stays unscaled.
// A^T fragments are read transposed from the [token][dim] tile (ldmatrix.trans)
// and scaled per token in registers. The per-token weights come precomputed
// from the meta kernel (MetaArgs::wmeta): no exponentials here.
// A split walk (StateArgs::sub_chunks, for per-head fixed decays, whose weakest head
// otherwise walks whole segments while the others stop early: docs/history/kernels-log.md,
// session 13) gives piece j of the walk to its own blocks: they first multiply the
// through factors of the walk's chunks before the piece into carry (32 at a time, a
// butterfly product per warp: a few shuffles instead of a chain of 32), skip the piece
// if carry is already 0, and write the piece's state apart; the scan that reads the
// segment states next adds the pieces (segment_scan.h: StatePieces; a kernel of its own
// before session 15). Against one walk only the rounding of carry's product and the fp32
// summation order of the state differ.
// Tile copies (session 16, as tc_forward's and tc_dkdv's): by default (sm_90 code on an
// sm_90 device, views a tensor map can take, 16-byte aligned weights) one thread fetches
// each chunk's a and b tiles by tensor-map copies and its weights by a 1-d bulk copy, all
// three counted on the stage's mbarrier (kTma); otherwise (sm_80, other views,
// LASP2_CUDA_TILE_COPY=cp_async) every thread copies by cp.async: the same bytes in shared
// memory where the kernel reads, the same bits.
// Copy stages (session 21): S stages, S - 1 chunks in flight; LASP2_CUDA_STATE_STAGES picks
// S (3 unless set; passes.cpp): with gates a walk of ~10 chunks waits on each load, so a
// deeper ring may overlap more of them. Only the copy ring differs: the same bits.
#include <atomic>

#include "device_utils.cuh"
#include "pdl.cuh"
#include "tc_tile_map.cuh"  // the tensor maps (kTma); tma_copy.cuh's wrappers
#include "tc_tiles.cuh"

namespace lasp2::cuda {
namespace {

constexpr int kStateDB = 64;  // state columns per block

constexpr int kStateStages = 3;  // the default ring (LASP2_CUDA_STATE_STAGES unset)

template <int D, int S = kStateStages>
struct StateLayout {
  static constexpr int kA = TcTile<D>::kBytes;         // [64][D + 8]
  static constexpr int kB = TcTile<kStateDB>::kBytes;  // [64][64 + 8]
  static constexpr int kStage = kA + kB;
  static constexpr int kMeta = S * kStage;  // [stages][64][2] floats: weights
  static constexpr int kBytes = kMeta + S * 128 * 4;
  // with the kTma kernel's S stage barriers after kBytes
  static constexpr int kTmaBytes = kBytes + S * 8;
  // Blocks an SM for __launch_bounds__: 2 where two blocks' shared memory (with the 1 KiB
  // the runtime keeps per block) fits an sm_90 SM's 228 KiB (3 stages: 80 KiB at D = 128;
  // 4 stages 106 KiB; 6 stages at D = 64 111 KiB), else 1.
  static constexpr int kMinBlocks = 2 * (kTmaBytes + 1024) <= 228 * 1024 ? 2 : 1;
};

// cp.async: waits until at most the N newest committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_newest() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The kTma kernel's argument: StateArgs plus the tensor maps of a (map 0, da columns read
// in [64][D + 8] boxes) and b (map 1, db columns in [64][64 + 8] boxes from the block's
// first column; tc_tile_map.cuh) and where each map put the h, t, b dimensions.
struct StateTmaArgs : StateArgs {
  CUtensorMap map[2];
  int hdim[2], tdim[2], bdim[2];
};

// kTma (session 16; head comment): the same walk with each chunk's a, b tiles and weights
// copied by one thread (kTmaThread) onto the stage's mbarrier instead of cp.async from
// every thread. P = StateTmaArgs then. S copy stages: chunk i + S - 1 is fetched while
// chunk i is multiplied.
template <typename T, int D, bool ENTRY, bool kTma = false, typename P = StateArgs, int S = kStateStages>
__global__ void __launch_bounds__(2 * D, (StateLayout<D, S>::kMinBlocks))
    tc_state_kernel(const __grid_constant__ P args) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  constexpr int NW = D / 16;
  constexpr int NTHREADS = 32 * NW;
  constexpr int LD = TcTile<D>::LD;
  constexpr int DB = kStateDB;
  constexpr int LDB = TcTile<DB>::LD;
  constexpr int NSPLIT = D / DB;
  using L = StateLayout<D, S>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* meta_s = reinterpret_cast<float*>(smem + L::kMeta);
  auto tile_a = [&](int stage) { return reinterpret_cast<T*>(smem + stage * L::kStage); };
  auto tile_b = [&](int stage) { return reinterpret_cast<T*>(smem + stage * L::kStage + L::kA); };

  const Geom& g = args.g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int split = blockIdx.x % NSPLIT;
  // blocks of the walked segments only (StateArgs::first_seg, segs; the launch sets segs),
  // a segment's pieces together
  const int sub = (blockIdx.x / NSPLIT) % args.nsub;
  const int seg = args.first_seg + (blockIdx.x / NSPLIT / args.nsub) % args.segs;
  const int64_t bh = blockIdx.x / NSPLIT / args.nsub / args.segs;
  const int col0 = split * DB;  // first state column of this block
  const int b = static_cast<int>(bh / g.heads), h = static_cast<int>(bh % g.heads);
  const int c_begin = seg * g.seg_chunks;
  const int c_end = min(g.nchunks, c_begin + g.seg_chunks);
  const T* abase = head_base<T>(args.a, b, h, g.begin);
  const T* bbase = head_base<T>(args.b, b, h, g.begin) + col0;
  const float* wmeta = head_meta(args.wmeta, g, bh);
  if (col0 >= args.db) return;  // (uniform) no columns for this block

  // The i-th chunk of the segment's walk: forward (entry) or backward from the end (exit).
  auto chunk_of = [&](int i) { return ENTRY ? c_begin + i : c_end - 1 - i; };
  // This block's piece of the walk: chunks [i0, i0 + nwalk) of it.
  const int nall = max(0, c_end - c_begin);
  const int i0 = min(nall, sub * args.sub_chunks);  // sub = 0 without a split
  // carry through the walk's chunks before the piece, 0 once it underflows or a
  // document starts, or when the piece lies past the segment's end
  float carry = sub > 0 && i0 == nall ? 0.f : ENTRY ? args.coef : 1.f;
  for (int base = 0; base < i0 && !(carry <= args.stop); base += 4 * 32) {
    float t[4];  // through factor (w_entry of the chunk's last token), 1 past the piece
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int i = base + 32 * u + lane;
      t[u] = i < i0 ? wmeta[chunk_of(i) * 128 + 2 * 63] : 1.f;
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t[u] *= __shfl_xor_sync(0xffffffffu, t[u], o);
      carry *= t[u];  // the same value in every lane
    }
  }
  // (one walk never reaches a chunk after carry fell to `stop`; piece 0 starts as one walk)
  const int nwalk =
      sub > 0 && carry <= args.stop ? 0 : (args.nsub > 1 ? min(nall, i0 + args.sub_chunks) : nall) - i0;
  // Copies the walk's chunk i into `stage` when i < nwalk; commits a group either
  // way, so that "all but the newest group complete" always means "chunk i arrived".
  auto load = [&](int i, int stage) {
    if (i < nwalk) {
      const int c = chunk_of(i0 + i);
      const int nvalid = min(kChunk, g.n - c * kChunk);
      const int64_t t0 = static_cast<int64_t>(c) * kChunk;
      load_tile<T, D, NTHREADS>(tile_a(stage), abase + t0 * args.a.st, args.a.st, nvalid, args.da,
                                tid);
      load_tile<T, DB, NTHREADS>(tile_b(stage), bbase + t0 * args.b.st, args.b.st, nvalid,
                                 args.db - col0, tid);
      if (tid < 32) cp_async16(meta_s + stage * 128 + tid * 4, wmeta + c * 128 + tid * 4, true);
    }
    cp_async_commit();
  };

  // kTma: the walk's chunk i (< nwalk) into `stage` by one thread (the last warp's first:
  // the idle warp where da < D), counted on bars[stage] (one arrival with the bytes
  // expected; the boxes count their zero-filled parts too). Stage s's k-th fill is the
  // walk's chunk Sk + s and completes its barrier's phase k; bit s of `phases` holds the
  // parity of the next fill to wait for.
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + L::kBytes);
  constexpr int kTmaThread = NTHREADS - 32;
  uint32_t phases = 0;
  auto load_tma = [&](int i, int stage) {
    if constexpr (kTma) {
      if (tid == kTmaThread && i < nwalk) {
        const int c = chunk_of(i0 + i);
        const int t = c * kChunk;
        lasp2::delta::gpu::mbar_arrive_expect_tx(&bars[stage], L::kStage + 128 * 4);
        tile_map_box(smem_u32(tile_a(stage)), &args.map[0], args.hdim[0], args.tdim[0], h, t, b, &bars[stage]);
        tile_map_box(smem_u32(tile_b(stage)), &args.map[1], args.hdim[1], args.tdim[1], h, t, b, &bars[stage],
                     col0);
        bulk_copy_1d(smem_u32(meta_s + stage * 128), wmeta + c * 128, 128 * 4, &bars[stage]);
      }
    }
  };
  // kTma: waits (the copy thread alone) for the copies issued past the walk's last chunk
  // i0 + last (the walk stopped early): the block's shared memory must outlive them.
  auto drain_tma = [&](int last, int stage) {
    if constexpr (kTma) {
      if (tid == kTmaThread) {
        for (int j = 1; j <= S - 1 && last + j < nwalk; ++j) {
          const int s = (stage + j) % S;
          lasp2::delta::gpu::mbar_wait(&bars[s], (phases >> s) & 1u);
        }
      }
    }
  };
  if constexpr (kTma) {
    if (tid == kTmaThread) lasp2::delta::gpu::init_ring_barriers<S>(bars);
    __syncthreads();
  }

  float M[DB / 8][4];
  tc_zero(M);
  const bool active = 16 * warp < args.da;

  // the first S - 1 chunks; the first two written out as before session 21 (a loop from 0
  // compiles the default ring to other PTX)
  static_assert(S >= 3, "the ring holds at least the chunk in use and the next two");
  if constexpr (kTma) {
    load_tma(0, 0);
    load_tma(1, 1);
#pragma unroll
    for (int j = 2; j < S - 1; ++j) load_tma(j, j);
  } else {
    load(0, 0);
    load(1, 1);
#pragma unroll
    for (int j = 2; j < S - 1; ++j) load(j, j);
  }
  int stage = 0;
  for (int i = 0; i < nwalk; ++i) {
    if constexpr (kTma) {
      lasp2::delta::gpu::mbar_wait(&bars[stage], (phases >> stage) & 1u);  // chunk i arrived
      phases ^= 1u << stage;
    } else {
      cp_async_wait_newest<S - 2>();  // chunk i arrived (only chunks i + 1 .. i + S - 2 may be pending)
    }
    __syncthreads();         // ... for every thread; and the stage of i - 1 is free
    if constexpr (kTma) {
      // that stage's last (generic-proxy) reads were before the barrier above; order them
      // before the copy engine's writes
      if (tid == kTmaThread && i + S - 1 < nwalk) lasp2::delta::gpu::fence_proxy_async_shared();
      load_tma(i + S - 1, stage == 0 ? S - 1 : stage - 1);
    } else {
      load(i + S - 1, stage == 0 ? S - 1 : stage - 1);
    }
    const T* ta = tile_a(stage);
    const T* tb = tile_b(stage);
    const float* ws = meta_s + stage * 128;  // {w_entry, w_exit} per token
    const float through = ws[2 * 63];        // w_entry of the last token = exp(G_last) or 0
    if (active) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        ldsm_x4_t(a, ta + frag_a_colmajor(lane, 16 * warp, 16 * kk, LD));
        const int y0 = 16 * kk + 2 * (lane & 3);
        const float4 wl = *reinterpret_cast<const float4*>(ws + 2 * y0);        // tokens y0, y0 + 1
        const float4 wh = *reinterpret_cast<const float4*>(ws + 2 * (y0 + 8));  // y0 + 8, y0 + 9
        float w[4];
        if (ENTRY) {
          w[0] = carry * wl.x;
          w[1] = carry * wl.z;
          w[2] = carry * wh.x;
          w[3] = carry * wh.z;
        } else {
          w[0] = carry * wl.y;
          w[1] = carry * wl.w;
          w[2] = carry * wh.y;
          w[3] = carry * wh.w;
        }
        scale_a_tokens<T>(a, a, w[0], w[1], w[2], w[3]);
#pragma unroll
        for (int np = 0; np < DB / 16; ++np) {  // columns past db are zero in the tile
          uint32_t bb[4];
          ldsm_x4_t(bb, tb + frag_b_kn(lane, 16 * kk, 16 * np, LDB));
          mma16816<T>(M[2 * np], a, bb[0], bb[1]);
          mma16816<T>(M[2 * np + 1], a, bb[2], bb[3]);
        }
      }
    }
    // through the whole chunk: what lies beyond it (entry: later tokens; exit: earlier
    // ones) is reached only by this factor; 0 after a document start or an underflow,
    // and every term past a carry <= stop weighs at most stop (StateArgs::stop)
    carry *= through;
    if (carry <= args.stop) {
      if constexpr (kTma) drain_tma(i, stage);
      break;
    }
    stage = stage == S - 1 ? 0 : stage + 1;
  }
  if constexpr (!kTma) cp_async_wait_all();

  float* out = args.out + (bh * g.nseg + seg) * static_cast<int64_t>(args.da) * args.db;
  if (sub > 0) {  // a later piece: its own slot, and whether it walked any chunk
    const int64_t slot = (bh * g.nseg + seg) * (args.nsub - 1) + sub - 1;
    if (split == 0 && tid == 0) args.sub_flags[slot] = nwalk > 0 ? 1.f : 0.f;
    if (nwalk == 0) return;
    out = args.sub_out + slot * static_cast<int64_t>(args.da) * args.db;
  }
  if (active) {
#pragma unroll
    for (int j = 0; j < DB / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 16 * warp + (lane >> 2) + 8 * (e >> 1);
        const int jj = col0 + 8 * j + 2 * (lane & 3) + (e & 1);
        if (i < args.da && jj < args.db) out[i * args.db + jj] = M[j][e];
      }
    }
  }
}

// The stage count of the last launch_tc_state (tc_state_last_stages, for the tests);
// atomic: launches may come from several host threads.
std::atomic<int> g_last_stages{-1};

// Lets kernel k (S stages) take `bytes` of dynamic shared memory. Deeper rings also ask for
// the largest carveout: two 4-stage blocks (2 x 106 KiB at D = 128) share an SM only in its
// 228 KiB configuration, which the driver need not pick for a kernel one block of which can
// run. (A failure shows at the launch, which check_launch names.)
template <int S>
void allow_state_smem(const void* k, int bytes) {
  if constexpr (S == kStateStages) {
    allow_dynamic_smem(k, bytes);
  } else {
    (void)allow_max_shared(k, bytes);
  }
}

// The kTma kernel where it can run (sm_90 code on an sm_90 device, both maps encodable,
// the weights 16-byte aligned for the bulk copy); false (nothing launched) otherwise.
template <typename T, int D, bool ENTRY, int S>
bool launch_state_tma(const StateArgs& a, unsigned grid, cudaStream_t s) {
  auto k = tc_state_kernel<T, D, ENTRY, true, StateTmaArgs, S>;
  if (!lasp2::delta::gpu::runs_sm90(k) || a.g.n <= 0 || a.wmeta == nullptr ||
      reinterpret_cast<uintptr_t>(a.wmeta) % 16 != 0)
    return false;
  StateTmaArgs ta;
  static_cast<StateArgs&>(ta) = a;
  if (!encode_tile_map<T, D>(&ta.map[0], ta.hdim[0], ta.tdim[0], ta.bdim[0], a.a, a.g, a.da) ||
      !encode_tile_map<T, kStateDB>(&ta.map[1], ta.hdim[1], ta.tdim[1], ta.bdim[1], a.b, a.g, a.db))
    return false;
  constexpr int smem = StateLayout<D, S>::kTmaBytes;  // + the S stage barriers
  allow_state_smem<S>(reinterpret_cast<const void*>(k), smem);
  launch_kernel("tc_state_kernel", k, grid, 2 * D, smem, s, ta);
  return true;
}

// The kTma kernel unless forced off (LASP2_CUDA_TILE_COPY=cp_async) or it cannot run, then
// the cp.async kernel; S copy stages.
template <typename T, int D, int S>
void launch_state_t(const StateArgs& a, bool entry, cudaStream_t s) {
  const int smem = StateLayout<D, S>::kBytes;
  const unsigned grid = static_cast<unsigned>(a.g.bh() * a.segs * a.nsub * (D / kStateDB));
  g_last_stages.store(S, std::memory_order_relaxed);
  if (grid > 0 && !tile_copy_forced_cp_async() &&
      (entry ? launch_state_tma<T, D, true, S>(a, grid, s) : launch_state_tma<T, D, false, S>(a, grid, s)))
    return;
  if (entry) {
    auto k = tc_state_kernel<T, D, true, false, StateArgs, S>;
    allow_state_smem<S>(reinterpret_cast<const void*>(k), smem);
    launch_kernel("tc_state_kernel", k, grid, 2 * D, smem, s, a);
  } else {
    auto k = tc_state_kernel<T, D, false, false, StateArgs, S>;
    allow_state_smem<S>(reinterpret_cast<const void*>(k), smem);
    launch_kernel("tc_state_kernel", k, grid, 2 * D, smem, s, a);
  }
}

// The byte counts of the rings tc_state_stages_ok accepts: the kTma kernel's (the larger).
template <int S>
int state_smem_of(int D) {
  return D == 64 ? StateLayout<64, S>::kTmaBytes : StateLayout<128, S>::kTmaBytes;
}

}  // namespace

int tc_state_smem(int D) { return D == 64 ? StateLayout<64>::kBytes : StateLayout<128>::kBytes; }

int tc_state_stages_smem(int D, int stages) {
  switch (stages) {
    case 3:
      return state_smem_of<3>(D);
    case 4:
      return state_smem_of<4>(D);
    case 6:
      return state_smem_of<6>(D);
    default:
      return -1;  // not built
  }
}

int tc_state_last_stages() { return g_last_stages.load(std::memory_order_relaxed); }

void launch_tc_state(Elem e, int D, const StateArgs& a, bool entry, cudaStream_t s, int stages) {
  dispatch_tc(e, D, [&](auto t, auto d) {
    using T = decltype(t);
    constexpr int kD = decltype(d)::value;
    if (stages == 4) launch_state_t<T, kD, 4>(a, entry, s);
    else if (stages == 6) launch_state_t<T, kD, 6>(a, entry, s);
    else launch_state_t<T, kD, kStateStages>(a, entry, s);
  });
}

}  // namespace lasp2::cuda
