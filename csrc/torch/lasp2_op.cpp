#include "lasp2_op.h"

#include <c10/core/DeviceGuard.h>

#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "tensor_views.h"
#include "torch_scratch.h"

namespace lasp2::torch_binding {
namespace {

// at::empty_like(t): for a contiguous t a plain at::empty of its sizes and options (the
// same layout; empty_like's dispatch through empty_strided took about 18 against 6 us a
// call on the H200's host under torch.profiler). The forward's output is allocated before
// its first launch, the backward's gradients before the backward's: in a synchronized
// eager step the first is GPU idle time, and so is the second where the forward's kernels
// are shorter than the host's way into the backward (16K: about 170 us idle).
at::Tensor empty_as(const at::Tensor& t) {
  return t.is_contiguous() ? at::empty(t.sizes(), t.options()) : at::empty_like(t);
}

}  // namespace

ScalarSequenceStates::ScalarSequenceStates(const LinearAttentionArgs& a, const Prepared& r, ScalarDecay& family,
                                           bool any) {
  if (r.initial_state.defined()) seq.initial = r.initial_state.data_ptr<float>();
  if (!any || !a.document_states()) return;
  seq.head_doc = a.head_doc;
  seq.count = a.num_seqs;
  const at::Tensor starts = r.doc_start.to(at::kCPU).contiguous();
  scratch = floats(ScalarDecay::documents_scratch_floats(r.params), r.q);
  family.with_documents(LocalDocuments::of(starts.data_ptr<uint8_t>(), r.params.seqlen, r.layout, a.head_doc),
                        scratch.data_ptr<float>());
}

std::tuple<at::Tensor, OptTensor> scalar_forward(const LinearAttentionArgs& args, bool output_final_state,
                                                 const ScalarSchedule& schedule) {
  const c10::DeviceGuard guard(args.q.device());  // kernels, streams, scratch: q's device
  LASP2_CHECK(!(output_final_state && args.doc_start && args.head_doc.empty()),
              "final states of packed documents (`doc_start`) are per document: pass `head_doc` and `num_seqs`");
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor o = empty_as(r.v);
  ScalarDecay family(kernel_backend_for(r.q), p, mut_view(o, "o"));
  ScalarSequenceStates states(args, r, family, args.initial_state.has_value() || output_final_state);
  OptTensor final_state;
  if (output_final_state) {
    final_state = at::empty(state_shape(p, args), r.q.options().dtype(at::kFloat));
    states.seq.final_state = final_state->data_ptr<float>();
  }
  schedule(family, r, states.seq);
  return {restore_dtype(o, r.input_dtype), final_state};
}

std::vector<OptTensor> scalar_backward(const LinearAttentionArgs& args, const at::Tensor& dout, bool need_dg,
                                       const OptTensor& d_final_state, bool need_dinitial,
                                       const ScalarSchedule& schedule) {
  const c10::DeviceGuard guard(args.q.device());
  LASP2_CHECK(!need_dinitial || args.initial_state, "the initial-state gradient needs `initial_state`");
  Prepared r = prepare(args);
  const AttentionParams& p = r.params;
  at::Tensor dout_c = prepare_dout(dout, args, r);
  at::Tensor dq = empty_as(r.q), dk = empty_as(r.k), dv = empty_as(r.v);
  at::Tensor dg;
  if (need_dg) dg = gate_grad(p, r.q);
  ScalarDecay family(kernel_backend_for(r.q), p,
                     ScalarDecayGrads{const_view(dout_c, "dout"), mut_view(dq, "dq"), mut_view(dk, "dk"),
                                      mut_view(dv, "dv"), need_dg ? dg.data_ptr() : nullptr});
  ScalarSequenceStates states(args, r, family, args.initial_state || d_final_state || need_dinitial);
  SequenceStates& seq = states.seq;
  at::Tensor d_final, d_initial;
  if (d_final_state) {
    d_final = state_tensor(*d_final_state, "d_final_state", state_shape(p, args), r.q);
    seq.final_grad = d_final.data_ptr<float>();
  }
  if (need_dinitial) {
    d_initial = at::empty(state_shape(p, args), r.q.options().dtype(at::kFloat));
    seq.initial_grad = d_initial.data_ptr<float>();
  }
  schedule(family, r, seq);
  std::vector<OptTensor> grads = input_grads(args, r, dq, dk, dv, dg);
  grads.push_back(need_dinitial ? OptTensor(d_initial.to(args.initial_state->scalar_type())) : std::nullopt);
  return grads;
}

namespace {

// fp32 values of the segment states the kernels keep for the dq pass (none on the CPU).
int64_t saved_states_floats(const AttentionParams& p, const PartLayout& layout, const at::Tensor& like) {
  return ScalarDecay::saved_states_floats(kernel_backend_for(like), p, layout);
}

}  // namespace

int64_t lasp2_saved_states_floats(int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k,
                                  int64_t dim_v, at::ScalarType dtype, const at::Device& device,
                                  int64_t parts_per_rank) {
#ifdef LASP2_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceGuard guard(device);  // the segments depend on the device's SM count
    PartLayout layout = PartLayout::contiguous(1, 0);
    layout.parts_per_rank = static_cast<int>(parts_per_rank);
    return ScalarDecay::saved_states_floats(backend_for(Device::kCUDA),
                                            shape_params(batch, seqlen, heads, dim_k, dim_v, dtype), layout);
  }
#endif
  (void)batch, (void)seqlen, (void)heads, (void)dim_k, (void)dim_v, (void)dtype, (void)device;
  (void)parts_per_rank;
  return 0;
}

std::tuple<int64_t, int64_t> lasp2_saved_states_plan(at::ScalarType dtype, int64_t dim_k, int64_t dim_v,
                                                     const at::Device& device) {
#ifdef LASP2_WITH_CUDA
  if (device.is_cuda()) {
    const c10::DeviceGuard guard(device);
    const KernelBackend::SavedStatesPlan plan =
        backend_for(Device::kCUDA).saved_states_plan(shape_params(1, 1, 1, dim_k, dim_v, dtype));
    return {plan.target_blocks, plan.forced_seg_chunks};
  }
#endif
  (void)dtype, (void)dim_k, (void)dim_v, (void)device;
  return {0, 0};
}

std::tuple<at::Tensor, OptTensor, std::vector<at::Tensor>> lasp2_forward(
    const LinearAttentionArgs& args, bool overlap, bool output_final_state) {
  std::vector<at::Tensor> saved;
  auto [o, final_state] = scalar_forward(
      args, output_final_state, [&](ScalarDecay& family, const Prepared& r, SequenceStates& seq) {
        saved = lasp2_saved_buffers(family.shape(), r.layout, seq.packed(), r.q);
        // Packed documents' states cut parts at their starts, whose states are not kept:
        // zeros there (a custom op's outputs are deterministic), attached otherwise.
        at::Tensor states = floats(saved_states_floats(r.params, r.layout, r.q), r.q);
        if (args.document_states()) states.zero_();
        else family.with_saved_states(states.data_ptr<float>(), r.layout);
        saved.push_back(states);
        at::Tensor workspace = scratch(lasp2_forward_workspace_bytes(family, r.layout, seq), r.q);
        const Lasp2Saved view = lasp2_saved_view(saved, family.shape(), r.layout, seq.packed(), r.q);
        Lasp2Options options;
        options.overlap_forward = overlap;
        lasp2_forward(family, args.comm.get(), r.layout, view, seq, workspace.data_ptr(), options,
                      current_stream(r.q));
      });
  return {o, final_state, saved};
}

std::tuple<at::Tensor, at::Tensor> lasp2_one_device_forward(const LinearAttentionArgs& args) {
  at::Tensor states;
  auto [o, final_state] = scalar_forward(
      args, /*output_final_state=*/false, [&](ScalarDecay& family, const Prepared& r, SequenceStates&) {
        states = floats(saved_states_floats(r.params, r.layout, r.q), r.q);
        family.with_saved_states(states.data_ptr<float>(), r.layout);
        ::lasp2::one_device_forward(family, current_stream(r.q));
      });
  (void)final_state;
  return {o, states};
}

std::vector<OptTensor> lasp2_one_device_backward(const LinearAttentionArgs& args, const at::Tensor& states,
                                                 const at::Tensor& dout, bool need_dg) {
  return scalar_backward(
      args, dout, need_dg, std::nullopt, /*need_dinitial=*/false,
      [&](ScalarDecay& family, const Prepared& r, SequenceStates&) {
        const at::Tensor& kept =
            saved_buffer(states, "segment_states", saved_states_floats(r.params, r.layout, r.q), r.q);
        family.with_saved_states(kept.data_ptr<float>(), r.layout);
        at::Tensor workspace = scratch(family.backward_scratch_bytes(), r.q);
        ::lasp2::one_device_backward(family, workspace.data_ptr(), current_stream(r.q));
      });
}

std::vector<OptTensor> lasp2_backward(const LinearAttentionArgs& args,
                                      const std::vector<at::Tensor>& saved_tensors,
                                      const at::Tensor& dout, bool need_dg,
                                      const OptTensor& d_final_state, bool need_dinitial) {
  return scalar_backward(
      args, dout, need_dg, d_final_state, need_dinitial,
      [&](ScalarDecay& family, const Prepared& r, SequenceStates& seq) {
        const Lasp2Saved saved = lasp2_saved_view(saved_tensors, family.shape(), r.layout, seq.packed(), r.q);
        if (saved_tensors.size() == 5 && !args.document_states()) {  // else the kernels recompute them
          const at::Tensor& states = saved_buffer(saved_tensors[4], "segment_states",
                                                  saved_states_floats(r.params, r.layout, r.q), r.q);
          family.with_saved_states(states.data_ptr<float>(), r.layout);
        }
        at::Tensor workspace = scratch(lasp2_backward_workspace_bytes(family, r.layout, seq), r.q);
        lasp2_backward(family, args.comm.get(), r.layout, saved, seq, workspace.data_ptr(), current_stream(r.q));
      });
}

}  // namespace lasp2::torch_binding
