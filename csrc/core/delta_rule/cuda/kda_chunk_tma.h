// KDA's state passes (forward, part summary, reverse) on whole-tile tensor-map copies
// (sm_90, d_k = d_v = 128; kernels in kda_chunk_tma.cu), behind launch_kda_states,
// launch_kda_summary and launch_kda_rstates (kda_chunk.h), which pick them by
// LASP2_DELTA_KDA_STATE_KERNEL
// (kda_chunk.cu; docs/history/delta-rule-log.md, "KDA state passes on tensor-map copies, thirteenth
// round").
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/kda_chunk.h"

namespace lasp2::delta::gpu {

// The state pass (sum.A null: fo's v_new, 16-bit states, leaving) or the part summary
// (sum) on the tma kernel; false (nothing launched) where it cannot run: d != 128, no
// chunks, a device before sm_90 or a binary without sm_90 code, a tensor map the driver
// refuses. The products run in kda_state_kernel's order: every output equals its bit
// for bit (the epilogue's loads and the state's decay come before the token product,
// the same operations on the same values).
bool launch_kda_states_tma(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& fo,
                           const ChunkSummaryOut& sum, cudaStream_t s);

// The reverse state pass of launch_kda_rstates (after its rprep into r) on the tma
// kernel; false (nothing launched) where it cannot run, as above.
bool launch_kda_rstates_tma(const Problem& p, const KdaPrep& prep, View dout, const void* r, const float* leaving,
                            void* dh, float* entering, cudaStream_t s);

}  // namespace lasp2::delta::gpu
