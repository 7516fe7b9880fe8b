// What the forward (delta_chunk_states.cu) and reverse (delta_chunk_rstates.cu) state
// passes of the chunked GDN share: the 8-warp passes' products and decays, the choice of
// pass (LASP2_DELTA_STATE_KERNEL) and the tensor-map passes' token maps and launch.
// Included by .cu files only; internal linkage.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_launch.cuh"
#include "delta_rule/cuda/delta_chunk_tma.cuh"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- the state passes with 8 warps a block ---------------------------------------------------
// The tiles of fwd_state_kernel / rev_state_kernel with 8 warps a block: two on each
// scheduler, so that one warp's dependent instructions (the mma chains, the epilogues'
// loads and exponentials) hide behind the other's. The ncu profile of the 4-warp passes
// (T = 16K, H = 16, D = 128 on an H200) showed one warp a scheduler stalled 3.5 of every
// 4.5 cycles, mostly on fixed-latency dependencies, and L2 throughput at 76 %. Token
// products: warp w takes tokens 16 (w % 4) .. and C / 16 n8 tiles of columns from
// C / 2 (w / 4) (k-steps in two chains); state products: state rows 16 w .. 16 w + 15
// (d = 128 only), the chunk's tokens in two halves (chains of two).

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
  add_frags(acc, odd);
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
  add_frags(acc, hi);
}

// ---- host: which pass runs, and the tensor-map passes' launch --------------------------
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
inline StatePass state_pass() {
  constexpr StatePass kNamed[] = {StatePass::kTile, StatePass::kW8, StatePass::kW8Calc, StatePass::kTma};
  const int i = env_choice("LASP2_DELTA_STATE_KERNEL", {"tile", "w8", "w8calc", "tma"}, -1);
  return i < 0 ? StatePass::kDefault : kNamed[i];
}

// LASP2_DELTA_STATE_KERNEL=tma where its kernels cannot run: an error, not a silent w8
// (the tests compare the two).
[[noreturn]] inline void fail_tma_unavailable() {
  fail("lasp2 (CUDA delta rule, chunked): LASP2_DELTA_STATE_KERNEL=tma needs sm_90 "
       "and tensor-map strides (16-byte multiples)");
}

// ---- the tensor maps of fwd_state_kernel_tma and rev_state_kernel_tma -------------------

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

}  // namespace
}  // namespace lasp2::delta::gpu
