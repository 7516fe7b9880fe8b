#include "linear_attention_op.h"

#include "attention_params.h"
#include "lasp2/lasp2.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {

std::vector<at::Tensor> lasp2_forward(const LinearAttentionArgs& args, bool overlap) {
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor o = at::empty_like(r.v);
  at::Tensor records = floats(Lasp2Saved::local_records_floats(p, r.layout), r.q);
  at::Tensor prefixes = floats(Lasp2Saved::prefix_states_floats(p, r.layout), r.q);
  at::Tensor log_decays = floats(Lasp2Saved::log_decays_floats(p, r.layout), r.q);
  at::Tensor workspace = scratch(lasp2_forward_workspace_bytes(p, r.layout), r.q);
  const Lasp2Saved saved{records.data_ptr<float>(), prefixes.data_ptr<float>(),
                         log_decays.data_ptr<float>()};
  Lasp2Options options;
  options.overlap_forward = overlap;
  lasp2_forward(kernel_backend_for(r.q), args.comm.get(), r.layout, p, mut_view(o), saved,
                workspace.data_ptr(), options, current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), records, prefixes, log_decays};
}

std::vector<at::Tensor> lasp2_backward(const LinearAttentionArgs& args, const at::Tensor& dout,
                                       const at::Tensor& local_records,
                                       const at::Tensor& prefix_states,
                                       const at::Tensor& log_decays, bool need_dg) {
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor dout_c = compute_tensor(dout);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg;
  if (need_dg) {
    dg = gate_grad(p, r.q);
  }
  at::Tensor workspace = scratch(lasp2_backward_workspace_bytes(p, r.layout, need_dg), r.q);
  const Lasp2Saved saved{local_records.data_ptr<float>(), prefix_states.data_ptr<float>(),
                         log_decays.data_ptr<float>()};
  lasp2_backward(kernel_backend_for(r.q), args.comm.get(), r.layout, p, const_view(dout_c),
                 saved, mut_view(dq), mut_view(dk), mut_view(dv), need_dg ? dg.data_ptr() : nullptr,
                 workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
          restore_dtype(dv, r.input_dtype), dg};
}

}  // namespace lasp2::torch_binding
