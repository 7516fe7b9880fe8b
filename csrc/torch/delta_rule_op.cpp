#include "delta_rule_op.h"

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include <torch/csrc/utils/pybind.h>

#include "attention_params.h"
#include "lasp1_op.h"
#include "delta_rule/delta_family.h"
#ifdef LASP2_WITH_CUDA
#include "delta_rule/cuda/delta_cuda_backend.h"
#endif
#include "delta_value_check.h"
#include "lasp2/communicator.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace py = pybind11;

namespace lasp2::torch_binding {
namespace {

using delta::DeltaFamily;
using delta::DeltaGrads;
using delta::DeltaParams;
using delta::GateKind;

struct DeltaArgs {
  at::Tensor q, k, v, g, beta;          // [B, T, H, *] views; g [B, T, H] or [B, T, H, Dk]
  std::optional<at::Tensor> doc_start;  // uint8 [T] (B = 1)
  std::optional<at::Tensor> doc_id;     // int32 [T]: global document of each token
  std::vector<int64_t> head_doc;        // per global part (packed only)
  int64_t num_seqs = 0;
  std::optional<at::Tensor> initial;    // fp32 [N, H, Dk, Dv]
  double scale = 1.0;
  int64_t chunk_size = 64;
  std::shared_ptr<Communicator> comm;
  int64_t parts_per_rank = 1;
  bool ring = false;  // LASP-1 (P2P ring) instead of LASP-2
};

// The tensors the core reads (compute precision) and the params pointing into them.
struct DeltaPrepared {
  at::Tensor q, k, v, g, beta, doc_start, doc_id, initial;
  at::ScalarType input_dtype;
  DeltaParams params;
  PartLayout layout;
  SequenceStates seqs;  // its pointers are set per call
  int64_t num_seqs = 0;
};

BTHStrides bth_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

DeltaPrepared prepare(const DeltaArgs& a) {
  DeltaPrepared r;
  r.input_dtype = a.q.scalar_type();
  r.q = compute_tensor(a.q);
  r.k = compute_tensor(a.k);
  r.v = compute_tensor(a.v);
  const at::ScalarType gate_dtype =
      (!r.q.is_cuda() && r.q.scalar_type() == at::kDouble) ? at::kDouble : at::kFloat;
  r.g = a.g.to(gate_dtype).contiguous();
  r.beta = a.beta.to(gate_dtype).contiguous();

  DeltaParams& p = r.params;
  p.batch = r.q.size(0);
  p.seqlen = r.q.size(1);
  p.heads = r.q.size(2);
  p.dim_k = r.q.size(3);
  p.dim_v = r.v.size(3);
  p.dtype = from_aten(r.q.scalar_type(), "q");
  p.q = const_view(r.q, "q");
  p.k = const_view(r.k, "k");
  p.v = const_view(r.v, "v");
  p.gate_dtype = from_aten(gate_dtype, "g");
  p.gate_kind = r.g.dim() == 4 ? GateKind::kPerKey : GateKind::kScalar;
  p.g = r.g.data_ptr();
  p.g_stride = bth_of(r.g);
  p.beta = r.beta.data_ptr();
  p.beta_stride = bth_of(r.beta);
  p.scale = a.scale;
  p.chunk_size = static_cast<int>(a.chunk_size);
  if (a.doc_start) {
    r.doc_start = a.doc_start->to(at::kByte).contiguous();
    r.doc_id = a.doc_id->to(at::kInt).contiguous();
    p.doc_start = r.doc_start.data_ptr<uint8_t>();
    p.doc_id = r.doc_id.data_ptr<int32_t>();
    p.doc_batch_stride = 0;
  }
  r.num_seqs = a.num_seqs;
  if (a.initial) r.initial = a.initial->to(at::kFloat).contiguous();
  r.layout = a.comm ? PartLayout{a.comm->size(), a.comm->rank(), static_cast<int>(a.parts_per_rank)}
                    : PartLayout::contiguous(1, 0);
  return r;
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The [N, H, Dk, Dv] fp32 states of the call's sequences.
at::Tensor sequence_states(const DeltaPrepared& r) {
  const DeltaParams& p = r.params;
  return at::empty({r.num_seqs, p.heads, p.dim_k, p.dim_v}, r.q.options().dtype(at::kFloat));
}

// Packed documents carry their states through the parts' head maps; without states
// the documents' resets need nothing from the schedule.
void set_documents(const DeltaArgs& a, SequenceStates& seq) {
  if (a.doc_start && seq.any()) {
    seq.head_doc = a.head_doc;
    seq.count = a.num_seqs;
  }
}

// fp32 values of what the forward keeps for the backward (DeltaFamily::with_forward_kept;
// the CUDA chunked kernels' prep and state-pass outputs, 0 on the CPU). Packed documents
// with their own initial or final states keep nothing: the token walks take their
// backward (lasp2/ops/_delta_library.py's fake function applies the same rule).
int64_t forward_kept_floats(const DeltaArgs& a, const DeltaPrepared& r, bool doc_states) {
  if (a.doc_start && doc_states) return 0;
  return DeltaFamily::forward_kept_floats(delta_kernel_backend_for(r.q), r.params, r.layout);
}

// keep: a backward can follow (else nothing is kept).
std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, at::Tensor> forward(const DeltaArgs& args,
                                                                                bool want_final, bool keep) {
  const c10::DeviceGuard guard(args.q.device());  // kernels, streams, scratch: q's device
  DeltaPrepared r = prepare(args);
  const DeltaParams& p = r.params;
  at::Tensor o = at::empty_like(r.v);
  at::Tensor fold = floats(p.bh() * p.state_elems(), r.q);
  DeltaFamily family(delta_kernel_backend_for(r.q), p, mut_view(o, "o"), fold.data_ptr<float>());
  // from the caching allocator on the call's stream; read by the backward of this call
  at::Tensor kept = floats(keep ? forward_kept_floats(args, r, r.initial.defined() || want_final) : 0, r.q);
  if (kept.numel() > 0) family.with_forward_kept(kept.data_ptr<float>(), r.layout);
  at::Tensor finals;
  if (want_final) finals = sequence_states(r);
  SequenceStates seq;
  seq.initial = ptr_or_null(r.initial);
  seq.final_state = want_final ? finals.data_ptr<float>() : nullptr;
  set_documents(args, seq);
  if (args.ring) {
    std::vector<at::Tensor> saved = lasp1_saved_buffers(family.shape(), r.layout, seq.packed(), r.q);
    at::Tensor workspace = scratch(lasp1_forward_workspace_bytes(family, r.layout, seq), r.q);
    lasp1_forward(family, args.comm.get(), r.layout,
                  lasp1_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q), seq,
                  workspace.data_ptr(), current_stream(r.q));
    return {restore_dtype(o, r.input_dtype), finals, saved, kept};
  }
  std::vector<at::Tensor> saved = lasp2_saved_buffers(family.shape(), r.layout, seq.packed(), r.q);
  at::Tensor workspace = scratch(lasp2_forward_workspace_bytes(family, r.layout, seq), r.q);
  lasp2_forward(family, args.comm.get(), r.layout,
                lasp2_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q), seq, workspace.data_ptr(),
                Lasp2Options{}, current_stream(r.q));
  return {restore_dtype(o, r.input_dtype), finals, saved, kept};
}

std::vector<at::Tensor> backward(const DeltaArgs& args, const at::Tensor& dout,
                                 const std::vector<at::Tensor>& saved, const std::optional<at::Tensor>& kept,
                                 const std::optional<at::Tensor>& final_dstate, bool need_dg,
                                 bool need_dbeta, bool need_dinitial) {
  const c10::DeviceGuard guard(args.q.device());
  DeltaPrepared r = prepare(args);
  const DeltaParams& p = r.params;
  at::Tensor dout_c = compute_tensor(dout);
  at::Tensor dq = at::empty_like(r.q), dk = at::empty_like(r.k), dv = at::empty_like(r.v);
  at::Tensor dg, dbeta, d_initial, dF;
  if (need_dg) dg = at::empty_like(r.g);
  if (need_dbeta) dbeta = at::empty_like(r.beta);
  if (need_dinitial) d_initial = sequence_states(r);
  if (final_dstate) dF = final_dstate->to(at::kFloat).contiguous();
  at::Tensor fold = floats(p.bh() * p.state_elems(), r.q);
  const DeltaGrads grads{const_view(dout_c, "dout"), mut_view(dq, "dq"), mut_view(dk, "dk"),
                         mut_view(dv, "dv"), need_dg ? dg.data_ptr() : nullptr,
                         need_dbeta ? dbeta.data_ptr() : nullptr,
                         r.initial.defined() || dF.defined() || need_dinitial};
  DeltaFamily family(delta_kernel_backend_for(r.q), p, grads, fold.data_ptr<float>());
  // the forward's kept buffer, where it has the size this call would keep (else, e.g. with
  // LASP2_DELTA_KEEP_FORWARD changed in between, the backward recomputes)
  const int64_t kept_floats = forward_kept_floats(args, r, r.initial.defined() || dF.defined());
  if (kept && kept_floats > 0 && kept->numel() == kept_floats && kept->scalar_type() == at::kFloat &&
      kept->is_contiguous() && kept->device() == r.q.device()) {
    family.with_forward_kept(kept->data_ptr<float>(), r.layout);
  }
  SequenceStates seq;
  seq.initial = ptr_or_null(r.initial);
  seq.final_grad = ptr_or_null(dF);
  seq.initial_grad = need_dinitial ? d_initial.data_ptr<float>() : nullptr;
  set_documents(args, seq);
  if (args.ring) {
    at::Tensor workspace = scratch(lasp1_backward_workspace_bytes(family, r.layout, seq), r.q);
    lasp1_backward(family, args.comm.get(), r.layout,
                   lasp1_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q), seq,
                   workspace.data_ptr(), current_stream(r.q));
    return {restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
            restore_dtype(dv, r.input_dtype), dg, dbeta, d_initial};
  }
  at::Tensor workspace = scratch(lasp2_backward_workspace_bytes(family, r.layout, seq), r.q);
  lasp2_backward(family, args.comm.get(), r.layout,
                 lasp2_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q), seq, workspace.data_ptr(),
                 current_stream(r.q));
  return {restore_dtype(dq, r.input_dtype), restore_dtype(dk, r.input_dtype),
          restore_dtype(dv, r.input_dtype), dg, dbeta, d_initial};
}

DeltaArgs make_args(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g, at::Tensor beta,
                    std::optional<at::Tensor> doc_start, std::optional<at::Tensor> doc_id,
                    std::vector<int64_t> head_doc, int64_t num_seqs,
                    std::optional<at::Tensor> initial, double scale, int64_t chunk_size,
                    std::shared_ptr<Communicator> comm, int64_t parts_per_rank) {
  DeltaArgs a;
  a.q = std::move(q);
  a.k = std::move(k);
  a.v = std::move(v);
  a.g = std::move(g);
  a.beta = std::move(beta);
  a.doc_start = std::move(doc_start);
  a.doc_id = std::move(doc_id);
  a.head_doc = std::move(head_doc);
  a.num_seqs = num_seqs;
  a.initial = std::move(initial);
  a.scale = scale;
  a.chunk_size = chunk_size;
  a.comm = std::move(comm);
  a.parts_per_rank = parts_per_rank;
  return a;
}

}  // namespace

void register_delta_rule(py::module_& m) {
  register_delta_value_check(m);
  m.def(
      "delta_forward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g, at::Tensor beta,
         std::optional<at::Tensor> doc_start, std::optional<at::Tensor> doc_id,
         std::vector<int64_t> head_doc, int64_t num_seqs, std::optional<at::Tensor> initial,
         double scale, int64_t chunk_size, std::shared_ptr<Communicator> comm,
         int64_t parts_per_rank, bool want_final, bool ring, bool keep) {
        py::gil_scoped_release no_gil;  // the collective may block on other ranks
        DeltaArgs a = make_args(q, k, v, g, beta, doc_start, doc_id, head_doc, num_seqs, initial,
                                scale, chunk_size, comm, parts_per_rank);
        a.ring = ring;
        return forward(a, want_final, keep);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"),
      py::arg("doc_start"), py::arg("doc_id"), py::arg("head_doc"), py::arg("num_seqs"),
      py::arg("initial"), py::arg("scale"), py::arg("chunk_size"), py::arg("comm"),
      py::arg("parts_per_rank"), py::arg("want_final"), py::arg("ring") = false, py::arg("keep") = true);

  m.def(
      "delta_backward",
      [](at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor g, at::Tensor beta,
         std::optional<at::Tensor> doc_start, std::optional<at::Tensor> doc_id,
         std::vector<int64_t> head_doc, int64_t num_seqs, std::optional<at::Tensor> initial,
         double scale, int64_t chunk_size, std::shared_ptr<Communicator> comm,
         int64_t parts_per_rank, at::Tensor dout, std::vector<at::Tensor> saved,
         std::optional<at::Tensor> final_dstate, bool need_dg, bool need_dbeta,
         bool need_dinitial, bool ring, std::optional<at::Tensor> kept) {
        py::gil_scoped_release no_gil;
        DeltaArgs a = make_args(q, k, v, g, beta, doc_start, doc_id, head_doc, num_seqs, initial,
                                scale, chunk_size, comm, parts_per_rank);
        a.ring = ring;
        return backward(a, dout, saved, kept, final_dstate, need_dg, need_dbeta, need_dinitial);
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("beta"),
      py::arg("doc_start"), py::arg("doc_id"), py::arg("head_doc"), py::arg("num_seqs"),
      py::arg("initial"), py::arg("scale"), py::arg("chunk_size"), py::arg("comm"),
      py::arg("parts_per_rank"), py::arg("dout"), py::arg("saved"),
      py::arg("final_dstate"), py::arg("need_dg"), py::arg("need_dbeta"),
      py::arg("need_dinitial"), py::arg("ring") = false, py::arg("kept") = py::none());

  // Whether the CUDA kernels keep the forward's chunked outputs for the backward for these
  // dtype, head dims and gate kind on `device` (the rule of DeltaCudaBackend's
  // forward_kept_floats, LASP2_DELTA_KEEP_FORWARD included): the fake function sizes the
  // kept buffer from it.
  m.def(
      "delta_keeps_forward",
      [](at::ScalarType dtype, int64_t dim_k, int64_t dim_v, bool per_key, const at::Device& device) {
#ifdef LASP2_WITH_CUDA
        if (device.is_cuda() && (dtype == at::kBFloat16 || dtype == at::kHalf)) {
          const c10::DeviceGuard guard(device);  // the shared-memory limit is the device's
          DeltaParams p;
          p.batch = p.seqlen = p.heads = 1;
          p.dim_k = dim_k;
          p.dim_v = dim_v;
          p.dtype = from_aten(dtype, "q");
          p.gate_kind = per_key ? GateKind::kPerKey : GateKind::kScalar;
          static const auto& backend = delta::delta_cuda_backend();
          return backend.forward_kept_floats(p, {0, 1}) > 0;
        }
#endif
        (void)dtype, (void)dim_k, (void)dim_v, (void)per_key, (void)device;
        return false;
      },
      py::arg("dtype"), py::arg("dim_k"), py::arg("dim_v"), py::arg("per_key"), py::arg("device"));
}

}  // namespace lasp2::torch_binding
