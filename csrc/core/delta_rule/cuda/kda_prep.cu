// The KDA chunk prep, launch_kda_prep (kda_chunk.h): per chunk qg, kd, eL, P, T, w and u
// (KdaPrep) with the per-key decays as products of per-token gate factors and every
// pair of a chunk's L and P on tensor cores, 8 warps a block.
//
// Decays as products. With gamma_t = e^{g_t} (the log gate clamped at kKdaGateFloor;
// 1 at a segment start and past the part or the head), e^{G_x - G_y} is the product of
// gamma over (y, x]: one exponential a token and dim (8192 a chunk at d = 128, where an
// exponential a pair and dim inside the 16-token sub-chunks takes about 115000), the
// rest products of factors <= 1, so nothing overflows and a factor that underflows
// scales a term that small anyway.
//
// Levels. A pair y < x of the chunk's 64 tokens has a highest differing bit m of x and
// y (0..5); with r = x with its bits below m cleared (y < r <= x), e^{G_x - G_y} =
// e^{G_x - G_r} e^{G_r - G_y}, both <= 1. So level m scales every token once: by
// e^{G_x - G_r} if bit m of x is set (the upper half of its 2^{m+1}-token block) and by
// e^{G_r - G_y} if not (r: the first token of the block's upper half), giving the 16-bit
// tiles ks = k . f and qs = q . f; the level's pairs are entries of ks ks^T (L) and
// qs ks^T (P) at rows of upper halves and columns of the lower half of the same block.
// Levels 0..3 pair tokens inside a 16-token sub-chunk X (the diagonal tile of X, its
// entries of level m picked out), level 4 sub-chunk 1 with 0 and 3 with 2, level 5
// sub-chunks 2, 3 with 0, 1: six levels of 16 x 16 x d mma tiles (fp32 sums of 16-bit
// products). P's diagonal P_xx = scale q_x . k_x comes at the level of x's lowest set
// bit (where its factor is 1); the sub-chunks' first tokens from a dot product.
//
// Threads. For the factors, thread (X = warp / 2, dims i, i + 1) keeps its 16 tokens'
// gamma in registers and walks them (prefix and suffix products; the sub-chunks'
// first-token factors and the products of their other 15 are shared), reading q and k
// from shared memory (q and k in registers too took 160-200 registers). Levels 0..3
// touch only sub-chunk X's rows, formed and multiplied by warps 2 X and 2 X + 1: a
// barrier of those two warps between the steps; block barriers around levels 4 and 5.
// 98 KiB of shared memory and at most 128 registers at d = 128: two blocks (16 warps)
// an SM.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/delta_chunk_invert.cuh"
#include "delta_rule/cuda/kda_chunk.h"

namespace lasp2::delta::gpu {
namespace {

using lasp2::cuda::exp_ftz;

constexpr int kThreads = 256;    // 8 warps
constexpr int kSubs = CH / 16;   // 16-token sub-chunks
constexpr const char* kWho = "lasp2 (CUDA KDA, chunked)";

// Hides x's value from the compiler: each level's products start from such a value, so
// that no product chain (and no unpacked q, k) is shared between levels and kept live
// across them (which took the kernel to 255 registers).
template <typename V>
__device__ __forceinline__ V opaque(V x) {
  if constexpr (sizeof(V) == 4 && std::is_same_v<V, float>) {
    asm volatile("" : "+f"(x));
  } else {
    asm volatile("" : "+r"(x));
  }
  return x;
}

// The barrier of warps 2 X and 2 X + 1: named barrier 1 + X (0 is __syncthreads'), as
// immediates (a register id makes ptxas reserve all 16 barriers).
__device__ __forceinline__ void pair_sync(int X) {
  switch (X) {
    case 0: asm volatile("bar.sync 1, 64;" ::: "memory"); break;
    case 1: asm volatile("bar.sync 2, 64;" ::: "memory"); break;
    case 2: asm volatile("bar.sync 3, 64;" ::: "memory"); break;
    default: asm volatile("bar.sync 4, 64;" ::: "memory"); break;
  }
}

template <typename T, int D>
struct KdaLevelSmem {
  static constexpr int LD = TcTile<D>::LD;
  // the level's tiles k . f (ks) and q . f (qs), and k, q; after the levels
  // (e^G . k) [s = 0] over ks, T (fp32) over qs and k, v over q
  T ks[CH * LD];
  T qs[CH * LD];
  T k[CH * LD];
  T q[CH * LD];
  float L[CH * LDL];  // after the inversion T diag(beta), 16-bit [64][kLdP]
  T ps[CH * kLdP];    // P
  float gfirst[kSubs][D];  // per sub-chunk and dim: its first token's gamma
  float gtail[kSubs][D];   // and the product of its other 15
  float bt[CH], s[CH], start[CH], pdiag[kSubs];
};

// Level M's tiles of this thread's sub-chunk X and dims (i, i + 1): ks = k . f and
// qs = q . f (all 16 rows; P reads qs at upper-half rows only).
template <typename T, int D, int M>
__device__ __forceinline__ void produce_level(KdaLevelSmem<T, D>& sm, const float (&gam)[16][2], int X, int i) {
  constexpr int LD = TcTile<D>::LD;
  auto put = [&](int a, float f0, float f1) {
    const int at = (16 * X + a) * LD + i;
    const float2 q2 = unpack2<T>(load_u32(sm.q + at)), k2 = unpack2<T>(load_u32(sm.k + at));
    store_u32(sm.ks + at, pack2<T>(k2.x * f0, k2.y * f1));
    store_u32(sm.qs + at, pack2<T>(q2.x * f0, q2.y * f1));
  };
  if constexpr (M < 4) {
    constexpr int h = 1 << M;
    float r0 = opaque(1.f), r1 = opaque(1.f);
#pragma unroll
    for (int a = 0; a < 16; ++a) {  // upper halves: the product over (r, a]
      if (!(a & h)) continue;
      if (a & (h - 1)) {
        r0 *= gam[a][0];
        r1 *= gam[a][1];
      } else {
        r0 = opaque(1.f);
        r1 = opaque(1.f);
      }
      put(a, r0, r1);
    }
#pragma unroll
    for (int a = 15; a >= 0; --a) {  // lower halves: the product over (a, r]
      if (a & h) continue;
      if ((a + 1) & (h - 1)) {
        r0 *= gam[a + 1][0];
        r1 *= gam[a + 1][1];
      } else {  // a + 1 = r
        r0 = opaque(gam[a + 1][0]);
        r1 = opaque(gam[a + 1][1]);
      }
      put(a, r0, r1);
    }
  } else {
    const bool upper = M == 4 ? (X & 1) != 0 : X >= 2;
    if (upper) {  // (r, x]: r = 16 X, or r = 32 for X = 3 at level 5 (33..47, then 48..x)
      float r0 = opaque(1.f), r1 = opaque(1.f);
      if (M == 5 && X == 3) {
        r0 = opaque(sm.gtail[2][i] * gam[0][0]);
        r1 = opaque(sm.gtail[2][i + 1] * gam[0][1]);
      }
#pragma unroll
      for (int a = 0; a < 16; ++a) {
        if (a > 0) {
          r0 *= gam[a][0];
          r1 *= gam[a][1];
        }
        put(a, r0, r1);
      }
    } else {  // (x, r]: r = 16 (X + 1), or r = 32 for X = 0 at level 5 (then 16..32)
      const int n = M == 4 ? X + 1 : 2;
      float r0 = sm.gfirst[n][i], r1 = sm.gfirst[n][i + 1];
      if (M == 5 && X == 0) {
        r0 *= sm.gfirst[1][i] * sm.gtail[1][i];
        r1 *= sm.gfirst[1][i + 1] * sm.gtail[1][i + 1];
      }
      r0 = opaque(r0);
      r1 = opaque(r1);
#pragma unroll
      for (int a = 15; a >= 0; --a) {
        put(a, r0, r1);
        r0 *= gam[a][0];
        r1 *= gam[a][1];
      }
    }
  }
}

// Level M's products: warp -> (rows of sub-chunk X, columns of sub-chunk Y, L or P);
// the level's entries into L (fp32, beta_x [same segment]) and P (scale [same segment]).
template <typename T, int D, int M>
__device__ __forceinline__ void consume_level(KdaLevelSmem<T, D>& sm, float scale, int warp, int lane) {
  constexpr int LD = TcTile<D>::LD;
  const bool pq = (warp & 1) != 0;  // P (q rows) or L (k rows)
  int X, Y;
  if constexpr (M < 4) {
    X = Y = warp >> 1;
  } else if constexpr (M == 4) {
    if (warp >= 4) return;
    X = 2 * (warp >> 1) + 1;
    Y = X - 1;
  } else {
    X = 2 + (warp >> 2);
    Y = (warp >> 1) & 1;
  }
  float acc[2][4];
  zero(acc);
  mma_acc<T, 2, false, true>(acc, pq ? sm.qs : sm.ks, LD, sm.ks, LD, 16 * X, 16 * Y, 0, D / 16, 1, lane);
  for_pairs<2>(0, lane, [&](int nt, int hf, int a, int b0) {
#pragma unroll
    for (int par = 0; par < 2; ++par) {
      const int b = b0 + par, x = 16 * X + a, y = 16 * Y + b;
      bool pair = true, diag = false;
      if constexpr (M < 4) {
        const int ha = a >> M, hb = b >> M;
        pair = (ha ^ hb) == 1 && (ha & 1) != 0;
        diag = a == b && (ha & 1) != 0 && (a & ((1 << M) - 1)) == 0;
      }
      const bool in = sm.s[x] == sm.s[y];
      const float v = acc[nt][2 * hf + par];
      if (!pq && pair) sm.L[x * LDL + y] = in ? sm.bt[x] * v : 0.f;
      if (pq && (pair || diag)) sm.ps[x * kLdP + y] = from_float<T>(in ? scale * v : 0.f);
    }
  });
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) kda_prep_kernel(Problem p, KdaPrep out) {
  constexpr int LD = TcTile<D>::LD;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  KdaLevelSmem<T, D>& sm = *reinterpret_cast<KdaLevelSmem<T, D>*>(smem_raw);
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const ChunkPos cp = chunk_pos(p, blockIdx.x, blockIdx.y);
  const int64_t chunk = cp.bh * chunk_count(p) + cp.c;
  // past the head (head maps only) and past the part: identity transitions
  const int head_end = out.head_end != nullptr ? out.head_end[cp.b] : -1;
  auto live = [&](int x) { return x < cp.nvalid && (head_end < 0 || cp.c * CH + x < head_end); };
  // the factor phases' owner of sub-chunk X, dims (i, i + 1) (d = 64: the even warps)
  const int X = warp >> 1, i = 2 * (32 * (warp & 1) + lane);
  const bool owner = i < D;
  load_chunk_rows<T, D, kThreads>(sm.k, p.k, cp, tid);
  load_chunk_rows<T, D, kThreads>(sm.q, p.q, cp, tid);
  cp_async_commit();
  if (tid < CH) {
    const int x = tid;
    const int64_t t = cp.t0 + x;
    const bool valid = live(x);
    sm.bt[x] = valid ? p.beta[cp.b * p.bsb + t * p.bst + cp.h * p.bsh] : 0.f;
    sm.start[x] = valid && p.doc_start != nullptr && p.doc_start[cp.b * p.doc_sb + t] != 0 ? 1.f : 0.f;
  }
  if (tid < kSubs) sm.pdiag[tid] = 0.f;
  for (int e = tid; e < static_cast<int>(sizeof(sm.ps) / 16); e += kThreads)
    reinterpret_cast<uint4*>(sm.ps)[e] = make_uint4(0u, 0u, 0u, 0u);  // P above the diagonal
  float gam[16][2] = {};  // the raw log gates, then gamma
  if (owner) {
    const float* gp = p.g + cp.b * p.gsb + cp.t0 * p.gst + cp.h * p.gsh + i;
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      const int x = 16 * X + a;
      if (x < cp.nvalid) {
        gam[a][0] = gp[x * p.gst];
        gam[a][1] = gp[x * p.gst + 1];
      }
    }
  }
  cp_async_wait_all();
  __syncthreads();
  if (tid < CH) {  // the segment index: document starts up to x (warps 0 and 1, whole)
    const unsigned lo = __ballot_sync(0xffffffffu, sm.start[lane] != 0.f);
    const unsigned hi = __ballot_sync(0xffffffffu, sm.start[32 + lane] != 0.f);
    const unsigned upto = (2u << lane) - 1u;  // lanes 0..lane (all at lane 31)
    sm.s[tid] = static_cast<float>(tid < 32 ? __popc(lo & upto) : __popc(lo) + __popc(hi & upto));
  }
  if (owner) {
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      const int x = 16 * X + a;
      const bool use = live(x) && sm.start[x] == 0.f;
#pragma unroll
      for (int j = 0; j < 2; ++j) gam[a][j] = use ? exp_ftz(fmaxf(gam[a][j], kKdaGateFloor)) : 1.f;
    }
    float t0 = 1.f, t1 = 1.f;
#pragma unroll
    for (int a = 1; a < 16; ++a) {
      t0 *= gam[a][0];
      t1 *= gam[a][1];
    }
    sm.gfirst[X][i] = gam[0][0];
    sm.gfirst[X][i + 1] = gam[0][1];
    sm.gtail[X][i] = t0;
    sm.gtail[X][i + 1] = t1;
    // P's diagonal at the sub-chunk's first token (no level pairs it with itself)
    const float2 q0 = unpack2<T>(load_u32(sm.q + 16 * X * LD + i)), k0 = unpack2<T>(load_u32(sm.k + 16 * X * LD + i));
    float dot = q0.x * k0.x + q0.y * k0.y;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, o);
    if (lane == 0) atomicAdd(&sm.pdiag[X], dot);
  }
  __syncthreads();
  const float sL = sm.s[CH - 1];
  if (tid < kSubs) sm.ps[16 * tid * kLdP + 16 * tid] = from_float<T>(p.scale * sm.pdiag[tid]);
  // E: the product of the earlier sub-chunks' gammas (e^{G} at this one's start)
  float E[2] = {1.f, 1.f};
  if (owner) {
    float Z[2] = {1.f, 1.f}, all[2] = {1.f, 1.f};
#pragma unroll
    for (int Y = 0; Y < kSubs; ++Y)
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const float tot = sm.gfirst[Y][i + j] * sm.gtail[Y][i + j];
        if (Y < X) E[j] *= tot;
        if (Y > X) Z[j] *= tot;
        all[j] *= tot;
      }
    // qg = scale e^{G_x} . q [s = 0], kd = e^{G_last - G_x} . k [s = s_last], eL
    T* qg = static_cast<T*>(out.qg) + (cp.row0 + 16 * X) * D + i;
    T* kd = static_cast<T*>(out.kd) + (cp.row0 + 16 * X) * D + i;
    float r0 = opaque(E[0]), r1 = opaque(E[1]);
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      r0 *= gam[a][0];
      r1 *= gam[a][1];
      const bool first = sm.s[16 * X + a] == 0.f;
      const float2 q2 = unpack2<T>(load_u32(sm.q + (16 * X + a) * LD + i));
      const float a0 = first ? p.scale * r0 : 0.f, a1 = first ? p.scale * r1 : 0.f;
      store_u32(qg + a * D, pack2<T>(q2.x * a0, q2.y * a1));
    }
    r0 = opaque(Z[0]);
    r1 = opaque(Z[1]);
#pragma unroll
    for (int a = 15; a >= 0; --a) {
      const bool last = sm.s[16 * X + a] == sL;
      const float2 k2 = unpack2<T>(load_u32(sm.k + (16 * X + a) * LD + i));
      store_u32(kd + a * D, pack2<T>(last ? k2.x * r0 : 0.f, last ? k2.y * r1 : 0.f));
      r0 *= gam[a][0];
      r1 *= gam[a][1];
    }
    if (X == 0) {
      out.eL[chunk * D + i] = sL == 0.f ? all[0] : 0.f;
      out.eL[chunk * D + i + 1] = sL == 0.f ? all[1] : 0.f;
    }
    produce_level<T, D, 0>(sm, gam, X, i);
  }
  // levels 0..3 read and write only their sub-chunk's rows (warps 2 X and 2 X + 1, which
  // also form them): a barrier of those two warps between the steps; levels 4 and 5
  // pair sub-chunks: block barriers
  pair_sync(X);
#define KDA_LEVEL(M)                                      \
  consume_level<T, D, M>(sm, p.scale, warp, lane);        \
  pair_sync(X);                                           \
  if (owner) produce_level<T, D, (M) + 1>(sm, gam, X, i); \
  pair_sync(X);
  KDA_LEVEL(0)
  KDA_LEVEL(1)
  KDA_LEVEL(2)
#undef KDA_LEVEL
  consume_level<T, D, 3>(sm, p.scale, warp, lane);
  pair_sync(X);
  if (owner) produce_level<T, D, 4>(sm, gam, X, i);
  __syncthreads();
  consume_level<T, D, 4>(sm, p.scale, warp, lane);
  __syncthreads();
  if (owner) produce_level<T, D, 5>(sm, gam, X, i);
  __syncthreads();
  consume_level<T, D, 5>(sm, p.scale, warp, lane);
  __syncthreads();
  {  // P out, 16 bytes a copy
    T* pg = static_cast<T*>(out.p) + chunk * CH * CH;
    for (int e = tid; e < CH * CH / 8; e += kThreads) {
      const int x = e >> 3, c8 = 8 * (e & 7);
      *reinterpret_cast<uint4*>(pg + x * CH + c8) = *reinterpret_cast<const uint4*>(sm.ps + x * kLdP + c8);
    }
  }
  if (owner) {  // (e^G . k) [s = 0], w's operand, over ks
    float r0 = opaque(E[0]), r1 = opaque(E[1]);
#pragma unroll
    for (int a = 0; a < 16; ++a) {
      r0 *= gam[a][0];
      r1 *= gam[a][1];
      const int x = 16 * X + a;
      const bool first = sm.s[x] == 0.f;
      const float2 k2 = unpack2<T>(load_u32(sm.k + x * LD + i));
      store_u32(sm.ks + x * LD + i, pack2<T>(first ? k2.x * r0 : 0.f, first ? k2.y * r1 : 0.f));
    }
  }
  // q is done with: v over it, in flight while T is formed
  load_chunk_rows<T, D, kThreads>(sm.q, p.v, cp, tid);
  cp_async_commit();
  __syncthreads();  // k is read: T goes over qs and k
  float* Tm = reinterpret_cast<float*>(sm.qs);
  invert_unit_lower<kThreads>(sm.L, Tm, tid);
  // tb = T diag(beta) (16-bit, over L; entries above T's diagonal blocks are unwritten: zero here)
  T* tb = reinterpret_cast<T*>(sm.L);
  T* tg = out.t != nullptr ? static_cast<T*>(out.t) + chunk * CH * CH : nullptr;
  for (int e = tid; e < CH * CH; e += kThreads) {
    const int x = e / CH, y = e % CH;
    const float tv = y <= x ? Tm[x * LDL + y] : 0.f;
    tb[x * kLdP + y] = from_float<T>(tv * sm.bt[y]);
    if (tg != nullptr) tg[e] = from_float<T>(tv);
  }
  cp_async_wait_all();
  __syncthreads();
  // w = tb (e^G . k) [s = 0] (warps 0-3), u = tb v (warps 4-7)
  if (warp < 4) {
    lower_product<T, D>(static_cast<T*>(out.w) + cp.row0 * D, tb, sm.ks, warp, lane);
  } else {
    lower_product<T, D>(static_cast<T*>(out.u) + cp.row0 * D, tb, sm.q, warp - 4, lane);
  }
}

template <typename T, int D>
constexpr bool smem_fits() {
  using S = KdaLevelSmem<T, D>;
  return offsetof(S, k) + sizeof(S::k) - offsetof(S, qs) >= CH * LDL * sizeof(float) &&  // T over qs, k
         CH * kLdP * sizeof(T) <= sizeof(S::L) &&                                      // T diag(beta) over L
         sizeof(S::ks) % 16 == 0 && sizeof(S::L) % 16 == 0 && sizeof(S::ps) % 16 == 0;
}
static_assert(smem_fits<__nv_bfloat16, 64>() && smem_fits<__nv_bfloat16, 128>(), "prep tiles alias as laid out");

}  // namespace

void launch_kda_prep(const Problem& p, const KdaPrep& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  // the dims before the element type, as the other KDA launchers (kda_chunk.cu)
  if (p.dk != p.dv || (p.dk != 64 && p.dk != 128)) fail(std::string(kWho) + ": d_k = d_v must be 64 or 128");
  chunk_dispatch<true>(p, kWho, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const int bytes = static_cast<int>(sizeof(KdaLevelSmem<T, D>));
    auto kernel = kda_prep_kernel<T, D>;
    chunk_allow_max_shared(kernel, bytes, kWho, "KDA chunk prep");  // two blocks of d = 128 an SM
    kernel<<<dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())), kThreads, bytes, s>>>(p,
                                                                                                               out);
    chunk_check(cudaGetLastError(), kWho, "KDA chunk prep");
  });
}

}  // namespace lasp2::delta::gpu
