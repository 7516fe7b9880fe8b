// LASP-2: sequence-parallel linear recurrences with ONE AllGather of per-part
// summaries in forward and ONE of state gradients in backward, over any PartFamily
// (part_family.h: the scalar-decay family today, the delta rule next).
//
// Forward, on each rank:
//   1. (M_i, A_i) = summary of each local part (its state from zero and its map)
//   2. AllGather the records across the group                         [async]
//   3. overlap: o = the family's output of each part alone             [while 2 runs]
//   4. P_i = prefix fold A_{i-1} P_{i-1} + M_{i-1} over all earlier parts (P_0: initial state)
//   5. o += entering-state term of P_i  (or, fused: step 3 with P_i entering)
//   final state (optional) = the fold over every part, on every rank: no extra exchange.
// Backward mirrors it: dP_i = gradient of the state entering part i from its own outputs,
// ONE AllGather, the family's P-only gradients (scalar decay: dq) while it runs, then the
// suffix D_i = dP_{i+1} + A_{i+1}^T D_{i+1} (D_last: final-state gradient) and the rest of
// the gradients with D_i leaving the part. The initial-state gradient is the same fold
// carried through part 0 (on every rank).
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2 {

// What forward keeps for backward ("KV-state caching"), all fp32 on the device:
struct Lasp2Saved {
  float* local_records = nullptr;  // [parts_per_rank][record_floats]: M_i then A_i
  float* prefix_states = nullptr;  // [parts_per_rank][state_floats]: P_i
  float* maps = nullptr;           // [total_parts + 2][map_floats]: 0, A of every part in
                                   // global order, 0 (the zero rows pad the folds' ends)

  static int64_t local_records_floats(const SummaryShape& s, const PartLayout& l);
  static int64_t prefix_states_floats(const SummaryShape& s, const PartLayout& l);
  static int64_t maps_floats(const SummaryShape& s, const PartLayout& l);
  // The scalar-decay family's sizes (maps are its log decays).
  static int64_t local_records_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t prefix_states_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t log_decays_floats(const AttentionParams& p, const PartLayout& l);
};

// Optional states of the whole sequence, one state_floats block (one state per batch row
// and head), fp32 on the device. Every rank passes the same initial state and final-state
// gradient and gets the same final state and initial-state gradient: they are values of
// the one sequence, replicated over the group (not partial sums to be reduced).
struct SequenceStates {
  const float* initial = nullptr;     // enters the first part (null: zero); both directions
  float* final_state = nullptr;       // forward: receives the state leaving the last part
  const float* final_grad = nullptr;  // backward: gradient of the final state (null: zero)
  float* initial_grad = nullptr;      // backward: receives the initial state's gradient
};

struct Lasp2Options {
  // true: the AllGather overlaps the local outputs and the entering-state term is added
  // afterwards (families with add_entering_output); false: wait for the AllGather and run
  // one fused pass per part.
  bool overlap_forward = true;
};

// Scratch sizes in bytes (multiples of 8); the caller allocates them on the device.
int64_t lasp2_forward_workspace_bytes(const PartFamily& f, const PartLayout& l);
int64_t lasp2_backward_workspace_bytes(const PartFamily& f, const PartLayout& l);

// comm may be null for a single device (then the layout must have world_size 1).
void lasp2_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp2Saved& saved, const SequenceStates& states, void* workspace,
                   const Lasp2Options& options, void* stream);
void lasp2_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp2Saved& saved, const SequenceStates& states, void* workspace,
                    void* stream);

// The scalar-decay family (ScalarDecay over `backend`), without sequence states.
int64_t lasp2_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l);
int64_t lasp2_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg);
void lasp2_forward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp2Saved& saved,
                   void* workspace, const Lasp2Options& options, void* stream);
// dg (nullable) is [B, T, H] contiguous of the decay dtype; needed for kGate and a
// trainable kFixed.
void lasp2_backward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp2Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream);

}  // namespace lasp2
