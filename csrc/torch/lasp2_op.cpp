#include "lasp2_op.h"

#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {
namespace {

// States of the sequence with documents would need each document's own initial and
// final state, which the schedule does not carry yet.
void check_states(const LinearAttentionArgs& a, bool states) {
  LASP2_CHECK(!(states && a.doc_start),
              "`initial_state` / final states with packed documents (cu_seqlens) are not supported yet");
}

}  // namespace

std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp2_forward(
    const LinearAttentionArgs& args, bool overlap, bool output_final_state) {
  check_states(args, args.initial_state.has_value() || output_final_state);
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor o = at::empty_like(r.v);
  const ScalarDecay family(kernel_backend_for(r.q), p, mut_view(o, "o"));
  const SummaryShape sh = family.shape();
  at::Tensor records = floats(Lasp2Saved::local_records_floats(sh, r.layout), r.q);
  at::Tensor prefixes = floats(Lasp2Saved::prefix_states_floats(sh, r.layout), r.q);
  at::Tensor maps = floats(Lasp2Saved::maps_floats(sh, r.layout), r.q);
  at::Tensor workspace = scratch(lasp2_forward_workspace_bytes(family, r.layout), r.q);
  OptTensor final_state;
  if (output_final_state) final_state = at::empty(state_shape(p), r.q.options().dtype(at::kFloat));
  SequenceStates seq;
  if (r.initial_state.defined()) seq.initial = r.initial_state.data_ptr<float>();
  if (final_state) seq.final_state = final_state->data_ptr<float>();
  const Lasp2Saved saved{records.data_ptr<float>(), prefixes.data_ptr<float>(), maps.data_ptr<float>()};
  Lasp2Options options;
  options.overlap_forward = overlap;
  lasp2_forward(family, args.comm.get(), r.layout, saved, seq, workspace.data_ptr(), options,
                current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), final_state, {records, prefixes, maps}};
}

std::vector<OptTensor> lasp2_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved_tensors,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial) {
  check_states(args, args.initial_state || d_final_state || need_dinitial);
  LASP2_CHECK(!need_dinitial || args.initial_state, "the initial-state gradient needs `initial_state`");
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor dout_c = prepare_dout(dout, args, r);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg;
  if (need_dg) dg = gate_grad(p, r.q);
  const ScalarDecay family(kernel_backend_for(r.q), p,
                           ScalarDecayGrads{const_view(dout_c, "dout"), mut_view(dq, "dq"), mut_view(dk, "dk"),
                                            mut_view(dv, "dv"), need_dg ? dg.data_ptr() : nullptr});
  const SummaryShape sh = family.shape();
  LASP2_CHECK(saved_tensors.size() == 3, "lasp2_backward needs the 3 saved buffers of lasp2_forward");
  const Lasp2Saved saved{
      saved_buffer(saved_tensors[0], "local_records", Lasp2Saved::local_records_floats(sh, r.layout), r.q)
          .data_ptr<float>(),
      saved_buffer(saved_tensors[1], "prefix_states", Lasp2Saved::prefix_states_floats(sh, r.layout), r.q)
          .data_ptr<float>(),
      saved_buffer(saved_tensors[2], "maps", Lasp2Saved::maps_floats(sh, r.layout), r.q).data_ptr<float>()};
  at::Tensor d_final, d_initial;
  SequenceStates seq;
  if (r.initial_state.defined()) seq.initial = r.initial_state.data_ptr<float>();
  if (d_final_state) {
    d_final = state_tensor(*d_final_state, "d_final_state", p, r.q);
    seq.final_grad = d_final.data_ptr<float>();
  }
  if (need_dinitial) {
    d_initial = at::empty(state_shape(p), r.q.options().dtype(at::kFloat));
    seq.initial_grad = d_initial.data_ptr<float>();
  }
  at::Tensor workspace = scratch(lasp2_backward_workspace_bytes(family, r.layout), r.q);
  lasp2_backward(family, args.comm.get(), r.layout, saved, seq, workspace.data_ptr(), current_stream(r.q));
  std::vector<OptTensor> grads = input_grads(args, r, dq, dk, dv, dg);
  grads.push_back(need_dinitial ? OptTensor(d_initial.to(args.initial_state->scalar_type())) : std::nullopt);
  return grads;
}

}  // namespace lasp2::torch_binding
