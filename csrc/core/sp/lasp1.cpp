// The LASP-1 ring schedule over any KernelBackend and Communicator (see lasp1.h).
//
// The one-hop state updates reuse the LASP-2 combines on a 3-entry part list whose
// log-decay table is [0, L_r, 0] (rows that only ever multiply a zero accumulator):
//   combine_prefix({S_in, M_r, -}, target 2)   = exp(L_r) S_in + M_r       (S_out)
//   combine_suffix({-, dM_r, dS_out}, target 0) = dM_r + exp(L_r) dS_out    (dS_in)
#include "lasp2/lasp1.h"

#include <memory>
#include <vector>

#include "schedule_util.h"

namespace lasp2 {
namespace {

void check_ring(Communicator* comm, const PartLayout& layout, const AttentionParams& p) {
  LASP2_CHECK(layout.parts_per_rank == 1,
              "LASP-1 supports the contiguous layout only (parts_per_rank = 1)");
  sp::check_group(comm, layout, p);
}

using sp::q_dot_bytes;
using sp::round_up8;

constexpr int kTableRows = 3;  // the [0, L_r, 0] log-decay table

// Fills the [0, L_r, 0] table.
void decay_table(const KernelBackend& be, const float* log_decay, int64_t bh, float* table,
                 void* stream) {
  be.fill_zero(table, kTableRows * bh, stream);
  be.copy(table + bh, log_decay, bh, stream);
}

}  // namespace

int64_t Lasp1Saved::entering_state_floats(const AttentionParams& p) {
  return StateRecord::of(p).states();
}
int64_t Lasp1Saved::local_record_floats(const AttentionParams& p) {
  return StateRecord::of(p).size();
}

int64_t lasp1_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  if (l.world_size == 1) return 0;
  const StateRecord rec = StateRecord::of(p);
  return round_up8((rec.states() + kTableRows * rec.bh) * 4);  // S_out, decay table
}

int64_t lasp1_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  int64_t bytes = need_dg ? q_dot_bytes(p) : 0;
  if (l.world_size > 1) {
    const StateRecord rec = StateRecord::of(p);
    // dM, dS_out, dS_in, decay table, dg offset
    bytes += round_up8((3 * rec.states() + kTableRows * rec.bh + rec.bh) * 4);
  }
  return bytes;
}

void lasp1_forward(const KernelBackend& be, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp1Saved& saved,
                   void* workspace, void* stream) {
  check_ring(comm, layout, p);
  const TokenRange all{0, p.seqlen};
  if (layout.world_size == 1) {
    be.chunk_forward(p, all, nullptr, o, stream);
    return;
  }
  const StateRecord rec = StateRecord::of(p);
  const int rank = layout.rank, last = layout.world_size - 1;
  float* M = saved.local_record;
  float* L = saved.local_record + rec.states();
  float* s_out = static_cast<float*>(workspace);
  float* table = s_out + rec.states();

  // The local part's own state first: the hop below then costs only a combine.
  be.part_state(p, all, M, L, stream);
  if (rank == 0) {
    be.fill_zero(saved.entering_state, rec.states(), stream);
  } else {
    comm->recv(saved.entering_state, rec.states(), ScalarType::kFloat32, rank - 1, stream)
        ->wait(stream);
  }
  std::unique_ptr<CommWork> sent;
  if (rank < last) {
    const float* out = M;  // rank 0: S_out = M_0
    if (rank > 0) {
      decay_table(be, L, rec.bh, table, stream);
      be.combine_prefix({saved.entering_state, M, M}, table, 2, rec.bh, rec.state_elems, s_out,
                        stream);
      out = s_out;
    }
    sent = comm->send(out, rec.states(), ScalarType::kFloat32, rank + 1, stream);
  }
  be.chunk_forward(p, all, rank == 0 ? nullptr : saved.entering_state, o, stream);
  if (sent) sent->wait(stream);  // the send buffer lives in the workspace
}

void lasp1_backward(const KernelBackend& be, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp1Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream) {
  check_ring(comm, layout, p);
  const TokenRange all{0, p.seqlen};
  char* scratch = static_cast<char*>(workspace);
  void* q_dot_dq = nullptr;
  if (dg != nullptr) {
    q_dot_dq = scratch;
    scratch += q_dot_bytes(p);
  }
  if (layout.world_size == 1) {
    be.chunk_backward_dq(p, all, dout, nullptr, dq, q_dot_dq, stream);
    be.chunk_backward_dkdv(p, all, dout, nullptr, dk, dv, q_dot_dq, nullptr, dg, stream);
    return;
  }
  const StateRecord rec = StateRecord::of(p);
  const int rank = layout.rank, last = layout.world_size - 1;
  const float* M = saved.local_record;
  const float* L = saved.local_record + rec.states();
  float* dM = reinterpret_cast<float*>(scratch);
  float* ds_out = dM + rec.states();
  float* ds_in = ds_out + rec.states();
  float* table = ds_in + rec.states();
  float* dg_offset = table + kTableRows * rec.bh;

  // dq needs only the cached entering state: it runs before this rank joins the chain.
  be.chunk_backward_dq(p, all, dout, rank == 0 ? nullptr : saved.entering_state, dq, q_dot_dq,
                       stream);
  if (rank > 0) be.part_dstate(p, all, dout, dM, stream);  // rank 0 has nothing to send
  if (rank < last) {
    comm->recv(ds_out, rec.states(), ScalarType::kFloat32, rank + 1, stream)->wait(stream);
  }
  std::unique_ptr<CommWork> sent;
  if (rank > 0) {
    const float* out = dM;  // last rank: dS_in = dM
    if (rank < last) {
      decay_table(be, L, rec.bh, table, stream);
      be.combine_suffix({dM, dM, ds_out}, table, 0, rec.bh, rec.state_elems, ds_in, stream);
      out = ds_in;
    }
    sent = comm->send(out, rec.states(), ScalarType::kFloat32, rank - 1, stream);
  }
  const bool has_later = rank < last;
  if (dg != nullptr && has_later) {
    // <S_out, dS_out> with S_out = exp(L_r) S_in + M_r: the part of dg owed to later ranks.
    be.state_dot(saved.entering_state, M, L, ds_out, rec.bh, rec.state_elems, dg_offset, stream);
  }
  be.chunk_backward_dkdv(p, all, dout, has_later ? ds_out : nullptr, dk, dv, q_dot_dq,
                         dg != nullptr && has_later ? dg_offset : nullptr, dg, stream);
  if (sent) sent->wait(stream);
}

}  // namespace lasp2
