// What the sequence-parallel schedules (LASP-2, LASP-1) know about a family of
// linear recurrences: nothing but how a part's summary is made, combined and used.
// The schedules (csrc/core/sp) are written against this interface only, so a new
// family is one folder (csrc/core/<family>/) that implements it; the schedule, the
// communicator path, the group checks and the thread tests are reused unchanged.
//
// The contract. Per batch row and head the recurrence carries a state S (d_k x d_v,
// fp32 on the wire). Over a token range ("part") the state passes through an affine
// map of the state entering it:
//
//     S_out = A S_in + M        M: the part's state started from zero
//                               A: the part's transition (acts on S_in from the left)
//
//   scalar decay (csrc/core/sp/scalar_decay.cpp):  A = exp(L) I, stored as L per (b, h);
//     L = -inf when a document starts inside the part (nothing passes through).
//   (the folds also combine lists of states; add() sums the ranks' final-state gradients)
//   delta rule (csrc/core/delta_rule/):  A = prod_t a_t (I - b_t k_t k_t^T), d_k x d_k.
//
// A part's summary is the record [M: state_floats][A: map_floats] (fp32, the unit of the
// forward AllGather). With the parts' records in global order the schedules compute
//
//   forward   P_j = A_{j-1} P_{j-1} + M_{j-1}        (P_0 = initial state or zero)
//             o over part j with P_j entering it
//   backward  dP_j = gradient of the state entering part j from part j's OWN outputs
//             D_j  = dP_{j+1} + A_{j+1}^T D_{j+1}     (D_last = final-state gradient or zero)
//             input gradients of part j from (P_j entering, D_j leaving, dO)
//
// What a family implements (all calls enqueue on `stream`; buffers live on device()):
//   shape()               sizes of one state and one map for this call's batch and heads
//   summarize(part)       M and A of the part (nothing entering it; a document begun inside
//                         starts from its own initial state), and the map of its head (below)
//   combine_prefix        the P_j fold over a list of states and a contiguous map table
//   combine_suffix        the D_j fold with the transposed maps
//   forward(part, P)      outputs of the part with P entering (nullptr: zero)
//   add_entering_output   optional: forward(part, P) == forward(part, 0) + this, which lets
//                         LASP-2 overlap the AllGather with forward(part, 0)
//   entering_grad(part)   dP_j (only outputs the entering state reaches count)
//   backward_entering     optional: gradients needing only P (the scalar family's dq);
//                         runs while the backward AllGather is in flight
//   backward(part, ...)   the remaining gradients, given P_j, the part's own record and D_j
//   *_parts               optional: a rank's parts in one call each way (LASP-2's schedule
//                         calls these; by default one single-part call per part), which lets
//                         a family run a balanced rank's two parts as one pass (part_pair.h)
// Buffers the family keeps between backward_entering and backward (per token scratch
// like q.dq) are the family's backward scratch: it asks for backward_scratch_bytes()
// and the schedule hands the same block to both calls.
//
// Packed documents (B = 1). A token may start a document: the state before it is
// replaced by the document's initial state (or zero). A part holding a document start
// has A = 0. Its *head* is its tokens before the first start (empty when it starts
// with one); the head's map (A_head, M_head) gives the end state of the document that
// enters the part and ends inside it: A_head P_j + M_head. The per-document states
// (DocStates) reach the family's calls: initial states of documents begun inside the
// part, end states of those that also end inside it, and their gradients. The
// schedule handles the document that enters each part (through P_j) and the one that
// leaves it (through D_j).
//
// One object describes one call: it holds the problem (params, inputs) and where the
// outputs or gradients go, so the schedule passes only token ranges and fp32 states
// (see ScalarDecay in scalar_decay.h, and AffineFamily in tests/cpp/test_part_family.cpp,
// a dense-A family written as plain loops, which is the delta rule's shape of summary).
// The folds may meet map rows the schedule filled with zeros; such rows only ever
// multiply a zero accumulator, so a family needs A * 0 = 0 there (true for a zero matrix,
// and for the scalar encoding L = 0). Gradients of what builds A (gates, betas) come from
// backward(): the part's P_j, own record and D_j are all it needs (the scalar family adds
// <A P_j + M_j, D_j> to its gate gradient).
#pragma once

#include <vector>

#include "lasp2/call_check.h"
#include "lasp2/types.h"

namespace lasp2 {

// Sizes, in floats, of one state (all batch rows and heads) and one part's map.
struct SummaryShape {
  int64_t state_floats = 0;  // B*H*dk*dv
  int64_t map_floats = 0;    // B*H (scalar decay) or B*H*dk*dk (delta rule)
  int64_t record_floats() const { return state_floats + map_floats; }
};

// Per-document states, fp32 [N, H, dk, dv] (one state block per document; without
// packed documents a batch row is a document and N = B). Any pointer may be null.
struct DocStates {
  const float* initial = nullptr;       // states entering documents that begin inside a part
  float* finals = nullptr;              // out: end states of documents begun and ended inside a part
  const float* final_dstate = nullptr;  // gradients of the documents' end states
  float* d_initial = nullptr;           // out: gradients of `initial` for documents begun inside a part

  bool any() const {
    return initial != nullptr || finals != nullptr || final_dstate != nullptr || d_initial != nullptr;
  }
};

// Where summarize() writes: the part's record and its head's. The head buffers are
// always valid; with want_head false the family may leave them unwritten.
struct PartSummary {
  float* state = nullptr;       // M
  float* map = nullptr;         // A
  float* head_state = nullptr;  // M_head
  float* head_map = nullptr;    // A_head
  bool want_head = false;
};

// The states backward() gets for one part. On the single-device path (one part, no
// sequence states) all are null: nothing enters, nothing leaves. Otherwise `entering`,
// `state` and `map` are valid buffers (zeros when nothing enters) and `leaving_grad` is
// null only when nothing leaves the part.
struct PartStates {
  const float* entering = nullptr;      // P_j
  const float* state = nullptr;         // M_j, this part's own record ...
  const float* map = nullptr;           // ... and its map A_j
  const float* leaving_grad = nullptr;  // D_j
};

class PartFamily {
 public:
  virtual ~PartFamily() = default;

  virtual SummaryShape shape() const = 0;
  virtual int64_t local_tokens() const = 0;  // the local sequence length the parts cut up
  virtual Device device() const = 0;         // where the family's buffers live

  // --- forward ---------------------------------------------------------------
  // docs.initial: states of documents begun inside the part; docs.finals: receives the
  // end states of documents begun and ended inside it (others left untouched).
  virtual void summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                         void* stream) const = 0;
  // out = fold over m < target of acc = A_m acc + M_m, acc starting at zero; maps is
  // [parts][map_floats] in the order of `states`.
  virtual void combine_prefix(const std::vector<const float*>& states, const float* maps,
                              int target, float* out, void* stream) const = 0;
  virtual void forward(TokenRange part, const float* entering, const DocStates& docs,
                       void* stream) const = 0;
  virtual bool has_entering_output() const { return false; }
  virtual void add_entering_output(TokenRange part, const float* entering, void* stream) const;
  // The call's output o (forward objects): LASP-2 fills it with NaN on every rank when the
  // ranks' device values armed for the call disagree (lasp2/call_check.h). {}: none.
  virtual PoisonTarget output() const { return {}; }

  // --- backward --------------------------------------------------------------
  virtual int64_t backward_scratch_bytes() const { return 0; }
  virtual void entering_grad(TokenRange part, float* dstate, void* stream) const = 0;
  // out = fold over m > target, from the last down, of acc = A_m^T acc + dM_m.
  virtual void combine_suffix(const std::vector<const float*>& dstates, const float* maps,
                              int target, float* out, void* stream) const = 0;
  virtual void backward_entering(TokenRange part, const float* entering, const DocStates& docs,
                                 void* scratch, void* stream) const;
  // docs: initial states, end-state gradients (the head's document and inner ones) and
  // the initial-state gradients to write, of documents inside the part.
  virtual void backward(TokenRange part, const PartStates& states, const DocStates& docs,
                        void* scratch, void* stream) const = 0;

  // --- all of a rank's local parts in one call (what LASP-2's schedule calls) ------
  // Each takes the rank's parts in local order with one entry per part in every list, and
  // by default makes the single-part call above for each. A family may instead run them
  // as one pass (ScalarDecay: the balanced split's two halves as a batch of two rows),
  // for which the schedule lays each list's buffers out one after another in one
  // [parts][state_floats] (or [parts][map_floats]) array; a null entry (nothing enters or
  // leaves that part) has its slot there filled with zeros.
  virtual void summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                               const std::vector<PartSummary>& out, void* stream) const;
  virtual void forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                             const DocStates& docs, void* stream) const;
  virtual void entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                              void* stream) const;
  virtual void backward_entering_parts(const std::vector<TokenRange>& parts,
                                       const std::vector<const float*>& entering, const DocStates& docs,
                                       void* scratch, void* stream) const;
  virtual void backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                              const DocStates& docs, void* scratch, void* stream) const;

  // --- memory on device() ----------------------------------------------------
  virtual void copy(float* dst, const float* src, int64_t count, void* stream) const = 0;
  virtual void fill_zero(float* dst, int64_t count, void* stream) const = 0;
  // dst[r * count, +count) = rows[r] (null: zeros)
  virtual void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const = 0;
  virtual void add(float* dst, const float* src, int64_t count, void* stream) const = 0;  // dst += src
};

}  // namespace lasp2
