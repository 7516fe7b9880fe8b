// The LASP-2 linear attention entry points for torch tensors. Python validates
// arguments (with messages naming them) and owns autograd; these functions
// allocate outputs and scratch, build the core's params and run the schedule.
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <optional>
#include <vector>

#include "lasp2/communicator.h"

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

// Returns {o, local_records, prefix_states, log_decays}; the last three are what
// backward needs (empty tensors on one device).
std::vector<at::Tensor> lasp2_forward(const LinearAttentionArgs& args, bool overlap);

// Returns {dq, dk, dv, dg}; dg is undefined unless need_dg.
std::vector<at::Tensor> lasp2_backward(const LinearAttentionArgs& args, const at::Tensor& dout,
                                       const at::Tensor& local_records,
                                       const at::Tensor& prefix_states,
                                       const at::Tensor& log_decays, bool need_dg);

}  // namespace lasp2::torch_binding
