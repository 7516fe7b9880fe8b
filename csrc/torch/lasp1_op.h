// The LASP-1 (P2P ring) linear attention entry points for torch tensors, the
// counterpart of lasp2_op.h: Python validates arguments and owns autograd; these
// check what reaches the core, allocate outputs and scratch and run the ring schedule.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "attention_params.h"

namespace lasp2::torch_binding {

// Returns {o, saved}: saved = {entering_state, local_record}, what backward needs (the
// state received from the previous rank, and this part's own state and log decay).
// args.parts_per_rank must be 1; the ring carries no sequence states.
std::tuple<at::Tensor, std::vector<at::Tensor>> lasp1_forward(const LinearAttentionArgs& args);

// Returns {dq, dk, dv, dg, ddecay} as lasp2_backward does.
std::vector<OptTensor> lasp1_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved,
                                      const at::Tensor& dout, bool need_dg);

}  // namespace lasp2::torch_binding
