// The scalar-decay family (S_t = a_t S_{t-1} + k_t v_t^T, see params.h) as a
// PartFamily: its summary is the record (M, L) with A = exp(L) I, and its kernels are
// a KernelBackend's (csrc/core/cpu, csrc/core/cuda). One object describes one call:
// the forward constructor takes the output, the backward one the gradients.
#pragma once

#include "lasp2/kernel_backend.h"
#include "lasp2/part_family.h"

namespace lasp2 {

struct ScalarDecayGrads {
  ConstView dout;
  MutView dq, dk, dv;
  void* dg = nullptr;  // [B, T, H] contiguous of the decay dtype, or null (not needed)
};

class ScalarDecay final : public PartFamily {
 public:
  ScalarDecay(const KernelBackend& backend, const AttentionParams& p, MutView o);
  ScalarDecay(const KernelBackend& backend, const AttentionParams& p, const ScalarDecayGrads& grads);

  static SummaryShape shape_of(const AttentionParams& p) { return {p.bh() * p.state_elems(), p.bh()}; }
  // q.dq per token (for dg) and the dg offset of one part.
  static int64_t backward_scratch_bytes(const AttentionParams& p, bool need_dg);

  SummaryShape shape() const override { return shape_of(p_); }
  int64_t local_tokens() const override { return p_.seqlen; }
  Device device() const override { return be_.device(); }

  void summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                 void* stream) const override;
  void combine_prefix(const std::vector<const float*>& states, const float* maps, int target,
                      float* out, void* stream) const override;
  void forward(TokenRange part, const float* entering, const DocStates& docs,
               void* stream) const override;
  bool has_entering_output() const override { return true; }
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

  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    be_.copy(dst, src, count, stream);
  }
  void fill_zero(float* dst, int64_t count, void* stream) const override {
    be_.fill_zero(dst, count, stream);
  }
  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    be_.add(dst, src, count, stream);
  }

 private:
  const KernelBackend& be_;
  AttentionParams p_;
  MutView o_;
  ScalarDecayGrads grads_;
};

}  // namespace lasp2
