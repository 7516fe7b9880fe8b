// The scan over segment states reading them from one buffer and writing another
// (misc_kernels.cu), for the dq pass that starts from the states its forward kept:
// those stay unscanned, valid for any entering state and for a second backward.
// launch.h's launch_scan is the in-place case (M = X). Apart from launch.h, which
// every kernel file includes, so that this declaration recompiles none of them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lasp2::cuda {

// launch_scan over M[bh][nseg][elems] (only read) into X (same layout; M = X: in place).
void launch_scan_from(float* X, const float* M, const float* segL, int64_t bh, int nseg,
                      int64_t elems, bool suffix, bool write_segments, const float* init,
                      float* final_out, float* log_out, cudaStream_t s);

}  // namespace lasp2::cuda
