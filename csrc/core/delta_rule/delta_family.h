// The delta-rule family (GDN, KDA; delta_params.h) as a PartFamily: its summary is the
// affine map (A, M) of a part, A d_k x d_k, and its kernels are a DeltaKernelBackend's
// (cpu/, and the CUDA backend), so LASP-2 and LASP-1 (csrc/core/sp) run it unchanged.
// One object describes one call: the forward constructor takes the output, the
// backward one the gradients. The schedules run entering_grad and then backward on
// each part; what the backend keeps from the first for the second (its per-chunk
// scratch on CUDA) the object holds in between and frees after backward. What the
// forward keeps for the backward (with_forward_kept: the CUDA chunked kernels' prep and
// state-pass outputs) lives in a caller's buffer from the forward call to the backward one.
//
// The balanced split's two local parts (B = 1, no per-document states in play) run as one
// batch of two rows (delta_pair.h): one backend call per pass where the single-part calls
// would make two over half parts.
#pragma once

#include <optional>
#include <vector>

#include "delta_rule/delta_backend.h"
#include "delta_rule/delta_pair.h"
#include "lasp2/backend_family.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2::delta {

struct DeltaGrads {
  ConstView dout;
  MutView dq, dk, dv;
  void* dg = nullptr;     // [B, T, H] or [B, T, H, dk] in the gate dtype, or null
  void* dbeta = nullptr;  // [B, T, H] in the gate dtype, or null
  bool doc_states = false;  // the call has per-document initial states or end-state gradients
};

class DeltaFamily final : public BackendFamily<DeltaKernelBackend> {
 public:
  // fold_scratch: one state (B*H*dk*dv fp32) on the backend's device, where the folds
  // keep their running value (the backend's map products write to a separate buffer).
  DeltaFamily(const DeltaKernelBackend& backend, const DeltaParams& p, MutView o,
              float* fold_scratch);
  DeltaFamily(const DeltaKernelBackend& backend, const DeltaParams& p, const DeltaGrads& grads,
              float* fold_scratch);

  static SummaryShape shape_of(const DeltaParams& p) {
    return {p.bh() * p.state_elems(), p.bh() * p.map_elems()};
  }

  // The buffer the forward fills and the backward of the same call reads (both objects get
  // the same one): forward_kept_floats(backend, p, layout) fp32 values, one slot per local
  // part in order (with one part a rank, that part is the whole local sequence, which the
  // one-device schedule runs as one), or the two parts' pair from the buffer's start (its
  // size covers both forms). 0: the backend keeps nothing (the CPU backend, or
  // LASP2_DELTA_KEEP_FORWARD=0); a null buffer: nothing kept, the backward recomputes.
  // Its contents depend on the state entering each part, which the schedules hand to the
  // backward as they handed it to the forward (LASP-2's prefix states, LASP-1's entering
  // states); a slot is read only where the backend's chunked backward takes the part.
  DeltaFamily& with_forward_kept(float* buffer, const PartLayout& layout);
  static int64_t forward_kept_floats(const DeltaKernelBackend& backend, const DeltaParams& p,
                                     const PartLayout& layout);

  SummaryShape shape() const override { return shape_of(p_); }
  int64_t local_tokens() const override { return p_.seqlen; }

  void summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                 void* stream) const override;
  void combine_prefix(const std::vector<const float*>& states, const float* maps, int target,
                      float* out, void* stream) const override;
  void forward(TokenRange part, const float* entering, const DocStates& docs,
               void* stream) const override;
  PoisonTarget output() const override {
    return {o_.data, p_.dtype, p_.batch, p_.seqlen, p_.heads, p_.dim_v, o_.stride};
  }

  void entering_grad(TokenRange part, float* dstate, void* stream) const override;
  void combine_suffix(const std::vector<const float*>& dstates, const float* maps, int target,
                      float* out, void* stream) const override;
  void backward(TokenRange part, const PartStates& states, const DocStates& docs, void* scratch,
                void* stream) const override;

  // A balanced rank's two parts as one DeltaPair where they form one; else the calls above.
  void summarize_parts(const std::vector<TokenRange>& parts, const DocStates& docs,
                       const std::vector<PartSummary>& out, void* stream) const override;
  void forward_parts(const std::vector<TokenRange>& parts, const std::vector<const float*>& entering,
                     const DocStates& docs, void* stream) const override;
  void entering_grads(const std::vector<TokenRange>& parts, const std::vector<float*>& dstates,
                      void* stream) const override;
  void backward_parts(const std::vector<TokenRange>& parts, const std::vector<PartStates>& states,
                      const DocStates& docs, void* scratch, void* stream) const override;

 private:
  float* kept_slot(TokenRange part) const;
  // The pair the parts form, if the family may run them as one (no per-document states
  // in play: the forward and the backward of one call decide alike).
  std::optional<DeltaPair> pair_of(const std::vector<TokenRange>& parts, const DocStates& docs) const;
  // The pair's forward-kept slot (the buffer's start; null: none kept).
  float* pair_slot(const DeltaPair& pair) const;
  // Where step k of n writes, so that the last step lands in `out`.
  float* step_target(int k, int n, float* out) const { return (n - k) % 2 == 0 ? out : fold_; }

  DeltaParams p_;
  MutView o_;
  DeltaGrads grads_;
  float* fold_;
  float* forward_kept_ = nullptr;  // with_forward_kept
  PartLayout kept_layout_{};
  // entering_grad's kept work per part (at most parts_per_rank entries; a pair's under
  // PairRows::key), until backward
  mutable KeptByPart kept_;
};

}  // namespace lasp2::delta
