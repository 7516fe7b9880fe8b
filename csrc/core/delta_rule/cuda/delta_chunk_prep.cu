// The chunked GDN prep (delta_chunk.h): per chunk the cumulative gate G and segment
// index s (meta), T = (I + L)^-1, w and u. mma.sync m16n8k16 in the input dtype (fp16 /
// bf16) with fp32 accumulation, 4 warps a block; warp w owns tokens [16 w, 16 w + 16).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_invert.cuh"
#include "delta_rule/cuda/delta_chunk_launch.cuh"
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
  load_chunk_rows<T, D, NT>(sm.k, p.k, cp, tid);
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
    load_chunk_rows<T, D, NT>(sm.v(), p.v, cp, tid);
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

}  // namespace lasp2::delta::gpu
