// The chunk-parallel backward of the chunked KDA kernels (kda_chunk_bwd.cu). With prep's
// T (KdaPrep::t), the state pass's v_new and 16-bit state h_c entering each chunk, rprep's
// r = -(P^T dO) and the reverse pass's 16-bit gradient dh_c of the state leaving each
// chunk (launch_kda_rstates), every chunk's dq, dk, dv, dg (per key dim) and dbeta follow
// from the chunk alone: one block of 8 warps per (chunk, b, h).
// The math, per chunk (U = v_new, S0 = h_c, X = dh_c; G_x the within-segment cumulative
// log gate, a d_k vector; ent_x = e^{G_x} [s_x = 0], dd_y = e^{G_last - G_y} [s_y =
// s_last], kd = dd . K; every decay e^{G_x - G_y} below is per element, y <= x in one
// segment; see docs/history/delta-rule-log.md, "The KDA chunked backward"):
//   dU = kd X - r,  dB = T^T dU,  dv = diag(beta) dB
//   dP = scale (dO U^T) [y <= x],  dL = -(dB U^T) [y < x]
//   dq_x = scale ent_x . (dO S0^T)_x + sum_y dP_xy e^{G_x - G_y} . k_y
//   R_x  = sum_y dL_xy e^{G_x - G_y} . k_y
//   dk_y = dd_y . (U X^T)_y - beta_y Z_y + beta_y R_y + sum_x dP_xy e^{G_x - G_y} . q_x
//          + sum_x beta_x dL_xy e^{G_x - G_y} . k_x,    Z = ent . (dB S0^T)
//   dbeta_x = dB_x . v_x - k_x . Z_x + k_x . R_x
//   dG_x = q_x . dq_x + k_x . (-beta Z + beta R - dd . (U X^T) - (the two sums over x))_x,
//          and at the chunk's last token + sum_y kd_y . (U X^T)_y + e^{G_last} . rowdot(X, S0)
//   dg_t = sum of dG_x over x >= t in t's segment (0 at a segment's first token)
// The sums over tokens factor between 16-token sub-chunks at a sub-chunk's first or
// last token (both factors <= 1); inside a sub-chunk each (x, y, dim) takes one
// exponential for both row sums and one for both column sums.
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/kda_chunk.h"

namespace lasp2::delta::gpu {

struct KdaBackwardArgs {
  View dout;
  const void* v_new = nullptr;   // [bh][nchunks * 64][dv], 16-bit
  const void* states = nullptr;  // [bh][nchunks][dk][dv], 16-bit: the state entering each chunk
  const void* dh = nullptr;      // [bh][nchunks][dk][dv], 16-bit: the gradient of the state leaving each chunk
  const void* t = nullptr;       // [bh][nchunks][64][64], 16-bit: T (KdaPrep::t)
  const void* r = nullptr;       // [bh][nchunks * 64][dv], 16-bit: -(P^T dO)
  // dq also carries its first term (scale ent . dO S0^T) between two steps of the block
  void* dq = nullptr;
  int64_t dqsb = 0, dqst = 0, dqsh = 0;
  void* dk = nullptr;
  int64_t dksb = 0, dkst = 0, dksh = 0;
  void* dv = nullptr;
  int64_t dvsb = 0, dvst = 0, dvsh = 0;
  float* dg = nullptr;     // nullable: [B, T, H, dk] contiguous
  float* dbeta = nullptr;  // nullable: [B, T, H] contiguous
};

// Shared memory one block of launch_kda_backward needs for head dim d (64 or 128).
int kda_backward_smem_bytes(int d);

void launch_kda_backward(const Problem& p, const KdaBackwardArgs& a, cudaStream_t s);

}  // namespace lasp2::delta::gpu
