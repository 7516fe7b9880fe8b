// The device values of the per-call cross-rank consistency check (docs/reliability.md,
// csrc/torch/group_check.h): what a staged value's int64 slot holds. One definition for
// the CUDA kernel (cuda/consistency_kernels.cu) and the CPU path (group_check.cpp), so a
// CPU group and a CUDA group compute the same bits for the same tensor.
//
//  - kDigest: a bit-exact digest of a float tensor: the wrap-around int64 sum over its
//    elements i of mix(b_i) * w_i, b_i the bits of the element as float64, mix(b) =
//    b ^ (b >> 29) (arithmetic shift), w_i = (i * 2654435761 + 40503) | 1 (odd,
//    position-sensitive). A sum modulo 2^64 does not depend on the order of its terms, so
//    a parallel reduction gives exactly the sequential value.
//  - kMax: the float64 bits of the tensor's maximum (NaN if it holds a NaN, as
//    torch.amax; a bool tensor counts as 0 / 1): only its sign is compared ("positive").
// An absent or empty value's slot is 0.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define LASP2_HOST_DEVICE __host__ __device__
#else
#define LASP2_HOST_DEVICE
#endif

namespace lasp2::consistency {

enum Kind : int { kDigest = 0, kMax = 1 };

LASP2_HOST_DEVICE inline int64_t double_bits(double x) {
  int64_t b;
  memcpy(&b, &x, sizeof(b));
  return b;
}

// element i's term of a kDigest sum (unsigned: wrap-around arithmetic, no overflow UB)
LASP2_HOST_DEVICE inline uint64_t digest_term(double x, int64_t i) {
  const int64_t b = double_bits(x);
  const uint64_t mixed = static_cast<uint64_t>(b ^ (b >> 29));
  const uint64_t weight = (static_cast<uint64_t>(i) * 2654435761ULL + 40503ULL) | 1ULL;
  return mixed * weight;
}

// the running maximum of kMax: NaN, once met, stays (as torch.amax)
LASP2_HOST_DEVICE inline double max_step(double running, double x) {
  return (x > running || x != x) && running == running ? x : running;
}

// A call's device values folded into its LASP-2 AllGather (lasp2/call_check.h): rank r's
// word i is the int64 held by the fp32 slots gathered[r * rank_stride + 2 i], [.. + 1], the
// low half first (the slots are moved, never computed on, so the bits arrive as sent).
LASP2_HOST_DEVICE inline int64_t gathered_word(const float* gathered, int64_t rank_stride, int r, int i) {
  uint32_t lo, hi;
  memcpy(&lo, gathered + r * rank_stride + 2 * i, sizeof(lo));
  memcpy(&hi, gathered + r * rank_stride + 2 * i + 1, sizeof(hi));
  return static_cast<int64_t>(static_cast<uint64_t>(hi) << 32 | lo);
}

// The words fail exactly when the check will raise for them later (group_check.cpp's
// compare): a digest word differs between two ranks, or a kMax word (bit i of max_mask)
// holds a positive float64 on some rank (a NaN maximum is not positive, as there).
LASP2_HOST_DEVICE inline bool words_fail(const float* gathered, int64_t rank_stride, int world, int count,
                                         uint32_t max_mask) {
  for (int i = 0; i < count; ++i) {
    const int64_t first = gathered_word(gathered, rank_stride, 0, i);
    for (int r = 0; r < world; ++r) {
      const int64_t w = r == 0 ? first : gathered_word(gathered, rank_stride, r, i);
      if (max_mask >> i & 1u) {
        double value;
        memcpy(&value, &w, sizeof(value));
        if (value > 0) return true;
      } else if (w != first) {
        return true;
      }
    }
  }
  return false;
}

}  // namespace lasp2::consistency
