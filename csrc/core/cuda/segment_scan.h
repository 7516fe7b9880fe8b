// The scan over segment states (misc_kernels.cu), in place and from zero: the states kept
// this way hold for any entering state, which launch_add_through_segments adds where one
// enters (session 28). Apart from launch.h, which every kernel file includes, so that this
// declaration recompiles none of them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lasp2::cuda {

// The later pieces of a split segment-state walk (launch.h: StateArgs::sub_out, sub_flags,
// nsub): the scan that reads the segment states next adds them to each segment's state
// (in walk order, walked pieces only: the same bits as the kernel of its own that added
// them before session 15, shown on an H200), so that the split costs no launch. nsub = 1: none.
struct StatePieces {
  const float* sub_out = nullptr;    // [bh][nseg][nsub - 1][elems]
  const float* sub_flags = nullptr;  // [bh][nseg][nsub - 1]: 1 if that piece walked any chunk
  int nsub = 1;
};

// Scans the segment states X[bh][nseg][elems] (each one its own walk plus its walked
// `pieces`) with the segments' log decays segL, from zero, in place:
//   prefix (forward): X[s] <- state entering segment s from the part's own tokens;
//                     `final_out` (nullable) <- state leaving the last segment,
//                     `log_out` (nullable) <- sum of segL (-inf if any is -inf)
//   suffix (reverse): X[s] <- gradient of the state leaving segment s from the part's
//                     own outputs; `final_out` <- gradient of the state entering the part.
// X is written only with write_segments (else it is read alone).
// last_unread: the last segment in scan order (prefix: nseg - 1, suffix: 0) has no state
// (its walk was left out: only final_out would read it, which must then be null); its slot
// and pieces are not read.
void launch_segment_scan(float* X, const float* segL, int64_t bh, int nseg, int64_t elems, bool suffix,
                         bool write_segments, float* final_out, float* log_out, const StatePieces& pieces,
                         bool last_unread, cudaStream_t s);

}  // namespace lasp2::cuda
