// LASP-1: sequence-parallel linear recurrences as a ring of point-to-point state
// passes (Sun et al., 2024, "Linear Attention Sequence Parallelism"), over the same
// PartFamily (part_family.h) and Communicator as LASP-2 (the scalar-decay family and
// the delta rule, csrc/core/delta_rule/delta_family.h). Written below for the
// scalar-decay family (A = exp(L) I); the delta rule's A is its d_k x d_k map.
//
// The ring follows the global part order: the state leaving part g goes to the rank
// holding part g+1 (a local hand-over when that is the same rank). Contiguous layout:
// rank r-1 -> r. Balanced layout (rank r holds parts r and 2P-1-r): up the ranks
// through parts 0..P-1, then down again through parts P..2P-1, 2(P-1) hops in all.
//
// Forward, for each local part g in global order:
//   1. M_g, A_g = state and map of the part (from zero), for all local parts first
//   2. recv S_in = state entering part g from the rank of part g-1  (g = 0: the initial
//      state or zero)
//   3. S_out = A_g S_in + M_g, send it to the rank of part g+1
//   4. o = the part's outputs with S_in as the entering state (fused)
// Steps 2-3 form a serial chain; each hop costs one tiny combine, the heavy step 4
// runs after the rank has passed its state on.
// Backward mirrors it in reverse global order ("KV-state caching": S_in and (M_g, A_g)
// are kept from forward, nothing is recomputed or re-sent):
//   1. dq with the cached S_in (no communication needed: PartFamily::backward_entering)
//   2. dM_g = gradient of S_in from the part's own outputs
//   3. recv dS_out = gradient of the state leaving part g from the rank of part g+1
//   4. dS_in = dM_g + A_g^T dS_out, send it to the rank of part g-1
//   5. dk, dv with dS_out as the gradient leaving the part
// Gate gradient (scalar family): dg_t = reverse cumsum of (q.dq - k.dk) within the part
//   + <S_out, dS_out>, S_out = exp(L_g) S_in + M_g (KernelBackend::state_dot).
//
// Sequence states (SequenceStates of lasp2.h, the same convention as LASP-2): the
// initial state enters part 0 (a packed document's, where it begins); a document
// ending in a part's head ends with A_head S_in + M_head, computed by that part's rank
// from the S_in it received; the last one leaves the last part. Each rank writes the
// end states it knows into a zeroed [N, H, dk, dv] block, and ONE AllGather of those
// blocks (summed) gives every rank all final states: the one collective LASP-1 adds,
// since the end states arise on different ranks. Backward: ONE AllGather sums the
// ranks' final-state gradients before the ring; the last part's leaving gradient is
// the last sequence's, and dS_in of a part also carries A_head^T dF(head document).
//
// "NaN at the call" (lasp2/call_check.h): when the call's cross-rank check armed its
// device values, the forward gathers them in one more AllGather (at most 32 bytes per
// rank, posted before the ring, waited for after it) and fills the outputs and final
// states with NaN on every rank when the ranks' values fail.
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/lasp2.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2 {

// What forward keeps for backward, all fp32 on the device, one block per local part:
struct Lasp1Saved {
  float* entering_state = nullptr;  // [parts][state_floats]: S_in (zeros where nothing enters)
  float* local_record = nullptr;    // [parts][record_floats]: M_g then A_g
  float* head_maps = nullptr;       // [parts][map_floats]: A_head (packed documents' states only)

  static int64_t entering_state_floats(const SummaryShape& s, int parts_per_rank = 1) {
    return parts_per_rank * s.state_floats;
  }
  static int64_t local_record_floats(const SummaryShape& s, int parts_per_rank = 1) {
    return parts_per_rank * s.record_floats();
  }
  static int64_t head_maps_floats(const SummaryShape& s, int parts_per_rank, bool packed) {
    return packed ? parts_per_rank * s.map_floats : 0;
  }
  // The scalar-decay family's sizes.
  static int64_t entering_state_floats(const AttentionParams& p, int parts_per_rank = 1);
  static int64_t local_record_floats(const AttentionParams& p, int parts_per_rank = 1);
};

// Scratch sizes in bytes (multiples of 8); the caller allocates them on the device.
int64_t lasp1_forward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                      const SequenceStates& states = {});
int64_t lasp1_backward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                       const SequenceStates& states = {});

// comm may be null for a single device (then the layout must have world_size 1).
// saved.head_maps is needed for packed documents with sequence states.
void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, const SequenceStates& states, void* workspace,
                   void* stream);
void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, const SequenceStates& states, void* workspace,
                    void* stream);
// Without sequence states.
void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, void* workspace, void* stream);
void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, void* workspace, void* stream);

// The scalar-decay family (ScalarDecay over `backend`), without sequence states.
int64_t lasp1_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l);
int64_t lasp1_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg);
void lasp1_forward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp1Saved& saved,
                   void* workspace, void* stream);
// dg (nullable) is [B, T, H] contiguous of the decay dtype; needed for kGate and a
// trainable kFixed.
void lasp1_backward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp1Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream);

}  // namespace lasp2
