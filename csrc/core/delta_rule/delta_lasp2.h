// LASP-2 for the delta-rule family: ONE AllGather of fp32 part summaries forward,
// ONE of state-gradient summaries backward, sizes independent of the sequence length.
//
// Forward, on each rank:
//   1. (A_i, M_i) and the head map (A_head_i, M_head_i) of each local part
//   2. AllGather them (plus, with packed documents and final states wanted, the end
//      states of the documents that begin and end inside a part)
//   3. prefix over the parts in global order (every rank, tiny):
//        P_0 = initial state of the sequence's first document (or 0),
//        P_{g+1} = A_g P_g + M_g          (P_G: the state leaving the sequence)
//   4. output pass of each local part with P_g entering it
//   5. final states: the last document's is P_G; one that ends at the end of part
//      g's head is A_head_g P_g + M_head_g; the others come from the gather.
// Backward mirrors it:
//   1. E_i = gradient of the state entering each local part from its own outputs
//   2. AllGather the E_i (plus each rank's gradient of the final states, summed
//      after the gather: the final states are replicated, the loss is the sum of
//      the ranks' losses)
//   3. suffix in reverse global order with the transposed maps:
//        D_{G-1} = dF(last document),  dP_g = E_g + A_g^T D_g + A_head_g^T dF(head doc of g),
//        D_{g-1} = dP_g,  and dP_0 is the gradient of the first initial state
//   4. local backward of each part with P_g entering and D_g leaving.
// Replicated tensors follow the sum-of-losses convention: a rank returns its share
// of the initial states' gradient (the first document's on the rank holding part 0,
// a packed document's on the rank where it begins); summed over the group (as the
// data/context-parallel gradient reduction does) they equal one process's.
#pragma once

#include <vector>

#include "delta_rule/delta_backend.h"
#include "lasp2/communicator.h"
#include "lasp2/part_layout.h"

namespace lasp2::delta {

// The sequences of the batch: rows (no packing, N = B) or packed documents (B = 1).
struct DeltaSequences {
  int64_t count = 0;  // N: rows of the [N, H, dk, dv] initial / final states
  // Packed only, one entry per global part: the document whose end is the end of
  // the part's head (-1: no document starts in the part). Empty: not packed.
  std::vector<int64_t> head_doc;
  bool packed() const { return !head_doc.empty(); }
};

// What forward keeps for backward, fp32 on the device:
struct DeltaSaved {
  float* records = nullptr;   // [total_parts][record]: A, M, A_head, M_head; global order
  float* prefixes = nullptr;  // [total_parts + 1][B*H*dk*dv]: P_g; the last is P_G

  static int64_t record_floats(const DeltaParams& p);
  static int64_t records_floats(const DeltaParams& p, const PartLayout& l);
  static int64_t prefixes_floats(const DeltaParams& p, const PartLayout& l);
};

int64_t delta_lasp2_forward_workspace_bytes(const DeltaParams& p, const PartLayout& l,
                                            const DeltaSequences& seqs, bool want_finals);
int64_t delta_lasp2_backward_workspace_bytes(const DeltaParams& p, const PartLayout& l,
                                             const DeltaSequences& seqs, bool have_final_dstate);

// initial, finals: nullable fp32 [N, H, dk, dv]. comm may be null for one device.
void delta_lasp2_forward(const DeltaKernelBackend& be, Communicator* comm,
                         const PartLayout& layout, const DeltaParams& p,
                         const DeltaSequences& seqs, const float* initial, MutView o,
                         const DeltaSaved& saved, float* finals, void* workspace, void* stream);

// final_dstate, d_initial: nullable fp32 [N, H, dk, dv]; dg / dbeta as in
// DeltaKernelBackend::backward (nullable).
void delta_lasp2_backward(const DeltaKernelBackend& be, Communicator* comm,
                          const PartLayout& layout, const DeltaParams& p,
                          const DeltaSequences& seqs, const float* initial, ConstView dout,
                          const DeltaSaved& saved, const float* final_dstate, MutView dq,
                          MutView dk, MutView dv, void* dg, void* dbeta, float* d_initial,
                          void* workspace, void* stream);

}  // namespace lasp2::delta
