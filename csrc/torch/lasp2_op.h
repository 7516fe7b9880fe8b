// The LASP-2 linear attention entry points for torch tensors. Python validates
// arguments (with messages naming them) and owns autograd; these functions check what
// reaches the core, allocate outputs and scratch, and run the schedule.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <tuple>
#include <vector>

#include "attention_params.h"
#include "lasp2/scalar_decay.h"

namespace lasp2::torch_binding {

// The sequence states of one call of the scalar family (LASP-2 and LASP-1), and what
// the family needs to cut its parts at packed documents' starts (host copy of the
// starts, fp32 scratch on the device). `any`: the call has sequence states.
struct ScalarSequenceStates {
  SequenceStates seq;
  at::Tensor scratch;
  ScalarSequenceStates(const LinearAttentionArgs& a, const Prepared& r, ScalarDecay& family, bool any);
};

// The schedule-independent half of a scalar-family call (LASP-2 or LASP-1): checks,
// outputs / gradient buffers, the family and the sequence states; `schedule` allocates
// its saved buffers (forward) or views them (backward), its workspace, and runs.
using ScalarSchedule = std::function<void(ScalarDecay& family, const Prepared& r, SequenceStates& seq)>;
// Returns {o, final_state} (final_state only with output_final_state).
std::tuple<at::Tensor, OptTensor> scalar_forward(const LinearAttentionArgs& args, bool output_final_state,
                                                 const ScalarSchedule& schedule);
// Returns the gradients as lasp2_backward documents them.
std::vector<OptTensor> scalar_backward(const LinearAttentionArgs& args, const at::Tensor& dout, bool need_dg,
                                       const OptTensor& d_final_state, bool need_dinitial,
                                       const ScalarSchedule& schedule);

// Returns {o, final_state, saved}: final_state ([N, H, Dk, Dv] fp32, N = B or, with
// args.head_doc, the packed documents; the same on every rank) only when asked for;
// saved = {local_records, prefix_states, maps, head_maps, segment_states} is what
// backward needs (segment_states: lasp2_saved_states_floats values, what the CUDA
// kernels keep for the dq pass; empty on the CPU; zeros, unused, with packed
// documents' states).
std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp2_forward(
    const LinearAttentionArgs& args, bool overlap, bool output_final_state);

// Returns {dq, dk, dv, dg, ddecay, dinitial_state}, each in its input's dtype; dg (for
// args.g) and ddecay (for args.decay) only with need_dg, dinitial_state only with
// need_dinitial. d_final_state is this rank's gradient of forward's final_state (the
// ranks' are summed: the loss is the sum of the ranks' losses); dinitial_state is this
// rank's share (summed over the group it is one process's gradient).
// The size of saved[4] for a call's shapes alone (the custom op's fake function): fp32
// values for q [batch, seqlen, heads, dim_k] of `dtype` on `device`, v's head dim dim_v,
// and parts_per_rank local parts (1 without a communicator).
int64_t lasp2_saved_states_floats(int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k,
                                  int64_t dim_v, at::ScalarType dtype, const at::Device& device,
                                  int64_t parts_per_rank);

// What that size follows (KernelBackend::SavedStatesPlan: target blocks, forced segment
// chunks; (0, 0) where nothing is kept), for the fake function's symbolic shapes.
std::tuple<int64_t, int64_t> lasp2_saved_states_plan(at::ScalarType dtype, int64_t dim_k, int64_t dim_v,
                                                     const at::Device& device);

// One device without a communicator, documents or states (the C++ eager node,
// lasp2_eager_node.cpp): what lasp2_forward / lasp2_backward run for such a call (the
// family's forward, resp. its dq and dk/dv passes, over the whole sequence: LASP-2 has
// nothing to gather), without the four LASP-2 buffers and the workspace it never reads.
// Eager host time before the first launch is GPU idle time in a synchronized step, and
// these were five allocations of it. The forward returns {o, segment states} (saved[4]
// of lasp2_forward); the backward takes them back and returns what lasp2_backward does
// (no initial-state gradient).
std::tuple<at::Tensor, at::Tensor> lasp2_one_device_forward(const LinearAttentionArgs& args);
std::vector<OptTensor> lasp2_one_device_backward(const LinearAttentionArgs& args, const at::Tensor& states,
                                                 const at::Tensor& dout, bool need_dg);
std::vector<OptTensor> lasp2_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial);

}  // namespace lasp2::torch_binding
