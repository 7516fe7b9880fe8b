#include "attention_params.h"

#include <algorithm>

#include "tensor_views.h"

namespace lasp2::torch_binding {

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

at::Tensor gate_grad(const AttentionParams& p, const at::Tensor& like) {
  return at::empty({p.batch, p.seqlen, p.heads},
                   like.options().dtype(p.decay.dtype == ScalarType::kFloat64 ? at::kDouble : at::kFloat));
}

}  // namespace lasp2::torch_binding
