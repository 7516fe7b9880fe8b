// The chunk-parallel backward of the chunked (WY / UT-transform) GDN kernels
// (delta_chunk_bwd.cu). With the 16-bit state h_c entering each chunk and v_new
// (launch_chunk_states), the 16-bit gradient dh_c of the state leaving each chunk
// (launch_chunk_rstates), the chunk's meta {G, s} and T (launch_chunk_prep) and r =
// -(P^T dO) (launch_chunk_rprep), every chunk's dq, dk, dv, dg and dbeta follow from the
// chunk alone: one block per (chunk, b, h) in two phases over the same tiles (under half
// of an SM's shared memory), first the side of dU (dU, dB, dv, dA), then the side of
// the scores and h (dP, dq, the rest of dk, dg, dbeta).
// The math, per chunk (U = v_new, S0 = h_c, X = dh_c; Gam the causal decay of the
// chunk's segments, ent_x = e^{G_x} [s_x = 0], d_y = e^{G_last - G_y} [s_y = s_last],
// T = (I + L)^-1 as in prep; see docs/delta_rule.md):
//   dU = P^T dO + diag(d) K X              P  = scale (Q K^T o Gam)
//   dB = T^T dU,  dv = diag(beta) dB       dL = -(dB U^T) o [y < x, same segment]
//   dq = scale diag(ent) dO S0^T + dP K     dP = scale (dO U^T o Gam)
//   dk = dP^T Q + diag(d) U X^T - diag(beta) Z + dA K + dA^T K,
//        Z = diag(ent) dB S0^T,  dA = dL o diag(beta) Gam
//   dbeta_x = dB_x . v_x - k_x . Z_x + sum_y dL_xy Gam_xy k_x . k_y
//   dg: the gradient of each G_x, summed backwards inside its segment (0 at a
//       segment's first token, whose gate G does not contain)
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/delta_chunk.h"

namespace lasp2::delta::gpu {

struct ChunkBackwardArgs {
  View dout;
  const float* meta = nullptr;     // {G, s} per chunk row (launch_chunk_prep)
  const void* v_new = nullptr;     // [bh][nchunks * 64][dv], 16-bit
  const void* states = nullptr;    // [bh][nchunks][dk][dv], 16-bit: the state entering each chunk
  const void* dh = nullptr;        // [bh][nchunks][dk][dv], 16-bit: the gradient of the state leaving each chunk
  const void* t = nullptr;         // [bh][nchunks][64][64], 16-bit: each chunk's T (launch_chunk_prep)
  const void* r = nullptr;         // [bh][nchunks * 64][dv], 16-bit: -(P^T dO) (launch_chunk_rprep)
  // dq and dk also carry dB and dk's first terms from the first phase to the second in
  // the lean kernel (LASP2_DELTA_CHUNK_BWD_KERNEL=lean, a reference); early (a
  // reference) and ordered (the production form) keep them on the chip
  void* dq = nullptr;
  int64_t dqsb = 0, dqst = 0, dqsh = 0;
  void* dk = nullptr;
  int64_t dksb = 0, dkst = 0, dksh = 0;
  void* dv = nullptr;
  int64_t dvsb = 0, dvst = 0, dvsh = 0;
  float* dg = nullptr;     // nullable: [B, T, H] contiguous
  float* dbeta = nullptr;  // nullable: [B, T, H] contiguous
};

// Shared memory one block of launch_chunk_backward needs for head dim d (64 or 128).
int chunk_backward_smem_bytes(int d);

void launch_chunk_backward(const Problem& p, const ChunkBackwardArgs& a, cudaStream_t s);

}  // namespace lasp2::delta::gpu
