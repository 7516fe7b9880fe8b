// LASP-2: sequence-parallel causal linear attention with ONE AllGather of
// per-part memory states in forward and ONE of state gradients in backward.
//
// Forward, on each rank:
//   1. M_i, L_i = state and log total decay of each local part (from zero)
//   2. AllGather the (M, L) records across the group                [async]
//   3. overlap: o = local causal linear attention of each part alone   [while 2 runs]
//   4. P_i = prefix combine of the records of all earlier parts
//   5. o += scale * exp(G_t) q_t^T P_i      (or, fused: step 3 with P_i as entry state)
// Backward mirrors it: dM_i = scale * sum_t exp(G_t) q_t dO_t^T, ONE AllGather,
// dq with the cached P_i while it runs, then suffix combine D_i and dk, dv with D_i
// as the gradient leaving the part. The gate gradient needs no further exchange:
// dg = reverse cumsum of (q.dq - k.dk) within the part + <exp(L_i) P_i + M_i, D_i>.
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/part_layout.h"

namespace lasp2 {

// What forward keeps for backward ("KV-state caching"), all fp32 on the device:
struct Lasp2Saved {
  float* local_records = nullptr;  // [parts_per_rank][StateRecord::size()]: M_i then L_i
  float* prefix_states = nullptr;  // [parts_per_rank][B*H*dk*dv]: P_i
  float* log_decays = nullptr;     // [total_parts][B*H]: L of every part, global order

  static int64_t local_records_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t prefix_states_floats(const AttentionParams& p, const PartLayout& l);
  static int64_t log_decays_floats(const AttentionParams& p, const PartLayout& l);
};

struct Lasp2Options {
  // true: the AllGather overlaps the local attention and the prefix term is added
  // afterwards; false: wait for the AllGather and run one fused pass per part.
  bool overlap_forward = true;
};

// Scratch sizes in bytes (multiples of 8); the caller allocates them on the
// tensors' device.
int64_t lasp2_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l);
int64_t lasp2_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg);

// comm may be null for a single device (then the layout must have world_size 1).
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
