#include "lasp1_op.h"

#include "lasp2/lasp1.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {

std::vector<at::Tensor> lasp1_forward(const LinearAttentionArgs& args) {
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor o = at::empty_like(r.v);
  at::Tensor entering = floats(Lasp1Saved::entering_state_floats(p), r.q);
  at::Tensor record = floats(Lasp1Saved::local_record_floats(p), r.q);
  at::Tensor workspace = scratch(lasp1_forward_workspace_bytes(p, r.layout), r.q);
  const Lasp1Saved saved{entering.data_ptr<float>(), record.data_ptr<float>()};
  lasp1_forward(kernel_backend_for(r.q), args.comm.get(), r.layout, p, mut_view(o), saved,
                workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), entering, record};
}

std::vector<at::Tensor> lasp1_backward(const LinearAttentionArgs& args, const at::Tensor& dout,
                                       const at::Tensor& entering_state,
                                       const at::Tensor& local_record, bool need_dg) {
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor dout_c = compute_tensor(dout);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg;
  if (need_dg) dg = gate_grad(p, r.q);
  at::Tensor workspace = scratch(lasp1_backward_workspace_bytes(p, r.layout, need_dg), r.q);
  const Lasp1Saved saved{entering_state.data_ptr<float>(), local_record.data_ptr<float>()};
  lasp1_backward(kernel_backend_for(r.q), args.comm.get(), r.layout, p, const_view(dout_c),
                 saved, mut_view(dq), mut_view(dk), mut_view(dv), need_dg ? dg.data_ptr() : nullptr,
                 workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
          restore_dtype(dv, r.input_dtype), dg};
}

}  // namespace lasp2::torch_binding
