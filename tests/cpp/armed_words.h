// The core tests of "NaN at the call" (lasp2/call_check.h; test_call_check.cpp and
// cuda/test_cuda_call_check.cpp): the words a rank arms, as the cross-rank check would
// (digests, and maxima held as float64 bits).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#include "lasp2/call_check.h"

namespace lasp2::testing {

inline int64_t bits_of(double x) {
  int64_t b;
  std::memcpy(&b, &x, sizeof(b));
  return b;
}

// Arms `words` (on `device`, as the check's ring entry) for the next forward of this thread.
inline void arm_words(const int64_t* words, std::size_t count, uint32_t max_mask, Device device) {
  CallCheck check;
  check.words = words;
  check.count = static_cast<int>(count);
  check.max_mask = max_mask;
  check.device = device;
  arm_call_check(check);
}

}  // namespace lasp2::testing
