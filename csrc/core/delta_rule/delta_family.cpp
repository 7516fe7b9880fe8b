// The delta-rule family on a DeltaKernelBackend (see delta_family.h).
#include "delta_rule/delta_family.h"

#include "lasp2/params.h"

namespace lasp2::delta {

DeltaFamily::DeltaFamily(const DeltaKernelBackend& backend, const DeltaParams& p, MutView o,
                         float* fold_scratch)
    : BackendFamily(backend), p_(p), o_(o), fold_(fold_scratch) {
  check_delta_params(p);
  check_output_view(o, p.batch, p.seqlen, p.heads, "o");
}

DeltaFamily::DeltaFamily(const DeltaKernelBackend& backend, const DeltaParams& p,
                         const DeltaGrads& grads, float* fold_scratch)
    : BackendFamily(backend), p_(p), grads_(grads), fold_(fold_scratch) {
  check_delta_params(p);
  check_gradient_views(grads.dout, grads.dq, grads.dk, grads.dv, p.batch, p.seqlen, p.heads);
}

DeltaFamily& DeltaFamily::with_forward_kept(float* buffer, const PartLayout& layout) {
  forward_kept_ = buffer;
  kept_layout_ = layout;
  return *this;
}

int64_t DeltaFamily::forward_kept_floats(const DeltaKernelBackend& backend, const DeltaParams& p,
                                         const PartLayout& layout) {
  int64_t floats = 0;
  for (int i = 0; i < layout.parts_per_rank; ++i) floats += backend.forward_kept_floats(p, layout.local_range(i, p.seqlen));
  return floats;
}

// The part's slot, or null. With two parts a rank only those two have slots: the
// whole-sequence call of the one-device schedule (world size 1 without states) then
// recomputes, whichever of the two schedules' forms the other call took.
float* DeltaFamily::kept_slot(TokenRange part) const {
  if (forward_kept_ == nullptr || be_.forward_kept_floats(p_, part) == 0) return nullptr;
  float* slot = forward_kept_;
  for (int i = 0; i < kept_layout_.parts_per_rank; ++i) {
    const TokenRange r = kept_layout_.local_range(i, p_.seqlen);
    if (r == part) return slot;
    slot += be_.forward_kept_floats(p_, r);
  }
  return nullptr;
}

void DeltaFamily::summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                            void* stream) const {
  be_.part_summary(p_, part, docs, out.map, out.state, out.head_map, out.head_state, stream);
}

// acc = A_m acc + M_m for m < target, from zero: M_0, then one map product per step,
// alternating between the scratch and `out` (a product never writes its own input).
void DeltaFamily::combine_prefix(const std::vector<const float*>& states, const float* maps,
                                 int target, float* out, void* stream) const {
  const SummaryShape sh = shape();
  if (target <= 0) {
    be_.fill_zero(out, sh.state_floats, stream);
    return;
  }
  const int steps = target - 1;
  const float* acc = states[0];
  for (int k = 1; k <= steps; ++k) {
    float* dst = step_target(k, steps, out);
    be_.apply_map(maps + k * sh.map_floats, acc, states[k], p_.bh(), p_.dim_k, p_.dim_v, dst, stream);
    acc = dst;
  }
  if (steps == 0) be_.copy(out, acc, sh.state_floats, stream);
}

// acc = A_m^T acc + dM_m for m from the last entry down to target + 1, from zero.
void DeltaFamily::combine_suffix(const std::vector<const float*>& dstates, const float* maps,
                                 int target, float* out, void* stream) const {
  const SummaryShape sh = shape();
  const int last = static_cast<int>(dstates.size()) - 1;
  if (last <= target) {
    be_.fill_zero(out, sh.state_floats, stream);
    return;
  }
  const int steps = last - target - 1;
  const float* acc = dstates[last];
  for (int k = 1; k <= steps; ++k) {
    const int m = last - k;
    float* dst = step_target(k, steps, out);
    be_.copy(dst, dstates[m], sh.state_floats, stream);
    be_.apply_map_transposed_add(maps + m * sh.map_floats, acc, p_.bh(), p_.dim_k, p_.dim_v, dst,
                                 stream);
    acc = dst;
  }
  if (steps == 0) be_.copy(out, acc, sh.state_floats, stream);
}

void DeltaFamily::forward(TokenRange part, const float* entering, const DocStates& docs,
                          void* stream) const {
  be_.forward_keeping(p_, part, entering, docs, o_, kept_slot(part), stream);
}

void DeltaFamily::entering_grad(TokenRange part, float* dstate, void* stream) const {
  const BackwardPlan plan{grads_.dq, grads_.dk, grads_.dv, grads_.doc_states, kept_slot(part)};
  kept_.put(part, be_.entering_dstate_keeping(p_, part, grads_.dout, plan, dstate, stream));
}

void DeltaFamily::backward(TokenRange part, const PartStates& states, const DocStates& docs,
                           void*, void* stream) const {
  // freed stream-ordered at the end of this call, behind the launches that read it
  const std::unique_ptr<KeptPartWork> kept = kept_.take(part);
  be_.backward_reusing(kept.get(), p_, part, grads_.dout, states.entering, states.leaving_grad, docs, grads_.dq,
                       grads_.dk, grads_.dv, grads_.dg, grads_.dbeta, nullptr, stream, kept_slot(part));
}

}  // namespace lasp2::delta
