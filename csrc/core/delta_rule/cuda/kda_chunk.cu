// The chunked tensor-core kernels of KDA after prep (kda_prep.cu; see kda_chunk.h): the
// state pass, the output pass, rprep and the reverse state pass, mma.sync m16n8k16 in
// the input dtype (fp16 / bf16) with fp32 accumulation on the GDN chunk kernels' tiles
// and helpers (delta_chunk_common.cuh), 4 warps a block. Warp w owns tokens
// [16 w, 16 w + 16) of a chunk in the token-row products and state rows
// [w d / 4, (w + 1) d / 4) in the state products.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>
#include <string>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_chunk_tma.h"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

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
using KdaStateSmem = StateRingSmem<T, KdaStateBuf<T, D>, 2, D, LDV>;  // ys: v_new of the chunk

// Chunk c's eL (d floats, the gate over the whole chunk: prep's [bh][nchunks][d]) into
// shared memory, D / 4 threads 16 bytes each.
template <int D>
__device__ __forceinline__ void load_chunk_eL(float* dst, const float* eL, const Problem& p, int64_t bh, int c,
                                              int tid) {
  if (tid < D / 4) cp_async16(dst + 4 * tid, eL + (bh * chunk_count(p) + c) * D + 4 * tid, true);
}

template <typename T, int D>
__device__ __forceinline__ void load_kda_chunk(const Problem& p, const KdaPrep& prep, KdaStateBuf<T, D>& B, int c,
                                               int64_t bh, int j0, bool with_u, int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_scratch_rows<T, D, NT>(B.w, prep.w, cp, tid);
  load_scratch_rows<T, D, NT>(B.kd, prep.kd, cp, tid);
  if (with_u) load_cols<T>(B.u, static_cast<const T*>(prep.u) + cp.row0 * D, D, j0, CH, tid);
  load_chunk_eL<D>(B.eL, prep.eL, p, bh, c, tid);
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
  bool amap;  // columns of A: u = 0, from I
  const int j0 = pass_columns<D, BV>(summary, amap);
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
  if (amap) zero_ring_u<T, NT, CH * LDV>(sm.buf, tid);
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
  store_pass_end<D>(fo, sum, amap, bh * se, S, warp * (D / 4), j0, lane);
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
  load_scratch_rows<T, D, NT>(sm.qg, prep.qg, cp, tid);
  load_scratch_rows<T, D, NT>(sm.x, v_new, cp, tid);
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
  load_chunk_rows<T, D, NT>(sm.d, dout, cp, tid);
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
using KdaRevSmem = StateRingSmem<T, KdaRevBuf<T, D>, 2, D, LDV>;

template <typename T, int D>
__device__ __forceinline__ void load_kda_rev_chunk(const Problem& p, const KdaPrep& prep, const View& dout,
                                                   const void* r, KdaRevBuf<T, D>& B, int c, int64_t bh, int j0,
                                                   int tid) {
  const ChunkPos cp = chunk_pos(p, c, bh);
  load_scratch_rows<T, D, NT>(B.w, prep.w, cp, tid);
  load_scratch_rows<T, D, NT>(B.kd, prep.kd, cp, tid);
  load_scratch_rows<T, D, NT>(B.qg, prep.qg, cp, tid);
  load_cols<T>(B.r, static_cast<const T*>(r) + cp.row0 * D, D, j0, CH, tid);
  load_cols<T>(B.d, rows_of<T>(dout, cp.b, cp.h, cp.t0), dout.st, j0, cp.nvalid, tid);
  load_chunk_eL<D>(B.eL, prep.eL, p, bh, c, tid);
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

// Which kernels run KDA's state passes: the forward pass, the part summary and the
// reverse pass (LASP2_DELTA_KDA_STATE_KERNEL, read at every launch: the tests compare
// them): "tile" kda_state_kernel / kda_rev_state_kernel (4 warps, cp.async tiles); "tma"
// kda_state_kernel_tma / kda_rev_state_kernel_tma (8 warps, tensor-map tiles; sm_90,
// d = 128) with the tile kernels' products in their order (every output equal bit for
// bit). Unset: tma where it runs (at 64K on an H200: states 1.47 -> 0.85 ms, summary
// 1.61 -> 0.96, rprep + reverse pass 2.04 -> 1.26; the last step, the epilogue's loads
// and the state's decay before the token product, in the fifteenth round), else tile;
// tma falls back to tile at d = 64; named at d = 128 where the tma kernel cannot run
// (before sm_90), an error. docs/history/delta-rule-log.md, thirteenth round.
enum class KdaStatePass { kTile, kTma };
constexpr KdaStatePass kKdaStateDefault = KdaStatePass::kTma;
struct KdaStateChoice {
  KdaStatePass pass;
  bool named;  // set by the variable (else the default)
};
KdaStateChoice kda_state_pass() {
  constexpr KdaStatePass kNamed[] = {KdaStatePass::kTile, KdaStatePass::kTma};
  const int i = env_choice("LASP2_DELTA_KDA_STATE_KERNEL", {"tile", "tma"}, -1);
  return i < 0 ? KdaStateChoice{kKdaStateDefault, false} : KdaStateChoice{kNamed[i], true};
}

// LASP2_DELTA_KDA_STATE_KERNEL=tma at d = 128 where the tma kernels cannot
// run: an error, not a silent tile (the tests compare the two).
[[noreturn]] void fail_kda_tma_unavailable() {
  fail(std::string(kWho) + ": LASP2_DELTA_KDA_STATE_KERNEL=tma needs an sm_90 device and binary");
}

void kda_state_launch(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo, const ChunkSummaryOut& sum,
                      cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  const KdaStateChoice choice = kda_state_pass();
  if (choice.pass != KdaStatePass::kTile && p.dk == 128 && p.dv == 128) {
    if (launch_kda_states_tma(p, prep, fo, sum, s)) return;
    if (choice.named) fail_kda_tma_unavailable();
  }
  kda_dispatch(p, [&](auto tag, auto dim) {
    using T = decltype(tag);
    constexpr int D = decltype(dim)::value;
    const unsigned cols = (sum.A != nullptr ? 2 : 1) * D / BV;
    kda_launch(kda_state_kernel<T, D>, dim3(cols, static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaStateSmem<T, D>)), s, "KDA chunk state pass", p, prep, fo, sum);
  });
}

}  // namespace

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
    const KdaStateChoice choice = kda_state_pass();
    if (choice.pass != KdaStatePass::kTile && D == 128) {
      if (launch_kda_rstates_tma(p, prep, dout, r, leaving, dh, entering, s)) return;
      if (choice.named) fail_kda_tma_unavailable();
    }
    kda_launch(kda_rev_state_kernel<T, D>, dim3(D / BV, static_cast<unsigned>(p.bh())),
               static_cast<int>(sizeof(KdaRevSmem<T, D>)), s, "KDA chunk reverse state pass", p, prep, dout,
               static_cast<const void*>(r), leaving, dh, entering);
  });
}

}  // namespace lasp2::delta::gpu
