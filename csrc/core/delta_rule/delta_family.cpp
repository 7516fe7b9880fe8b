// The delta-rule family on a DeltaKernelBackend (see delta_family.h).
#include "delta_rule/delta_family.h"

#include <algorithm>

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
  const std::vector<TokenRange> ranges = layout.local_ranges(p.seqlen);
  int64_t floats = 0;
  for (const TokenRange& r : ranges) floats += backend.forward_kept_floats(p, r);
  const std::optional<DeltaPair> pair = DeltaPair::of(p, ranges);
  if (pair) floats = std::max(floats, backend.forward_kept_floats(pair->params, pair->range));
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

// --- a balanced rank's two parts as one pair ------------------------------------

// Per-document states (DocStates, BackwardPlan::doc_states) keep the single-part calls:
// the kernels index them by document, and doc_states picks the CUDA backward's path where
// documents start. Without document starts that flag changes nothing, so rows with an
// initial state (which the schedule passes as the entering state, not as DocStates) still
// pair in the backward as they did in the forward (which has no flag): the kept forward
// slot needs both directions to decide alike.
std::optional<DeltaPair> DeltaFamily::pair_of(const std::vector<TokenRange>& parts, const DocStates& docs) const {
  if (docs.any() || (p_.doc_start != nullptr && grads_.doc_states)) return std::nullopt;
  return DeltaPair::of(p_, parts);
}

// The buffer's start, where the buffer was sized for the pair (forward_kept_floats).
float* DeltaFamily::pair_slot(const DeltaPair& pair) const {
  if (forward_kept_ == nullptr || !DeltaPair::of(p_, kept_layout_.local_ranges(p_.seqlen))) return nullptr;
  return be_.forward_kept_floats(pair.params, pair.range) > 0 ? forward_kept_ : nullptr;
}

void DeltaFamily::summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                                  const std::vector<PartSummary>& out, void* stream) const {
  const std::optional<DeltaPair> pair = pair_of(parts, docs);
  const int64_t S = shape().state_floats, Mp = shape().map_floats;
  const auto M = laid_out(out, &PartSummary::state, S);
  const auto A = laid_out(out, &PartSummary::map, Mp);
  const auto head_M = laid_out(out, &PartSummary::head_state, S);
  const auto head_A = laid_out(out, &PartSummary::head_map, Mp);
  // the heads are written whether wanted or not (their buffers are always valid)
  if (!pair || !M || !A || !head_M || !head_A || !*M || !*A || !*head_M || !*head_A) {
    PartFamily::summarize_parts(parts, docs, out, stream);
    return;
  }
  be_.part_summary(pair->params, pair->range, docs, *A, *M, *head_A, *head_M, stream);
}

void DeltaFamily::forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                                const DocStates& docs, void* stream) const {
  const std::optional<DeltaPair> pair = pair_of(parts, docs);
  const std::optional<const float*> in = laid_out(entering, shape().state_floats);
  if (!pair || !in) {
    PartFamily::forward_parts(parts, entering, docs, stream);
    return;
  }
  be_.forward_keeping(pair->params, pair->range, *in, docs, pair->view(o_), pair_slot(*pair), stream);
}

void DeltaFamily::entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                                 void* stream) const {
  const std::optional<DeltaPair> pair = pair_of(parts, {});
  const std::optional<float*> out = laid_out(dstates, shape().state_floats);
  if (!pair || !out || *out == nullptr) {
    PartFamily::entering_grads(parts, dstates, stream);
    return;
  }
  const BackwardPlan plan{pair->view(grads_.dq), pair->view(grads_.dk), pair->view(grads_.dv), grads_.doc_states,
                          pair_slot(*pair)};
  kept_.put(pair->key(),
            be_.entering_dstate_keeping(pair->params, pair->range, pair->view(grads_.dout), plan, *out, stream));
}

// The delta rule's backward recomputes the part's own map: of the records it needs only
// the entering state and the leaving gradient (both nullable).
void DeltaFamily::backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                                 const DocStates& docs, void* scratch, void* stream) const {
  const std::optional<DeltaPair> pair = pair_of(parts, docs);
  const int64_t S = shape().state_floats;
  const auto entering = laid_out(states, &PartStates::entering, S);
  const auto leaving = laid_out(states, &PartStates::leaving_grad, S);
  if (!pair || !entering || !leaving) {
    PartFamily::backward_parts(parts, states, docs, scratch, stream);
    return;
  }
  // dg and dbeta stay as they are: contiguous, indexed (b * seqlen + t) (delta_pair.h)
  const std::unique_ptr<KeptPartWork> kept = kept_.take(pair->key());
  be_.backward_reusing(kept.get(), pair->params, pair->range, pair->view(grads_.dout), *entering, *leaving, docs,
                       pair->view(grads_.dq), pair->view(grads_.dk), pair->view(grads_.dv), grads_.dg,
                       grads_.dbeta, nullptr, stream, pair_slot(*pair));
}

}  // namespace lasp2::delta
