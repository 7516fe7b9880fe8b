#include "linear_attention_op.h"

#include "lasp2/lasp2.h"
#include "tensor_views.h"

namespace lasp2::torch_binding {
namespace {

// Tensors the core reads, in the precision it computes in. The CPU kernels run
// half precisions in fp32; CUDA kernels take them as they are.
struct Prepared {
  at::Tensor q, k, v, g, decay, doc_start;
  at::ScalarType input_dtype;
  AttentionParams params;
  PartLayout layout;
};

at::Tensor compute_tensor(const at::Tensor& t) {
  const bool half = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  return t.is_cuda() || !half ? t : t.to(at::kFloat);
}

Prepared prepare(const LinearAttentionArgs& a) {
  Prepared r;
  r.input_dtype = a.q.scalar_type();
  r.q = compute_tensor(a.q);
  r.k = compute_tensor(a.k);
  r.v = compute_tensor(a.v);
  const at::ScalarType decay_dtype =
      (!r.q.is_cuda() && r.q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;

  AttentionParams& p = r.params;
  p.batch = r.q.size(0);
  p.seqlen = r.q.size(1);
  p.heads = r.q.size(2);
  p.dim_k = r.q.size(3);
  p.dim_v = r.v.size(3);
  p.dtype = from_aten(r.q.scalar_type());
  p.q = const_view(r.q);
  p.k = const_view(r.k);
  p.v = const_view(r.v);
  p.scale = a.scale;
  p.chunk_size = static_cast<int>(a.chunk_size);
  p.decay.dtype = from_aten(decay_dtype);
  if (a.g) {
    r.g = a.g->to(decay_dtype);
    p.decay.mode = DecayMode::kGate;
    p.decay.gate = r.g.data_ptr();
    p.decay.gate_stride = bth_strides(r.g);
  } else if (a.decay) {
    r.decay = a.decay->to(decay_dtype).contiguous();
    p.decay.mode = DecayMode::kFixed;
    p.decay.log_decay = r.decay.data_ptr();
  }
  if (a.doc_start) {
    r.doc_start = a.doc_start->to(at::kByte).contiguous();
    p.doc_start = r.doc_start.data_ptr<uint8_t>();
    p.doc_start_batch_stride = r.doc_start.dim() == 2 ? r.doc_start.size(1) : 0;
  }
  if (a.comm) {
    r.layout = PartLayout{a.comm->size(), a.comm->rank(), static_cast<int>(a.parts_per_rank)};
  } else {
    r.layout = PartLayout::contiguous(1, 0);
  }
  return r;
}

at::Tensor floats(int64_t n, const at::Tensor& like) {
  return at::empty({n}, like.options().dtype(at::kFloat));
}

at::Tensor scratch(int64_t bytes, const at::Tensor& like) {
  return at::empty({std::max<int64_t>(bytes, 8)}, like.options().dtype(at::kByte));
}

at::Tensor restore_dtype(const at::Tensor& t, at::ScalarType dtype) {
  return t.scalar_type() == dtype ? t : t.to(dtype);
}

}  // namespace

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
  lasp2_forward(backend_for(core_device(r.q)), args.comm.get(), r.layout, p, mut_view(o), saved,
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
    dg = at::empty({p.batch, p.seqlen, p.heads},
                   r.q.options().dtype(p.decay.dtype == ScalarType::kFloat64 ? at::kDouble : at::kFloat));
  }
  at::Tensor workspace = scratch(lasp2_backward_workspace_bytes(p, r.layout, need_dg), r.q);
  const Lasp2Saved saved{local_records.data_ptr<float>(), prefix_states.data_ptr<float>(),
                         log_decays.data_ptr<float>()};
  lasp2_backward(backend_for(core_device(r.q)), args.comm.get(), r.layout, p, const_view(dout_c),
                 saved, mut_view(dq), mut_view(dk), mut_view(dv), need_dg ? dg.data_ptr() : nullptr,
                 workspace.data_ptr(), current_stream(r.q));
  return {restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
          restore_dtype(dv, r.input_dtype), dg};
}

}  // namespace lasp2::torch_binding
