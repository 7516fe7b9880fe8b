#include "attention_params.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <string>

#include "tensor_views.h"

namespace lasp2::torch_binding {
namespace {

std::string shape_str(at::IntArrayRef shape) {
  std::string s = "[";
  for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

void check_shape(const at::Tensor& t, const char* name, const std::vector<int64_t>& want) {
  LASP2_CHECK(t.sizes().vec() == want, std::string("`") + name + "` must have shape " +
                                           shape_str(want) + ", got " + shape_str(t.sizes()));
}

void check_device(const at::Tensor& t, const char* name, const at::Tensor& q) {
  LASP2_CHECK(t.device() == q.device(), std::string("`") + name + "` is on " + t.device().str() +
                                            " but `q` is on " + q.device().str());
}

void check_floating(const at::Tensor& t, const char* name) {
  LASP2_CHECK(t.is_floating_point(), std::string("`") + name + "` must be a floating-point tensor, got " +
                                         c10::toString(t.scalar_type()));
  from_aten(t.scalar_type(), name);  // a dtype the core knows
}

}  // namespace

std::vector<OptTensor> LinearAttentionArgs::tensors() const {
  auto opt = [](const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; };
  return {opt(q), opt(k), opt(v), g, decay, doc_start, initial_state};
}

LinearAttentionArgs LinearAttentionArgs::config() const {
  return with_tensors(std::vector<OptTensor>(kNumTensors));
}

LinearAttentionArgs LinearAttentionArgs::with_tensors(const std::vector<OptTensor>& t) const {
  LASP2_CHECK(static_cast<int>(t.size()) == kNumTensors,
              "LinearAttentionArgs.with_tensors takes " + std::to_string(kNumTensors) + " tensors");
  LinearAttentionArgs a = *this;
  a.q = t[0].value_or(at::Tensor());
  a.k = t[1].value_or(at::Tensor());
  a.v = t[2].value_or(at::Tensor());
  a.g = t[3];
  a.decay = t[4];
  a.doc_start = t[5];
  a.initial_state = t[6];
  return a;
}

at::Tensor compute_tensor(const at::Tensor& t) {
  const bool half = t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16;
  return t.is_cuda() || !half ? t : t.to(at::kFloat);
}

AttentionParams shape_params(int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k, int64_t dim_v,
                             at::ScalarType dtype) {
  AttentionParams p;
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = heads;
  p.dim_k = dim_k;
  p.dim_v = dim_v;
  p.dtype = from_aten(dtype, "q");
  return p;
}

Prepared prepare(const LinearAttentionArgs& a) {
  for (const auto& [t, name] : {std::pair{&a.q, "q"}, {&a.k, "k"}, {&a.v, "v"}}) {
    LASP2_CHECK(t->defined(), std::string("`") + name + "` is missing");
    LASP2_CHECK(t->dim() == 4, std::string("`") + name + "` must be 4-D [B, T, H, D], got " +
                                   std::to_string(t->dim()) + "-D");
    check_floating(*t, name);
    check_device(*t, name, a.q);
    LASP2_CHECK(t->scalar_type() == a.q.scalar_type(), std::string("`") + name + "` has dtype " +
                                                           c10::toString(t->scalar_type()) + " but `q` has " +
                                                           c10::toString(a.q.scalar_type()));
  }
  const int64_t B = a.q.size(0), T = a.q.size(1), H = a.q.size(2), Dk = a.q.size(3), Dv = a.v.size(3);
  check_shape(a.k, "k", a.q.sizes().vec());
  check_shape(a.v, "v", {B, T, H, Dv});
  LASP2_CHECK(T >= 1, "`q` has an empty sequence dimension");
  LASP2_CHECK(Dk >= 1 && Dv >= 1, "`q` and `v` need head dims of at least 1");
  LASP2_CHECK(std::isfinite(a.scale), "`scale` must be finite, got " + std::to_string(a.scale));
  LASP2_CHECK(a.chunk_size >= 1 && a.chunk_size <= INT_MAX,
              "`chunk_size` must lie in [1, 2**31 - 1], got " + std::to_string(a.chunk_size));
  LASP2_CHECK(a.parts_per_rank == 1 || a.parts_per_rank == 2,
              "`parts_per_rank` must be 1 (contiguous) or 2 (balanced), got " + std::to_string(a.parts_per_rank));
  LASP2_CHECK(!(a.g && a.decay), "pass either `g` (per-token gates) or `decay` (per-head decay), not both");

  Prepared r;
  r.input_dtype = a.q.scalar_type();
  r.q = compute_tensor(a.q);
  r.k = compute_tensor(a.k);
  r.v = compute_tensor(a.v);
  const at::ScalarType decay_dtype =
      (!r.q.is_cuda() && r.q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;

  AttentionParams& p = r.params;
  p = shape_params(B, T, H, Dk, Dv, r.q.scalar_type());
  p.q = const_view(r.q, "q");
  p.k = const_view(r.k, "k");
  p.v = const_view(r.v, "v");
  p.scale = a.scale;
  p.chunk_size = static_cast<int>(a.chunk_size);
  p.decay.dtype = from_aten(decay_dtype, "decay");
  if (a.g) {
    check_floating(*a.g, "g");
    check_device(*a.g, "g", a.q);
    check_shape(*a.g, "g", {B, T, H});
    r.g = a.g->to(decay_dtype);
    p.decay.mode = DecayMode::kGate;
    p.decay.gate = r.g.data_ptr();
    p.decay.gate_stride = bth_strides(r.g, "g");
  } else if (a.decay) {
    check_floating(*a.decay, "decay");
    check_device(*a.decay, "decay", a.q);
    check_shape(*a.decay, "decay", {H});
    r.decay = a.decay->to(decay_dtype).contiguous();
    p.decay.mode = DecayMode::kFixed;
    p.decay.log_decay = r.decay.data_ptr();
  }
  if (a.doc_start) {
    const at::Tensor& d = *a.doc_start;
    check_device(d, "doc_start", a.q);
    LASP2_CHECK(d.dim() == 1 || d.dim() == 2, "`doc_start` must be [T] or [B, T]");
    check_shape(d, "doc_start", d.dim() == 1 ? std::vector<int64_t>{T} : std::vector<int64_t>{B, T});
    r.doc_start = d.to(at::kByte).contiguous();
    p.doc_start = r.doc_start.data_ptr<uint8_t>();
    p.doc_start_batch_stride = r.doc_start.dim() == 2 ? T : 0;
  }
  LASP2_CHECK(!(a.doc_start && a.initial_state && a.head_doc.empty()),
              "`initial_state` with packed documents (`doc_start`) is per document: pass `head_doc` and `num_seqs`");
  if (!a.head_doc.empty()) {
    LASP2_CHECK(a.doc_start.has_value() && B == 1 && a.num_seqs >= 1,
                "per-document states (`head_doc`) need packed documents (`doc_start`, batch 1, `num_seqs` >= 1)");
  }
  if (a.initial_state) r.initial_state = state_tensor(*a.initial_state, "initial_state", state_shape(p, a), a.q);
  if (a.comm) {
    const int size = a.comm->size(), rank = a.comm->rank();
    LASP2_CHECK(size >= 1 && rank >= 0 && rank < size,
                "`comm` reports rank " + std::to_string(rank) + " of " + std::to_string(size));
    r.layout = PartLayout{size, rank, static_cast<int>(a.parts_per_rank)};
    LASP2_CHECK(size == 1 || T % a.parts_per_rank == 0,
                "the balanced split needs an even local sequence length, got " + std::to_string(T));
  } else {
    r.layout = PartLayout::contiguous(1, 0);
  }
  return r;
}

std::vector<int64_t> state_shape(const AttentionParams& p, const LinearAttentionArgs& a) {
  return {a.document_states() ? a.num_seqs : p.batch, p.heads, p.dim_k, p.dim_v};
}

at::Tensor state_tensor(const at::Tensor& t, const char* name, const std::vector<int64_t>& shape,
                        const at::Tensor& like) {
  check_floating(t, name);
  check_device(t, name, like);
  check_shape(t, name, shape);
  return t.to(at::kFloat).contiguous();
}

const at::Tensor& saved_buffer(const at::Tensor& t, const char* name, int64_t floats,
                               const at::Tensor& like) {
  LASP2_CHECK(t.defined() && t.scalar_type() == at::kFloat && t.is_contiguous() &&
                  t.numel() == floats && t.device() == like.device(),
              std::string("the saved buffer `") + name + "` does not belong to these arguments (expected " +
                  std::to_string(floats) + " contiguous float32 values on " + like.device().str() + ")");
  return t;
}

std::vector<at::Tensor> lasp2_saved_buffers(const SummaryShape& sh, const PartLayout& l, bool packed,
                                            const at::Tensor& like) {
  return {floats(Lasp2Saved::local_records_floats(sh, l), like),
          floats(Lasp2Saved::prefix_states_floats(sh, l), like),
          floats(Lasp2Saved::maps_floats(sh, l), like),
          floats(std::max<int64_t>(Lasp2Saved::head_maps_floats(sh, l, packed), 1), like)};
}

Lasp2Saved lasp2_saved_view(const std::vector<at::Tensor>& t, const SummaryShape& sh, const PartLayout& l,
                            bool packed, const at::Tensor& like) {
  // a fifth (the scalar family's segment states, lasp2_op.cpp) is read by its caller
  LASP2_CHECK(t.size() == 4 || t.size() == 5, "backward needs the 4 saved buffers of forward");
  const int64_t head_maps = std::max<int64_t>(Lasp2Saved::head_maps_floats(sh, l, packed), 1);
  return {saved_buffer(t[0], "local_records", Lasp2Saved::local_records_floats(sh, l), like).data_ptr<float>(),
          saved_buffer(t[1], "prefix_states", Lasp2Saved::prefix_states_floats(sh, l), like).data_ptr<float>(),
          saved_buffer(t[2], "maps", Lasp2Saved::maps_floats(sh, l), like).data_ptr<float>(),
          saved_buffer(t[3], "head_maps", head_maps, like).data_ptr<float>()};
}

at::Tensor prepare_dout(const at::Tensor& dout, const LinearAttentionArgs& a, const Prepared& r) {
  check_shape(dout, "dout", a.v.sizes().vec());
  check_device(dout, "dout", a.q);
  check_floating(dout, "dout");
  at::Tensor d = compute_tensor(dout).to(r.v.scalar_type());
  return d.stride(3) == 1 ? d : d.contiguous();
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

std::vector<OptTensor> input_grads(const LinearAttentionArgs& a, const Prepared& r,
                                   const at::Tensor& dq, const at::Tensor& dk,
                                   const at::Tensor& dv, const at::Tensor& dg) {
  std::vector<OptTensor> out{restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
                             restore_dtype(dv, r.input_dtype), std::nullopt, std::nullopt};
  if (dg.defined() && a.g) out[3] = dg.to(a.g->scalar_type());
  // A fixed decay acts as the same gate at every token: its gradient is the sum, taken
  // in float64 (B*T cancelling float32 terms).
  if (dg.defined() && a.decay)
    out[4] = dg.sum(at::IntArrayRef{0, 1}, /*keepdim=*/false, at::kDouble).to(a.decay->scalar_type());
  return out;
}

}  // namespace lasp2::torch_binding
