// The LASP-1 (P2P ring) linear attention entry points for torch tensors, the
// counterpart of lasp2_op.h: Python validates arguments and owns autograd; these
// check what reaches the core, allocate outputs and scratch and run the ring schedule.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "attention_params.h"
#include "lasp2/lasp1.h"

namespace lasp2::torch_binding {

// Returns {o, final_state, saved}: final_state ([N, H, Dk, Dv] fp32, the same on every
// rank) only when asked for; saved = {entering_state, local_record, head_maps}, what
// backward needs (the states received from the previous parts, the parts' own
// records, and their head maps with packed documents' states).
std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp1_forward(
    const LinearAttentionArgs& args, bool output_final_state);

// Returns {dq, dk, dv, dg, ddecay, dinitial_state} as lasp2_backward does (the same
// state-gradient convention: d_final_state is this rank's, dinitial_state its share).
std::vector<OptTensor> lasp1_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial);

// LASP-1's saved buffers for a family of summary `shape` (shared with the delta rule),
// and the core's view of them, checked against the sizes backward expects.
std::vector<at::Tensor> lasp1_saved_buffers(const SummaryShape& shape, const PartLayout& l,
                                            bool packed, const at::Tensor& like);
Lasp1Saved lasp1_saved_view(const std::vector<at::Tensor>& saved, const SummaryShape& shape,
                            const PartLayout& l, bool packed, const at::Tensor& like);

}  // namespace lasp2::torch_binding
