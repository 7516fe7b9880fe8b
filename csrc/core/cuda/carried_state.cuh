// The weighting of a carried state by a decay weight that a document start or reset makes
// 0, shared by the walking passes (tc_forward.cu, tc_dkdv.cu, generic_kernels.cu). Its own
// header so that the kernels without a carried state keep their includes.
#pragma once

namespace lasp2::cuda {

// A carried state's value x times its weight w (the entry weight of a reading token, the
// through weight of a chunk, a key's exit weight on the reverse walk's state gradient),
// but 0 where w is 0: a document start or reset between the state and its reader skips
// the state instead of multiplying it, so that 0 * inf = NaN from one document's
// non-finite values does not reach the next documents (session 23, as the CPU kernels).
// For a finite x the value of x * w; only a zero's sign can differ (x * 0 is -0 for x < 0).
__device__ __forceinline__ float weigh_carried(float w, float x) { return w == 0.f ? 0.f : x * w; }

}  // namespace lasp2::cuda
