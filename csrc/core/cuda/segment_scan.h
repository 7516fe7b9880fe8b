// The scan over segment states (misc_kernels.cu). Every caller scans in place from zero
// since session 28 (the kept states are scanned from zero, valid for any entering state,
// which launch_add_through_segments adds); `init`, a separate M and `m_out` have no caller
// left. Apart from launch.h, which every kernel file includes, so that this declaration
// recompiles none of them.
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

// Scans the segment states M[bh][nseg][elems] (each one M's plus its walked `pieces`) with
// the segments' log decays segL:
//   prefix (forward): X[s] <- state entering segment s, starting from `init`;
//                     `final_out` (nullable) <- state leaving the last segment,
//                     `log_out` (nullable) <- sum of segL (-inf if any is -inf)
//   suffix (reverse): X[s] <- gradient of the state leaving segment s, starting
//                     from `init` (gradient leaving the part); `final_out` <-
//                     gradient of the state entering the part.
// X (same layout as M; M itself for an in-place scan) is written only with write_segments.
// m_out (nullable; not X): each segment whose pieces walked gets its summed state there
// (M's own buffer: the states kept for a later pass are then whole).
// last_unread: the last segment in scan order (prefix: nseg - 1, suffix: 0) has no state
// (its walk was left out: only final_out would read it, which must then be null); its M
// and pieces are not read, and m_out, if given, gets zeros in its slot.
void launch_segment_scan(float* X, const float* M, const float* segL, int64_t bh, int nseg,
                         int64_t elems, bool suffix, bool write_segments, const float* init,
                         float* final_out, float* log_out, const StatePieces& pieces,
                         float* m_out, bool last_unread, cudaStream_t s);

}  // namespace lasp2::cuda
