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

}  // namespace lasp2::consistency
