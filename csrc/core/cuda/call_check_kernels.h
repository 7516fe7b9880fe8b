// Launcher of the kernel that poisons a LASP-2 forward's outputs when the ranks' device
// values, folded into its AllGather, fail (lasp2/call_check.h). Plain structs, so
// csrc/core/sp/call_check.cpp compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lasp2::cuda {

constexpr int kMaxPoisonViews = 4;

struct PoisonView {  // a [B, T, H, D] view, element strides, last dimension contiguous
  void* ptr = nullptr;
  int elem_bytes = 4;
  int dtype = 0;  // lasp2::ScalarType
  int64_t batch = 0, seqlen = 0, heads = 0, dim = 0;
  int64_t sb = 0, st = 0, sh = 0;
};

struct PoisonArgs {
  const float* gathered = nullptr;  // rank r's words at gathered + r * rank_stride
  int64_t rank_stride = 0;
  int world = 0, words = 0;
  uint32_t max_mask = 0;
  PoisonView v[kMaxPoisonViews];
  int count = 0;
};

// Every block compares the words (consistency_values.h, words_fail) and returns when they
// pass: one launch that writes nothing for a consistent call; NaN into every view otherwise.
void launch_poison(const PoisonArgs& a, cudaStream_t stream);

}  // namespace lasp2::cuda
