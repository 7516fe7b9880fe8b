// The scalar-decay family on a KernelBackend (see scalar_decay.h).
#include "lasp2/scalar_decay.h"

#include <algorithm>

#include "schedule_util.h"

namespace lasp2 {
namespace {

// The family's backward scratch: q_t . dq_t per token, then the dg offsets of the local
// parts (one part's, or a pair's two rows).
struct DgScratch {
  void* q_dot_dq = nullptr;
  float* dg_offset = nullptr;

  DgScratch(const AttentionParams& p, void* scratch, bool need_dg) {
    if (!need_dg) return;
    q_dot_dq = scratch;
    dg_offset = reinterpret_cast<float*>(static_cast<char*>(scratch) + sp::q_dot_bytes(p));
  }
};

const float* doc_state(const float* states, int64_t doc, int64_t state_floats) {
  return states == nullptr ? nullptr : states + doc * state_floats;
}

}  // namespace

LocalDocuments LocalDocuments::of(const uint8_t* host_doc_start, int64_t local_tokens,
                                  const PartLayout& layout, const std::vector<int64_t>& head_doc) {
  layout.validate(local_tokens);
  LASP2_CHECK(static_cast<int64_t>(head_doc.size()) == layout.total_parts(),
              "head_doc needs one entry per global part");
  LASP2_CHECK(local_tokens == 0 || host_doc_start != nullptr,
              "LocalDocuments::of: host_doc_start is null (it needs one flag per local token)");
  LocalDocuments d;
  for (int i = 0; i < layout.parts_per_rank; ++i) {
    const TokenRange r = layout.local_range(i, local_tokens);
    int64_t next = head_doc[layout.global_part(i)] + 1;
    for (int64_t t = r.begin; t < r.end; ++t) {
      if (host_doc_start[t] == 0) continue;
      d.starts.push_back(t);
      d.ids.push_back(next++);
    }
  }
  return d;
}

ScalarDecay::ScalarDecay(const KernelBackend& backend, const AttentionParams& p, MutView o)
    : BackendFamily(backend), p_(p), plain_(p), o_(o) {
  check_attention_params(p);
  check_output_view(o, p.batch, p.seqlen, p.heads, "o");
  plain_.doc_start = nullptr;
}

ScalarDecay::ScalarDecay(const KernelBackend& backend, const AttentionParams& p,
                         const ScalarDecayGrads& grads)
    : BackendFamily(backend), p_(p), plain_(p), grads_(grads) {
  check_attention_params(p);
  check_gradient_views(grads.dout, grads.dq, grads.dk, grads.dv, p.batch, p.seqlen, p.heads);
  plain_.doc_start = nullptr;
}

ScalarDecay& ScalarDecay::with_documents(LocalDocuments docs, float* scratch) {
  LASP2_CHECK(docs.starts.size() == docs.ids.size(), "every document start needs its document");
  LASP2_CHECK(docs.starts.empty() || p_.batch == 1, "packed documents need batch size 1");
  docs_ = std::move(docs);
  seg_state_ = scratch;
  zeros_ = scratch + p_.bh() * p_.state_elems();
  table_ = zeros_ + p_.bh() * p_.state_elems();
  return *this;
}

int64_t ScalarDecay::backward_scratch_bytes(const AttentionParams& p, bool need_dg) {
  return need_dg ? sp::q_dot_bytes(p) + sp::round_up8(2 * p.bh() * 4) : 0;
}

// --- states kept from forward for backward --------------------------------------

ScalarDecay& ScalarDecay::with_saved_states(float* buffer, const PartLayout& layout) {
  saved_states_ = buffer;
  saved_layout_ = layout;
  return *this;
}

// The local parts' slots one after another, the pair of a balanced rank's parts, or the
// local sequence as one part (the schedule's single-device path) from the start:
// whichever needs most.
int64_t ScalarDecay::saved_states_floats(const KernelBackend& backend, const AttentionParams& p,
                                         const PartLayout& layout) {
  if (p.seqlen <= 0) return 0;
  const std::vector<TokenRange> ranges = layout.local_ranges(p.seqlen);
  int64_t parts = 0;
  for (const TokenRange& r : ranges) parts += backend.saved_states_floats(p, r);
  const std::optional<PartPair> pair = PartPair::of(p, ranges);
  if (pair) parts = std::max(parts, backend.saved_states_floats(pair->params, pair->range));
  return std::max(parts, backend.saved_states_floats(p, {0, p.seqlen}));
}

float* ScalarDecay::saved_slot(TokenRange part) const {
  if (saved_states_ == nullptr || !docs_.starts.empty()) return nullptr;
  if (be_.saved_states_floats(p_, part) == 0) return nullptr;
  if (part.begin == 0 && part.end == p_.seqlen) return saved_states_;
  int64_t offset = 0;
  for (int i = 0; i < saved_layout_.parts_per_rank; ++i) {
    const TokenRange r = saved_layout_.local_range(i, p_.seqlen);
    if (r == part) return saved_states_ + offset;
    offset += be_.saved_states_floats(p_, r);
  }
  return nullptr;  // not a part of the layout: nothing kept
}

// --- segments (packed documents with states) ---------------------------------

std::vector<ScalarDecay::Segment> ScalarDecay::segments(TokenRange part) const {
  std::vector<Segment> out;
  int64_t begin = part.begin, doc = -1;
  const auto first = std::lower_bound(docs_.starts.begin(), docs_.starts.end(), part.begin);
  for (auto it = first; it != docs_.starts.end() && *it < part.end; ++it) {
    if (*it > begin) out.push_back({{begin, *it}, doc});
    begin = *it;
    doc = docs_.ids[it - docs_.starts.begin()];
  }
  out.push_back({{begin, part.end}, doc});
  return out;
}

bool ScalarDecay::segmented(TokenRange part, const DocStates& docs) const {
  if (!docs.any()) return false;
  const auto first = std::lower_bound(docs_.starts.begin(), docs_.starts.end(), part.begin);
  return first != docs_.starts.end() && *first < part.end;  // a start inside the part
}

const float* ScalarDecay::entering_of(const Segment& s, const float* entering,
                                      const DocStates& docs) const {
  return s.doc < 0 ? entering : doc_state(docs.initial, s.doc, shape().state_floats);
}

const float* ScalarDecay::leaving_of(const Segment& s, TokenRange part, const PartStates& states,
                                     const DocStates& docs) const {
  if (s.range.end == part.end) return states.leaving_grad;
  // A segment ending inside the part ends its document: the head's is the one before
  // the part's first start.
  const auto next = std::lower_bound(docs_.starts.begin(), docs_.starts.end(), s.range.end);
  const int64_t doc = docs_.ids[next - docs_.starts.begin()] - 1;
  return doc_state(docs.final_dstate, doc, shape().state_floats);
}

void ScalarDecay::segment_summary(TokenRange range, void* stream) const {
  be_.part_state(plain_, range, seg_state_, table_ + p_.bh(), stream);
}

void ScalarDecay::apply_segment(const float* x, float* out, void* stream) const {
  if (x == nullptr) {
    be_.copy(out, seg_state_, shape().state_floats, stream);
    return;
  }
  be_.fill_zero(table_, p_.bh(), stream);
  be_.combine_prefix({x, seg_state_, seg_state_}, table_, 2, p_.bh(), p_.state_elems(), out, stream);
}

// --- PartFamily ---------------------------------------------------------------

void ScalarDecay::summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                            void* stream) const {
  // L = -inf past a start; the part's segment states kept where its forward keeps them
  kept_summaries_.put(part, be_.part_state_keeping(p_, part, out.state, out.map, saved_slot(part), stream));
  if (!docs.any() && !out.want_head) return;
  const std::vector<Segment> segs = segments(part);
  const int64_t S = shape().state_floats;
  if (out.want_head) {
    if (segs[0].doc >= 0) {  // the part starts with a document: identity, nothing
      be_.fill_zero(out.head_state, S, stream);
      be_.fill_zero(out.head_map, p_.bh(), stream);
    } else {
      be_.part_state(plain_, segs[0].range, out.head_state, out.head_map, stream);
    }
  }
  for (size_t i = 0; i < segs.size(); ++i) {
    const Segment& s = segs[i];
    if (s.doc < 0) continue;
    const bool last = i + 1 == segs.size();
    if (!last && docs.finals == nullptr) continue;
    if (last && docs.initial == nullptr) continue;  // the kernel's M already starts from zero
    segment_summary(s.range, stream);
    apply_segment(doc_state(docs.initial, s.doc, S), last ? out.state : docs.finals + s.doc * S, stream);
  }
}

void ScalarDecay::combine_prefix(const std::vector<const float*>& states, const float* maps,
                                 int target, float* out, void* stream) const {
  be_.combine_prefix(states, maps, target, p_.bh(), p_.state_elems(), out, stream);
}

void ScalarDecay::forward(TokenRange part, const float* entering, const DocStates& docs,
                          void* stream) const {
  // what summarize kept for this part, if anything; given back once the pass is enqueued
  const std::unique_ptr<KeptPartWork> kept = kept_summaries_.take(part);
  if (!segmented(part, docs)) {
    be_.chunk_forward_kept(p_, part, entering, o_, saved_slot(part), kept.get(), stream);
    return;
  }
  for (const Segment& s : segments(part)) {
    be_.chunk_forward(plain_, s.range, entering_of(s, entering, docs), o_, stream);
  }
}

void ScalarDecay::add_entering_output(TokenRange part, const float* entering,
                                      void* stream) const {
  be_.add_prefix_output(p_, part, entering, o_, stream);
}

void ScalarDecay::entering_grad(TokenRange part, float* dstate, void* stream) const {
  if (!docs_.starts.empty()) {  // parts cut at documents with states: their dk/dv passes run per segment
    be_.part_dstate(p_, part, grads_.dout, dstate, stream);
    return;
  }
  kept_dstates_.put(part, be_.part_dstate_keeping(p_, part, grads_.dout, dstate, stream));
}

void ScalarDecay::combine_suffix(const std::vector<const float*>& dstates, const float* maps,
                                 int target, float* out, void* stream) const {
  be_.combine_suffix(dstates, maps, target, p_.bh(), p_.state_elems(), out, stream);
}

void ScalarDecay::backward_entering(TokenRange part, const float* entering, const DocStates& docs,
                                    void* scratch, void* stream) const {
  const DgScratch g(p_, scratch, grads_.dg != nullptr);
  if (!segmented(part, docs)) {
    // reads what entering_grad kept, and keeps for the dk/dv pass (backward)
    kept_dstates_.put(part, be_.chunk_backward_dq_keeping(p_, part, grads_.dout, entering, grads_.dq, g.q_dot_dq,
                                                          saved_slot(part), kept_dstates_.take(part), stream));
    return;
  }
  for (const Segment& s : segments(part)) {
    be_.chunk_backward_dq(plain_, s.range, grads_.dout, entering_of(s, entering, docs), grads_.dq,
                          g.q_dot_dq, stream);
  }
}

void ScalarDecay::backward(TokenRange part, const PartStates& states, const DocStates& docs,
                           void* scratch, void* stream) const {
  const DgScratch g(p_, scratch, grads_.dg != nullptr);
  if (!segmented(part, docs)) {
    dkdv(p_, part, states, grads_, part, scratch, stream);
    return;
  }
  const int64_t S = shape().state_floats;
  be_.fill_zero(zeros_, S, stream);
  for (const Segment& s : segments(part)) {
    const float* entering = entering_of(s, states.entering, docs);
    const float* leaving = leaving_of(s, part, states, docs);
    float* d_initial = s.doc >= 0 && docs.d_initial != nullptr ? docs.d_initial + s.doc * S : nullptr;
    if (leaving != nullptr && (grads_.dg != nullptr || d_initial != nullptr)) segment_summary(s.range, stream);
    const float* dg_offset = nullptr;
    if (grads_.dg != nullptr && leaving != nullptr) {
      be_.state_dot(entering != nullptr ? entering : zeros_, seg_state_, table_ + p_.bh(), leaving,
                    p_.bh(), p_.state_elems(), g.dg_offset, stream);
      dg_offset = g.dg_offset;
    }
    be_.chunk_backward_dkdv(plain_, s.range, grads_.dout, leaving, grads_.dk, grads_.dv, g.q_dot_dq,
                            dg_offset, grads_.dg, stream);
    if (d_initial == nullptr) continue;
    // d h0 = dM (own outputs) + exp(L) dS_out
    be_.part_dstate(plain_, s.range, grads_.dout, d_initial, stream);
    if (leaving == nullptr) continue;
    be_.fill_zero(table_, p_.bh(), stream);
    be_.fill_zero(table_ + 2 * p_.bh(), p_.bh(), stream);
    be_.combine_suffix({d_initial, d_initial, leaving}, table_, 0, p_.bh(), p_.state_elems(), d_initial,
                       stream);
  }
}

void ScalarDecay::dkdv(const AttentionParams& p, TokenRange range, const PartStates& states,
                       const ScalarDecayGrads& grads, TokenRange kept_key, void* scratch, void* stream) const {
  const DgScratch g(p_, scratch, grads.dg != nullptr);
  const float* dg_offset = nullptr;
  if (grads.dg != nullptr && states.leaving_grad != nullptr) {
    // <S_out, D> with S_out = exp(L) P + M: the part of dg owed to what follows the part.
    be_.state_dot(states.entering, states.state, states.map, states.leaving_grad, p.bh(), p.state_elems(),
                  g.dg_offset, stream);
    dg_offset = g.dg_offset;
  }
  // what entering_grad kept for this part, if anything; given back once the pass is enqueued
  const std::unique_ptr<KeptPartWork> kept = kept_dstates_.take(kept_key);
  be_.chunk_backward_dkdv_kept(p, range, grads.dout, states.leaving_grad, grads.dk, grads.dv, g.q_dot_dq, dg_offset,
                               grads.dg, kept.get(), stream);
}

// --- a balanced rank's two parts as one pair (part_pair.h) -----------------------

std::optional<PartPair> ScalarDecay::pair_of(const std::vector<TokenRange>& parts, const DocStates& docs) const {
  if (!docs_.starts.empty() || docs.any()) return std::nullopt;
  return PartPair::of(p_, parts);
}

float* ScalarDecay::pair_slot(const PartPair& pair) const {
  if (saved_states_ == nullptr || be_.saved_states_floats(pair.params, pair.range) == 0) return nullptr;
  return saved_states_;
}

void ScalarDecay::summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                                  const std::vector<PartSummary>& out, void* stream) const {
  const std::optional<PartPair> pair = pair_of(parts, docs);
  const auto M = laid_out(out, &PartSummary::state, shape().state_floats);
  const auto L = laid_out(out, &PartSummary::map, shape().map_floats);
  if (!pair || out[0].want_head || out[1].want_head || !M || !L || !*M || !*L) {
    PartFamily::summarize_parts(parts, docs, out, stream);
    return;
  }
  kept_summaries_.put(pair->key(), be_.part_state_keeping(pair->params, pair->range, *M, *L, pair_slot(*pair), stream));
}

void ScalarDecay::forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                                const DocStates& docs, void* stream) const {
  const std::optional<PartPair> pair = pair_of(parts, docs);
  const std::optional<const float*> in = laid_out(entering, shape().state_floats);
  if (!pair || !in) {
    PartFamily::forward_parts(parts, entering, docs, stream);
    return;
  }
  const std::unique_ptr<KeptPartWork> kept = kept_summaries_.take(pair->key());
  be_.chunk_forward_kept(pair->params, pair->range, *in, pair->view(o_), pair_slot(*pair), kept.get(), stream);
}

void ScalarDecay::entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                                 void* stream) const {
  const std::optional<PartPair> pair = pair_of(parts, {});
  const std::optional<float*> out = laid_out(dstates, shape().state_floats);
  if (!pair || !out || *out == nullptr) {
    PartFamily::entering_grads(parts, dstates, stream);
    return;
  }
  kept_dstates_.put(pair->key(),
                    be_.part_dstate_keeping(pair->params, pair->range, pair->view(grads_.dout), *out, stream));
}

void ScalarDecay::backward_entering_parts(const std::vector<TokenRange>& parts,
                                          const std::vector<const float*>& entering, const DocStates& docs,
                                          void* scratch, void* stream) const {
  const std::optional<PartPair> pair = pair_of(parts, docs);
  const std::optional<const float*> in = laid_out(entering, shape().state_floats);
  if (!pair || !in) {
    PartFamily::backward_entering_parts(parts, entering, docs, scratch, stream);
    return;
  }
  const DgScratch g(p_, scratch, grads_.dg != nullptr);
  kept_dstates_.put(pair->key(), be_.chunk_backward_dq_keeping(pair->params, pair->range, pair->view(grads_.dout),
                                                               *in, pair->view(grads_.dq), g.q_dot_dq,
                                                               pair_slot(*pair), kept_dstates_.take(pair->key()),
                                                               stream));
}

void ScalarDecay::backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                                 const DocStates& docs, void* scratch, void* stream) const {
  const std::optional<PartPair> pair = pair_of(parts, docs);
  const int64_t S = shape().state_floats, Mp = shape().map_floats;
  const auto entering = laid_out(states, &PartStates::entering, S);
  const auto own = laid_out(states, &PartStates::state, S);
  const auto map = laid_out(states, &PartStates::map, Mp);
  const auto leaving = laid_out(states, &PartStates::leaving_grad, S);
  if (!pair || !entering || !own || !map || !leaving || !*entering || !*own || !*map) {
    PartFamily::backward_parts(parts, states, docs, scratch, stream);
    return;
  }
  const ScalarDecayGrads grads{pair->view(grads_.dout), pair->view(grads_.dq), pair->view(grads_.dk),
                               pair->view(grads_.dv), grads_.dg};
  dkdv(pair->params, pair->range, {*entering, *own, *map, *leaving}, grads, pair->key(), scratch, stream);
}

}  // namespace lasp2
