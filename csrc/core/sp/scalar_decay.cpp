// The scalar-decay family on a KernelBackend (see scalar_decay.h).
#include "lasp2/scalar_decay.h"

#include "schedule_util.h"

namespace lasp2 {
namespace {

// The family's backward scratch: q_t . dq_t per token, then the dg offset of one part.
struct DgScratch {
  void* q_dot_dq = nullptr;
  float* dg_offset = nullptr;

  DgScratch(const AttentionParams& p, void* scratch, bool need_dg) {
    if (!need_dg) return;
    q_dot_dq = scratch;
    dg_offset = reinterpret_cast<float*>(static_cast<char*>(scratch) + sp::q_dot_bytes(p));
  }
};

void check_docs(const DocStates& docs) {
  LASP2_CHECK(docs.initial == nullptr && docs.finals == nullptr && docs.final_dstate == nullptr &&
                  docs.d_initial == nullptr,
              "the scalar-decay family takes no per-document states yet");
}

}  // namespace

ScalarDecay::ScalarDecay(const KernelBackend& backend, const AttentionParams& p, MutView o)
    : be_(backend), p_(p), o_(o) {}

ScalarDecay::ScalarDecay(const KernelBackend& backend, const AttentionParams& p,
                         const ScalarDecayGrads& grads)
    : be_(backend), p_(p), grads_(grads) {}

int64_t ScalarDecay::backward_scratch_bytes(const AttentionParams& p, bool need_dg) {
  return need_dg ? sp::q_dot_bytes(p) + sp::round_up8(p.bh() * 4) : 0;
}

void ScalarDecay::summarize(TokenRange part, const DocStates& docs, const PartSummary& out,
                            void* stream) const {
  check_docs(docs);
  be_.part_state(p_, part, out.state, out.map, stream);
}

void ScalarDecay::combine_prefix(const std::vector<const float*>& states, const float* maps,
                                 int target, float* out, void* stream) const {
  be_.combine_prefix(states, maps, target, p_.bh(), p_.state_elems(), out, stream);
}

void ScalarDecay::forward(TokenRange part, const float* entering, const DocStates& docs,
                          void* stream) const {
  check_docs(docs);
  be_.chunk_forward(p_, part, entering, o_, stream);
}

void ScalarDecay::add_entering_output(TokenRange part, const float* entering,
                                      void* stream) const {
  be_.add_prefix_output(p_, part, entering, o_, stream);
}

void ScalarDecay::entering_grad(TokenRange part, float* dstate, void* stream) const {
  be_.part_dstate(p_, part, grads_.dout, dstate, stream);
}

void ScalarDecay::combine_suffix(const std::vector<const float*>& dstates, const float* maps,
                                 int target, float* out, void* stream) const {
  be_.combine_suffix(dstates, maps, target, p_.bh(), p_.state_elems(), out, stream);
}

void ScalarDecay::backward_entering(TokenRange part, const float* entering, const DocStates& docs,
                                    void* scratch, void* stream) const {
  check_docs(docs);
  const DgScratch s(p_, scratch, grads_.dg != nullptr);
  be_.chunk_backward_dq(p_, part, grads_.dout, entering, grads_.dq, s.q_dot_dq, stream);
}

void ScalarDecay::backward(TokenRange part, const PartStates& states, const DocStates& docs,
                           void* scratch, void* stream) const {
  check_docs(docs);
  const DgScratch s(p_, scratch, grads_.dg != nullptr);
  const float* dg_offset = nullptr;
  if (grads_.dg != nullptr && states.leaving_grad != nullptr) {
    // <S_out, D> with S_out = exp(L) P + M: the part of dg owed to what follows the part.
    be_.state_dot(states.entering, states.state, states.map, states.leaving_grad, p_.bh(),
                  p_.state_elems(), s.dg_offset, stream);
    dg_offset = s.dg_offset;
  }
  be_.chunk_backward_dkdv(p_, part, grads_.dout, states.leaving_grad, grads_.dk, grads_.dv,
                          s.q_dot_dq, dg_offset, grads_.dg, stream);
}

}  // namespace lasp2
