// The 8-warp KDA chunk prep (kda_prep.cu): the same outputs as kda_chunk.cu's 4-warp
// prep (KdaPrep, kda_chunk.h), with the per-key decays as products of per-token gate
// factors and every pair of a chunk's L and P on tensor cores. launch_kda_prep
// (kda_chunk.h) picks it unless LASP2_DELTA_KDA_PREP=old.
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/kda_chunk.h"

namespace lasp2::delta::gpu {

void launch_kda_prep_levels(const Problem& p, const KdaPrep& out, cudaStream_t s);

}  // namespace lasp2::delta::gpu
