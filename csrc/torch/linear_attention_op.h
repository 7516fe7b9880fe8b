// The LASP-2 linear attention entry points for torch tensors. Python validates
// arguments (with messages naming them) and owns autograd; these functions
// allocate outputs and scratch, build the core's params and run the schedule.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "attention_params.h"  // LinearAttentionArgs

namespace lasp2::torch_binding {

// Returns {o, local_records, prefix_states, log_decays}; the last three are what
// backward needs (empty tensors on one device).
std::vector<at::Tensor> lasp2_forward(const LinearAttentionArgs& args, bool overlap);

// Returns {dq, dk, dv, dg}; dg is undefined unless need_dg.
std::vector<at::Tensor> lasp2_backward(const LinearAttentionArgs& args, const at::Tensor& dout,
                                       const at::Tensor& local_records,
                                       const at::Tensor& prefix_states,
                                       const at::Tensor& log_decays, bool need_dg);

}  // namespace lasp2::torch_binding
