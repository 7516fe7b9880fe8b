// The scalar-decay family (S_t = a_t S_{t-1} + k_t v_t^T, see params.h) as a
// PartFamily: its summary is the record (M, L) with A = exp(L) I, and its kernels are
// a KernelBackend's (csrc/core/cpu, csrc/core/cuda). One object describes one call:
// the forward constructor takes the output, the backward one the gradients.
//
// Packed documents with sequence states (with_documents): the kernels know document
// starts only as resets to zero, so the family cuts each part at its starts into
// segments without one (the kernels then run with no starts, the document's initial
// state entering its segment) and folds the segments' own (M, L) into the part's
// summary, the documents' end states and the initial states' gradients.
//
// The balanced split's two local parts (B = 1, no documents with states) run as one
// batch of two rows (part_pair.h): one backend call per pass where the single-part calls
// would make two over half parts.
#pragma once

#include <optional>
#include <vector>

#include "lasp2/backend_family.h"
#include "lasp2/kept_part_work.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"
#include "lasp2/part_pair.h"

namespace lasp2 {

struct ScalarDecayGrads {
  ConstView dout;
  MutView dq, dk, dv;
  void* dg = nullptr;  // [B, T, H] contiguous of the decay dtype, or null (not needed)
};

// Where documents start in the local tokens, ascending, and the global index of each.
struct LocalDocuments {
  std::vector<int64_t> starts, ids;

  // From the local document starts (host memory, one flag per local token) and the
  // schedule's head_doc (per global part, the document ending in its head): the k-th
  // start inside global part g begins document head_doc[g] + 1 + k.
  static LocalDocuments of(const uint8_t* host_doc_start, int64_t local_tokens,
                           const PartLayout& layout, const std::vector<int64_t>& head_doc);
};

class ScalarDecay final : public BackendFamily<KernelBackend> {
 public:
  ScalarDecay(const KernelBackend& backend, const AttentionParams& p, MutView o);
  ScalarDecay(const KernelBackend& backend, const AttentionParams& p, const ScalarDecayGrads& grads);

  static SummaryShape shape_of(const AttentionParams& p) { return {p.bh() * p.state_elems(), p.bh()}; }

  // Segments the parts at `docs.starts` when per-document states are passed; `scratch`
  // holds documents_scratch_floats(p) fp32 values on the backend's device.
  ScalarDecay& with_documents(LocalDocuments docs, float* scratch);
  static int64_t documents_scratch_floats(const AttentionParams& p) {
    return 2 * p.bh() * p.state_elems() + 3 * p.bh();
  }
  // q.dq per token (for dg) and the dg offsets of the local parts (at most two).
  static int64_t backward_scratch_bytes(const AttentionParams& p, bool need_dg);

  // States the backend keeps from forward for its backward (KernelBackend::
  // saved_states_floats; the CUDA backend's segment states): `buffer` holds
  // saved_states_floats(backend, p, layout) fp32 values, one slot per local part of
  // `layout` or, where the schedule runs the local sequence as one part (one device
  // without sequence states), the whole of it. The forward fills the slots, a backward
  // with the same inputs, params, layout and buffer reads them. Parts cut at documents
  // (with_documents) neither fill nor read theirs. Null: nothing is kept.
  ScalarDecay& with_saved_states(float* buffer, const PartLayout& layout);
  static int64_t saved_states_floats(const KernelBackend& backend, const AttentionParams& p,
                                     const PartLayout& layout);

  SummaryShape shape() const override { return shape_of(p_); }
  int64_t local_tokens() const override { return p_.seqlen; }

  void summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                 void* stream) const override;
  void combine_prefix(const std::vector<const float*>& states, const float* maps, int target,
                      float* out, void* stream) const override;
  void forward(TokenRange part, const float* entering, const DocStates& docs,
               void* stream) const override;
  bool has_entering_output() const override { return true; }
  PoisonTarget output() const override {
    return {o_.data, p_.dtype, p_.batch, p_.seqlen, p_.heads, p_.dim_v, o_.stride};
  }
  void add_entering_output(TokenRange part, const float* entering, void* stream) const override;

  int64_t backward_scratch_bytes() const override {
    return backward_scratch_bytes(p_, grads_.dg != nullptr);
  }
  void entering_grad(TokenRange part, float* dstate, void* stream) const override;
  void combine_suffix(const std::vector<const float*>& dstates, const float* maps, int target,
                      float* out, void* stream) const override;
  void backward_entering(TokenRange part, const float* entering, const DocStates& docs,
                         void* scratch, void* stream) const override;
  void backward(TokenRange part, const PartStates& states, const DocStates& docs, void* scratch,
                void* stream) const override;

  // A balanced rank's two parts as one PartPair where they form one; else the calls above.
  void summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                       const std::vector<PartSummary>& out, void* stream) const override;
  void forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                     const DocStates& docs, void* stream) const override;
  void entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                      void* stream) const override;
  void backward_entering_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                               const DocStates& docs, void* scratch, void* stream) const override;
  void backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                      const DocStates& docs, void* scratch, void* stream) const override;

 private:
  // The pair the parts form, if the family may run them as one (no document states).
  std::optional<PartPair> pair_of(const std::vector<TokenRange>& parts, const DocStates& docs) const;
  // The pair's saved-states slot (the buffer's start; null: none kept). The forward and
  // the backward pair alike (the same parts, entering states laid out by the schedule), so
  // what one writes there the other reads in the same layout.
  float* pair_slot(const PartPair& pair) const;
  // The dk/dv pass over `range` of `p` (one part, or a pair's two rows), after the
  // state_dot that gives it the dg offset of what follows the part.
  void dkdv(const AttentionParams& p, TokenRange range, const PartStates& states, const ScalarDecayGrads& grads,
            TokenRange kept_key, void* scratch, void* stream) const;

  struct Segment {
    TokenRange range;
    int64_t doc;  // -1: the document entering the part
  };
  // The part cut at its document starts (one segment when none lies inside).
  std::vector<Segment> segments(TokenRange part) const;
  bool segmented(TokenRange part, const DocStates& docs) const;
  // The state entering a segment: the part's for the head, else the document's.
  const float* entering_of(const Segment& s, const float* entering, const DocStates& docs) const;
  // The gradient leaving a segment: the part's for the last, else its document's end.
  const float* leaving_of(const Segment& s, TokenRange part, const PartStates& states,
                          const DocStates& docs) const;
  // M and L of a segment from zero, into the scratch (L is row 1 of the fold table).
  void segment_summary(TokenRange range, void* stream) const;
  // out = exp(L) x + M of the last segment_summary (x null: M).
  void apply_segment(const float* x, float* out, void* stream) const;
  // The saved-states slot of a part (null: none kept for it).
  float* saved_slot(TokenRange part) const;

  AttentionParams p_;
  AttentionParams plain_;  // p_ without document starts (segments hold none)
  MutView o_;
  ScalarDecayGrads grads_;
  LocalDocuments docs_;
  float* seg_state_ = nullptr;  // scratch: [S] segment state, [S] zeros, [3][bh] fold table
  float* zeros_ = nullptr;
  float* table_ = nullptr;
  float* saved_states_ = nullptr;  // with_saved_states
  PartLayout saved_layout_;
  // What the backend kept from one pass over a part for the next (a pair's: PairRows::key):
  // summarize's for forward; entering_grad's, then the dq pass's, for the dk/dv pass.
  mutable KeptByPart kept_summaries_;
  mutable KeptByPart kept_dstates_;
};

}  // namespace lasp2
