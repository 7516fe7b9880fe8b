// LASP-1: sequence-parallel linear recurrences as a ring of point-to-point state
// passes (Sun et al., 2024, "Linear Attention Sequence Parallelism"), over the same
// PartFamily (part_family.h) and Communicator as LASP-2 (the scalar-decay family and
// the delta rule, csrc/core/delta_rule/delta_family.h). Contiguous layout only: rank r
// holds part r of P; no sequence states (the final state would need one more
// collective after the ring: use LASP-2 for them). Written below for the scalar-decay
// family (A = exp(L) I); the delta rule's A is its d_k x d_k map.
//
// Forward, on rank r:
//   1. M_r, L_r = state and log total decay of the local part (from zero)
//   2. recv S_in = state entering part r from rank r-1         (r > 0; S_in = 0 on rank 0)
//   3. S_out = exp(L_r) S_in + M_r, send it to rank r+1        (r < P-1)
//   4. o = the part's outputs with S_in as the entering state (fused)
// Steps 2-3 form a serial chain of P-1 hops; each hop costs one tiny combine, the
// heavy step 4 runs after the rank has passed its state on.
// Backward mirrors it ("KV-state caching": S_in and (M_r, L_r) are kept from
// forward, nothing is recomputed or re-sent):
//   1. dq with the cached S_in (no communication needed: PartFamily::backward_entering)
//   2. dM_r = scale * sum_t exp(G_t) q_t dO_t^T (gradient of S_in from local queries)
//   3. recv dS_out = gradient of the state leaving part r from rank r+1   (r < P-1)
//   4. dS_in = dM_r + exp(L_r) dS_out, send it to rank r-1               (r > 0)
//   5. dk, dv with dS_out as the gradient leaving the part
// Gate gradient: dg_t = reverse cumsum of (q.dq - k.dk) within the part
//   + <S_out, dS_out>, S_out = exp(L_r) S_in + M_r (KernelBackend::state_dot).
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2 {

// What forward keeps for backward, all fp32 on the device:
struct Lasp1Saved {
  float* entering_state = nullptr;  // [state_floats]: S_in (zeros on rank 0)
  float* local_record = nullptr;    // [record_floats]: M_r then A_r

  static int64_t entering_state_floats(const SummaryShape& s) { return s.state_floats; }
  static int64_t local_record_floats(const SummaryShape& s) { return s.record_floats(); }
  // The scalar-decay family's sizes.
  static int64_t entering_state_floats(const AttentionParams& p);
  static int64_t local_record_floats(const AttentionParams& p);
};

// Scratch sizes in bytes (multiples of 8); the caller allocates them on the device.
int64_t lasp1_forward_workspace_bytes(const PartFamily& f, const PartLayout& l);
int64_t lasp1_backward_workspace_bytes(const PartFamily& f, const PartLayout& l);

// comm may be null for a single device (then the layout must have world_size 1).
// The layout must be contiguous (parts_per_rank = 1).
void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, void* workspace, void* stream);
void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, void* workspace, void* stream);

// The scalar-decay family (ScalarDecay over `backend`).
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
