// The 8-warp chunk-gradient kernel of the KDA chunked backward (kda_chunk_bwd_wide.cu),
// the default of launch_kda_backward (kda_chunk_bwd.h), which keeps the earlier 4-warp
// kernel for an A/B (LASP2_DELTA_KDA_BWD_KERNEL=old). Same inputs, same outputs.
// LASP2_DELTA_KDA_BWD_KERNEL=serial runs this kernel without its loads ahead.
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/kda_chunk_bwd.h"

namespace lasp2::delta::gpu {

// Shared memory one block of the 8-warp kernel needs for head dim d (64 or 128).
int kda_backward_wide_smem_bytes(int d);

// ahead: the global loads issued ahead of their use (the default); false: as the kernel
// landed in session 11 (LASP2_DELTA_KDA_BWD_KERNEL=serial, for the A/B).
void launch_kda_backward_wide(const Problem& p, const KdaBackwardArgs& a, bool ahead, cudaStream_t s);

}  // namespace lasp2::delta::gpu
