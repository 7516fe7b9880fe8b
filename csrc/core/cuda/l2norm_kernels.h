// Launchers of the fused L2 norm's two kernels (lasp2/qk_l2norm.h): each runs every row
// of up to two tensors (q and k) in one launch, one warp per row. Host compiler only
// sees these declarations (qk_l2norm.cpp calls them).
#pragma once

#include <cuda_runtime.h>

#include "lasp2/qk_l2norm.h"

namespace lasp2::cuda {

void launch_l2norm_forward(const L2NormForwardArgs& a, cudaStream_t stream);
void launch_l2norm_backward(const L2NormBackwardArgs& a, cudaStream_t stream);

}  // namespace lasp2::cuda
