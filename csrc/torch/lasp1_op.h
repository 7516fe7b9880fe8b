// The LASP-1 (P2P ring) linear attention entry points for torch tensors, the
// counterpart of linear_attention_op.h: Python validates arguments and owns
// autograd; these allocate outputs and scratch and run the core's ring schedule.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "attention_params.h"  // LinearAttentionArgs

namespace lasp2::torch_binding {

// Returns {o, entering_state, local_record}: what backward needs (the state
// received from the previous rank, and this part's own state and log decay).
// args.parts_per_rank must be 1.
std::vector<at::Tensor> lasp1_forward(const LinearAttentionArgs& args);

// Returns {dq, dk, dv, dg}; dg is undefined unless need_dg.
std::vector<at::Tensor> lasp1_backward(const LinearAttentionArgs& args, const at::Tensor& dout,
                                       const at::Tensor& entering_state,
                                       const at::Tensor& local_record, bool need_dg);

}  // namespace lasp2::torch_binding
