// One step of the prefix scan over segment states, shared by the scan kernel
// (misc_kernels.cu) and the output / dq kernels that fold the scan into their prologue
// (tc_forward.cu, LASP2_CUDA_SCAN_FOLD): both must round alike, so the expression is
// pinned here as one fused multiply-add (what nvcc contracted `__expf(L) * acc + m` to
// before session 21: the same PTX).
#pragma once

namespace lasp2::cuda {

// The decay weight of a segment of log decay L (exp(-inf) = 0: a document start or a -inf
// gate blocks the state).
__device__ __forceinline__ float segment_decay(float L) { return __expf(L); }

// The state leaving a segment of decay weight w (segment_decay) that `acc` entered and
// whose own state is m (w = 0: m, for a finite acc).
__device__ __forceinline__ float segment_scan_step(float w, float acc, float m) {
  return __fmaf_rn(acc, w, m);
}

}  // namespace lasp2::cuda
