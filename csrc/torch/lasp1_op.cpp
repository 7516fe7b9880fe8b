#include "lasp1_op.h"

#include <algorithm>

#include "lasp2/scalar_decay.h"
#include "lasp2_op.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {

std::vector<at::Tensor> lasp1_saved_buffers(const SummaryShape& sh, const PartLayout& l, bool packed,
                                            const at::Tensor& like) {
  const int parts = l.parts_per_rank;
  return {floats(Lasp1Saved::entering_state_floats(sh, parts), like),
          floats(Lasp1Saved::local_record_floats(sh, parts), like),
          floats(std::max<int64_t>(Lasp1Saved::head_maps_floats(sh, parts, packed), 1), like)};
}

Lasp1Saved lasp1_saved_view(const std::vector<at::Tensor>& t, const SummaryShape& sh, const PartLayout& l,
                            bool packed, const at::Tensor& like) {
  LASP2_CHECK(t.size() == 3, "LASP-1 backward needs the 3 saved buffers of forward");
  const int parts = l.parts_per_rank;
  const int64_t head_maps = std::max<int64_t>(Lasp1Saved::head_maps_floats(sh, parts, packed), 1);
  return {saved_buffer(t[0], "entering_state", Lasp1Saved::entering_state_floats(sh, parts), like).data_ptr<float>(),
          saved_buffer(t[1], "local_record", Lasp1Saved::local_record_floats(sh, parts), like).data_ptr<float>(),
          saved_buffer(t[2], "head_maps", head_maps, like).data_ptr<float>()};
}

std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp1_forward(const LinearAttentionArgs& args,
                                                                         bool output_final_state) {
  LASP2_CHECK(!(output_final_state && args.doc_start && args.head_doc.empty()),
              "final states of packed documents (`doc_start`) are per document: pass `head_doc` and `num_seqs`");
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor o = at::empty_like(r.v);
  ScalarDecay family(kernel_backend_for(r.q), p, mut_view(o, "o"));
  ScalarSequenceStates states(args, r, family, args.initial_state.has_value() || output_final_state);
  SequenceStates& seq = states.seq;
  OptTensor final_state;
  if (output_final_state) {
    final_state = at::empty(state_shape(p, args), r.q.options().dtype(at::kFloat));
    seq.final_state = final_state->data_ptr<float>();
  }
  std::vector<at::Tensor> saved = lasp1_saved_buffers(family.shape(), r.layout, seq.packed(), r.q);
  at::Tensor workspace = scratch(lasp1_forward_workspace_bytes(family, r.layout, seq), r.q);
  lasp1_forward(family, args.comm.get(), r.layout, lasp1_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q),
                seq, workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), final_state, saved};
}

std::vector<OptTensor> lasp1_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved_tensors,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial) {
  LASP2_CHECK(!need_dinitial || args.initial_state, "the initial-state gradient needs `initial_state`");
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor dout_c = prepare_dout(dout, args, r);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg;
  if (need_dg) dg = gate_grad(p, r.q);
  ScalarDecay family(kernel_backend_for(r.q), p,
                     ScalarDecayGrads{const_view(dout_c, "dout"), mut_view(dq, "dq"), mut_view(dk, "dk"),
                                      mut_view(dv, "dv"), need_dg ? dg.data_ptr() : nullptr});
  ScalarSequenceStates states(args, r, family, args.initial_state || d_final_state || need_dinitial);
  SequenceStates& seq = states.seq;
  const Lasp1Saved saved = lasp1_saved_view(saved_tensors, family.shape(), r.layout, seq.packed(), r.q);
  at::Tensor d_final, d_initial;
  if (d_final_state) {
    d_final = state_tensor(*d_final_state, "d_final_state", state_shape(p, args), r.q);
    seq.final_grad = d_final.data_ptr<float>();
  }
  if (need_dinitial) {
    d_initial = at::empty(state_shape(p, args), r.q.options().dtype(at::kFloat));
    seq.initial_grad = d_initial.data_ptr<float>();
  }
  at::Tensor workspace = scratch(lasp1_backward_workspace_bytes(family, r.layout, seq), r.q);
  lasp1_backward(family, args.comm.get(), r.layout, saved, seq, workspace.data_ptr(), current_stream(r.q));
  std::vector<OptTensor> grads = input_grads(args, r, dq, dk, dv, dg);
  grads.push_back(need_dinitial ? OptTensor(d_initial.to(args.initial_state->scalar_type())) : std::nullopt);
  return grads;
}

}  // namespace lasp2::torch_binding
