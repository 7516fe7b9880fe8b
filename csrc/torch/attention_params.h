// What every linear attention entry point for torch tensors shares: the argument
// bundle from Python, and turning it into the core's AttentionParams and PartLayout
// (plus the tensors, converted to the compute precision, that the params point into).
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>

#include "lasp2/communicator.h"
#include "lasp2/params.h"
#include "lasp2/part_layout.h"

namespace lasp2::torch_binding {

struct LinearAttentionArgs {
  at::Tensor q, k, v;                // [B, T, H, D] views (any batch/seq/head strides)
  std::optional<at::Tensor> g;       // [B, T, H] log gates
  std::optional<at::Tensor> decay;   // [H] log decays
  std::optional<at::Tensor> doc_start;  // uint8 [T] (shared by the batch) or [B, T]
  double scale = 1.0;
  int64_t chunk_size = 64;
  std::shared_ptr<Communicator> comm;  // null: one device
  int64_t parts_per_rank = 1;          // 2: balanced causal split
};

// Tensors the core reads, in the precision it computes in. The CPU kernels run
// half precisions in fp32; CUDA kernels take them as they are. `params` points
// into these tensors, so a Prepared must outlive every core call made with it.
struct Prepared {
  at::Tensor q, k, v, g, decay, doc_start;
  at::ScalarType input_dtype;
  AttentionParams params;
  PartLayout layout;
};

Prepared prepare(const LinearAttentionArgs& a);

// t in the precision the core computes in on its device (half -> fp32 on the CPU).
at::Tensor compute_tensor(const at::Tensor& t);
// n float32 elements on the device of `like`.
at::Tensor floats(int64_t n, const at::Tensor& like);
// At least 8 bytes of scratch on the device of `like`.
at::Tensor scratch(int64_t bytes, const at::Tensor& like);
at::Tensor restore_dtype(const at::Tensor& t, at::ScalarType dtype);
// [B, T, H] for dg, in the decay dtype of `p`.
at::Tensor gate_grad(const AttentionParams& p, const at::Tensor& like);

}  // namespace lasp2::torch_binding
