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
//   packed documents: the head map of each part rides in the same AllGather; the end
//   state of a document ending in part i's head is A_head_i P_i + M_head_i, one ending
//   inside the part it began in comes from that part's rank (in the same gather), the
//   last one is the fold over every part.
// Backward mirrors it: dP_i = gradient of the state entering part i from its own outputs,
// ONE AllGather (with each rank's final-state gradients, summed after it), the family's
// P-only gradients (scalar decay: dq) while it runs, then the suffix
// D_i = E_{i+1} + A_{i+1}^T D_{i+1}, E_i = dP_i + A_head_i^T dF(document ending in the
// head of part i) (D_last: the last sequence's final-state gradient), and the rest of
// the gradients with D_i leaving the part. The initial-state gradient is the same fold
// carried through part 0, on the rank holding part 0.
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2 {

// Optional states of the sequences, fp32 on the device, one block of N state blocks
// [N, H, dk, dv] (a state block is one state of the family for one document: with
// packed documents B = 1, without them N = B and the block is the whole state). The
// convention is "the loss is the sum of the ranks' losses": every rank passes its own
// final-state gradient (they are summed over the group inside the backward AllGather)
// and every rank gets the same final states; each rank returns its SHARE of the
// initial-state gradient (a sequence's on the rank where it enters: global part 0, or
// the part holding a packed document's start; zero elsewhere), so summing over the
// group gives one process's gradient.
struct SequenceStates {
  // Packed documents: per global part, the document whose end is the end of the part's
  // head (-1: no document starts in the part). Empty: each batch row is a sequence.
  std::vector<int64_t> head_doc;
  int64_t count = 0;  // N, packed only (documents)

  const float* initial = nullptr;     // enters each sequence / document (null: zero)
  float* final_state = nullptr;       // forward: receives the states leaving them
  const float* final_grad = nullptr;  // backward: this rank's gradient of final_state
  float* initial_grad = nullptr;      // backward: this rank's share of initial's gradient

  bool packed() const { return !head_doc.empty(); }
  bool any() const {
    return initial != nullptr || final_state != nullptr || final_grad != nullptr ||
           initial_grad != nullptr;
  }
  // Floats of the [N, H, dk, dv] block for a family state of `state_floats`.
  int64_t floats(int64_t state_floats) const { return packed() ? count * state_floats : state_floats; }
};

// What forward keeps for backward ("KV-state caching"), all fp32 on the device:
struct Lasp2Saved {
  float* local_records = nullptr;  // the parts_per_rank records: every M_i, then every A_i
  float* prefix_states = nullptr;  // [parts_per_rank][state_floats]: P_i
  float* maps = nullptr;           // [total_parts + 2][map_floats]: 0, A of every part in
                                   // global order, 0 (the zero rows pad the folds' ends)
  float* head_maps = nullptr;      // packed documents: [total_parts][map_floats], A_head
  // Optional, the scalar family over a KernelBackend (the lasp2_forward / lasp2_backward
  // below): what the backend keeps for its dq pass (the CUDA backend's segment states,
  // ScalarDecay::with_saved_states), segment_states_floats values; null: recomputed.
  float* segment_states = nullptr;

  static int64_t local_records_floats(const SummaryShape& s, const PartLayout& l);
  static int64_t prefix_states_floats(const SummaryShape& s, const PartLayout& l);
  static int64_t maps_floats(const SummaryShape& s, const PartLayout& l);
  static int64_t head_maps_floats(const SummaryShape& s, const PartLayout& l, bool packed);
  // The scalar-decay family's sizes (maps are its log decays).
  static int64_t local_records_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t prefix_states_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t log_decays_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t segment_states_floats(const KernelBackend& backend, const AttentionParams& p,
                                       const PartLayout& l);
};

struct Lasp2Options {
  // true: the AllGather overlaps the local outputs and the entering-state term is added
  // afterwards (families with add_entering_output); false: wait for the AllGather and run
  // one fused pass per part.
  bool overlap_forward = true;
};

// Scratch sizes in bytes (multiples of 8); the caller allocates them on the device.
int64_t lasp2_forward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                      const SequenceStates& states = {});
int64_t lasp2_backward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                       const SequenceStates& states = {});

// comm may be null for a single device (then the layout must have world_size 1).
void lasp2_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp2Saved& saved, const SequenceStates& states, void* workspace,
                   const Lasp2Options& options, void* stream);
void lasp2_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp2Saved& saved, const SequenceStates& states, void* workspace,
                    void* stream);

// One device without sequence states, what lasp2_forward / lasp2_backward run for a
// layout of world_size 1 and no SequenceStates: the family's passes over the whole local
// sequence (nothing to gather), reading no Lasp2Saved buffer; the backward's only
// workspace is the family's scratch (backward_scratch_bytes()). For callers that skip
// the LASP-2 buffers altogether (the binding's one-device autograd node).
void one_device_forward(const PartFamily& f, void* stream);
void one_device_backward(const PartFamily& f, void* family_scratch, void* stream);

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
