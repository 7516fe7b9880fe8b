// The fused L2 norm of q and k over the head dim (use_qk_l2norm=True of the delta-rule
// ops, as fla's layers use it): per row x (one token and head, D values)
//     rstd = 1 / sqrt(sum_d x_d^2 + eps),   y = x * rstd
// and its gradient dx = rstd * (dy - y <dy, y>) (exact for y = x * rstd, eps included).
// One call normalises up to two tensors of one shape and dtype (q and k): on CUDA ONE
// kernel launch forward and one backward, where autograd over the unfused formula runs
// several elementwise kernels each way over whole [B, T, H, D] tensors.
//
// Rows are [B, T, H, D] views with a contiguous last dimension and any other strides
// (Megatron's [T, B, H, D] seen as [B, T, H, D]); rstd is [B, T, H] contiguous, fp32
// (float64 for float64 tensors, so that their gradients keep float64 accuracy).
// Sums run in float (double for float64 tensors): CPU and CUDA compute the same function,
// not the same bits (the CUDA sum runs in a warp tree). NaN / Inf follow the formula: an
// Inf makes its row's rstd 0 and its y NaN. The CPU kernels take float32 / float64; the
// binding converts half precisions (as for the other CPU kernels, cpu/float_dispatch.h).
#pragma once

#include <cstdint>

#include "lasp2/types.h"

namespace lasp2 {

constexpr int kMaxL2NormTensors = 2;

// The shape and dtype every tensor of one call shares.
struct L2NormShape {
  ScalarType dtype = ScalarType::kFloat32;
  int64_t batch = 0, seqlen = 0, heads = 0, dim = 0;
  int64_t rows() const { return batch * seqlen * heads; }
};

struct L2NormForwardTensor {
  ConstView x;
  MutView y;             // may not alias x
  void* rstd = nullptr;  // rows() values (float; double for float64), (b, t, h) order
};

struct L2NormForwardArgs {
  L2NormShape shape;
  double eps = 1e-6;  // rounded to float for float / 16-bit tensors, as x + eps rounds it in PyTorch
  int count = 0;      // tensors given, 0..kMaxL2NormTensors
  L2NormForwardTensor t[kMaxL2NormTensors];
};

struct L2NormBackwardTensor {
  ConstView dy;              // gradient of y
  ConstView y;               // the forward's output
  const void* rstd = nullptr;  // the forward's
  MutView dx;                // may not alias dy or y
};

struct L2NormBackwardArgs {
  L2NormShape shape;
  int count = 0;
  L2NormBackwardTensor t[kMaxL2NormTensors];
};

// Enqueued on `stream` (CUDA: one launch for all tensors; CPU: runs now, stream unused).
// Preconditions (LASP2_CHECK): count in range, dim >= 1, non-negative sizes, pointers set.
void l2norm_forward(Device device, const L2NormForwardArgs& args, void* stream);
void l2norm_backward(Device device, const L2NormBackwardArgs& args, void* stream);

}  // namespace lasp2
