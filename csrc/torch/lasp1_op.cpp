#include "lasp1_op.h"

#include "lasp2/lasp1.h"
#include "lasp2/scalar_decay.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {

std::tuple<at::Tensor, std::vector<at::Tensor>> lasp1_forward(const LinearAttentionArgs& args) {
  LASP2_CHECK(!args.initial_state, "provider \"lasp1\" takes no `initial_state` (use provider \"lasp2\")");
  Prepared r = prepare(args);
  at::Tensor o = at::empty_like(r.v);
  const ScalarDecay family(kernel_backend_for(r.q), r.params, mut_view(o, "o"));
  const SummaryShape sh = family.shape();
  at::Tensor entering = floats(Lasp1Saved::entering_state_floats(sh), r.q);
  at::Tensor record = floats(Lasp1Saved::local_record_floats(sh), r.q);
  at::Tensor workspace = scratch(lasp1_forward_workspace_bytes(family, r.layout), r.q);
  const Lasp1Saved saved{entering.data_ptr<float>(), record.data_ptr<float>()};
  lasp1_forward(family, args.comm.get(), r.layout, saved, workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), {entering, record}};
}

std::vector<OptTensor> lasp1_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved_tensors,
                                      const at::Tensor& dout, bool need_dg) {
  LASP2_CHECK(!args.initial_state, "provider \"lasp1\" takes no `initial_state` (use provider \"lasp2\")");
  Prepared r = prepare(args);
  at::Tensor dout_c = prepare_dout(dout, args, r);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg;
  if (need_dg) dg = gate_grad(r.params, r.q);
  const ScalarDecay family(kernel_backend_for(r.q), r.params,
                           ScalarDecayGrads{const_view(dout_c, "dout"), mut_view(dq, "dq"), mut_view(dk, "dk"),
                                            mut_view(dv, "dv"), need_dg ? dg.data_ptr() : nullptr});
  const SummaryShape sh = family.shape();
  LASP2_CHECK(saved_tensors.size() == 2, "lasp1_backward needs the 2 saved buffers of lasp1_forward");
  const Lasp1Saved saved{
      saved_buffer(saved_tensors[0], "entering_state", Lasp1Saved::entering_state_floats(sh), r.q).data_ptr<float>(),
      saved_buffer(saved_tensors[1], "local_record", Lasp1Saved::local_record_floats(sh), r.q).data_ptr<float>()};
  at::Tensor workspace = scratch(lasp1_backward_workspace_bytes(family, r.layout), r.q);
  lasp1_backward(family, args.comm.get(), r.layout, saved, workspace.data_ptr(), current_stream(r.q));
  return input_grads(args, r, dq, dk, dv, dg);
}

}  // namespace lasp2::torch_binding
