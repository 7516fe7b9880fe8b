// The LASP-1 ring schedule over any PartFamily and Communicator (see lasp1.h).
//
// The one-hop state updates reuse the family's folds on a 3-entry list whose map
// table is [0, A_r, 0] (rows that only ever multiply a zero accumulator):
//   combine_prefix({S_in, M_r, -}, target 2)   = A_r S_in + M_r       (S_out)
//   combine_suffix({-, dM_r, dS_out}, target 0) = dM_r + A_r^T dS_out  (dS_in)
#include "lasp2/lasp1.h"

#include <memory>
#include <vector>

#include "lasp2/scalar_decay.h"
#include "schedule_util.h"

namespace lasp2 {
namespace {

void check_ring(Communicator* comm, const PartLayout& layout, const PartFamily& f) {
  LASP2_CHECK(layout.parts_per_rank == 1,
              "LASP-1 supports the contiguous layout only (parts_per_rank = 1)");
  sp::check_group(comm, layout, f);
}

using sp::round_up8;

constexpr int kTableRows = 3;  // the [0, A_r, 0] map table

// Fills the [0, A_r, 0] table.
void map_table(const PartFamily& f, const float* map, float* table, void* stream) {
  const int64_t n = f.shape().map_floats;
  f.fill_zero(table, kTableRows * n, stream);
  f.copy(table + n, map, n, stream);
}

int64_t forward_bytes(const SummaryShape& s, const PartLayout& l) {
  if (l.world_size == 1) return 0;
  // S_out, map table, the head record a family may write (no documents cross the ring)
  return round_up8((s.state_floats + kTableRows * s.map_floats + s.record_floats()) * 4);
}

int64_t backward_bytes(const SummaryShape& s, int64_t family_scratch, const PartLayout& l) {
  int64_t bytes = round_up8(family_scratch);
  if (l.world_size > 1) {
    bytes += round_up8((3 * s.state_floats + kTableRows * s.map_floats) * 4);  // dM, dS_out, dS_in, table
  }
  return bytes;
}

}  // namespace

int64_t Lasp1Saved::entering_state_floats(const AttentionParams& p) {
  return ScalarDecay::shape_of(p).state_floats;
}
int64_t Lasp1Saved::local_record_floats(const AttentionParams& p) {
  return ScalarDecay::shape_of(p).record_floats();
}

int64_t lasp1_forward_workspace_bytes(const PartFamily& f, const PartLayout& l) {
  return forward_bytes(f.shape(), l);
}

int64_t lasp1_backward_workspace_bytes(const PartFamily& f, const PartLayout& l) {
  return backward_bytes(f.shape(), f.backward_scratch_bytes(), l);
}

void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, void* workspace, void* stream) {
  check_ring(comm, layout, f);
  const TokenRange all{0, f.local_tokens()};
  if (layout.world_size == 1) {
    f.forward(all, nullptr, DocStates{}, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int rank = layout.rank, last = layout.world_size - 1;
  float* M = saved.local_record;
  float* A = saved.local_record + sh.state_floats;
  float* s_out = static_cast<float*>(workspace);
  float* table = s_out + sh.state_floats;
  float* head = table + kTableRows * sh.map_floats;

  // The local part's own summary first: the hop below then costs only a fold.
  f.summarize(all, DocStates{}, {M, A, head, head + sh.state_floats, false}, stream);
  if (rank == 0) {
    f.fill_zero(saved.entering_state, sh.state_floats, stream);
  } else {
    comm->recv(saved.entering_state, sh.state_floats, ScalarType::kFloat32, rank - 1, stream)
        ->wait(stream);
  }
  std::unique_ptr<CommWork> sent;
  if (rank < last) {
    const float* out = M;  // rank 0: S_out = M_0
    if (rank > 0) {
      map_table(f, A, table, stream);
      f.combine_prefix({saved.entering_state, M, M}, table, 2, s_out, stream);
      out = s_out;
    }
    sent = comm->send(out, sh.state_floats, ScalarType::kFloat32, rank + 1, stream);
  }
  f.forward(all, rank == 0 ? nullptr : saved.entering_state, DocStates{}, stream);
  if (sent) sent->wait(stream);  // the send buffer lives in the workspace
}

void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, void* workspace, void* stream) {
  check_ring(comm, layout, f);
  const TokenRange all{0, f.local_tokens()};
  void* family_scratch = workspace;
  if (layout.world_size == 1) {
    f.backward_entering(all, nullptr, DocStates{}, family_scratch, stream);
    f.backward(all, PartStates{}, DocStates{}, family_scratch, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int rank = layout.rank, last = layout.world_size - 1;
  const float* M = saved.local_record;
  const float* A = saved.local_record + sh.state_floats;
  float* dM = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                       round_up8(f.backward_scratch_bytes()));
  float* ds_out = dM + sh.state_floats;
  float* ds_in = ds_out + sh.state_floats;
  float* table = ds_in + sh.state_floats;

  // What needs only the cached entering state runs before this rank joins the chain.
  f.backward_entering(all, rank == 0 ? nullptr : saved.entering_state, DocStates{}, family_scratch,
                     stream);
  if (rank > 0) f.entering_grad(all, dM, stream);  // rank 0 has nothing to send
  if (rank < last) {
    comm->recv(ds_out, sh.state_floats, ScalarType::kFloat32, rank + 1, stream)->wait(stream);
  }
  std::unique_ptr<CommWork> sent;
  if (rank > 0) {
    const float* out = dM;  // last rank: dS_in = dM
    if (rank < last) {
      map_table(f, A, table, stream);
      f.combine_suffix({dM, dM, ds_out}, table, 0, ds_in, stream);
      out = ds_in;
    }
    sent = comm->send(out, sh.state_floats, ScalarType::kFloat32, rank - 1, stream);
  }
  const PartStates states{saved.entering_state, M, A, rank < last ? ds_out : nullptr};
  f.backward(all, states, DocStates{}, family_scratch, stream);
  if (sent) sent->wait(stream);
}

// --- the scalar-decay family -------------------------------------------------

int64_t lasp1_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  return forward_bytes(ScalarDecay::shape_of(p), l);
}

int64_t lasp1_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  return backward_bytes(ScalarDecay::shape_of(p), ScalarDecay::backward_scratch_bytes(p, need_dg), l);
}

void lasp1_forward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp1Saved& saved,
                   void* workspace, void* stream) {
  lasp1_forward(ScalarDecay(backend, p, o), comm, layout, saved, workspace, stream);
}

void lasp1_backward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp1Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream) {
  lasp1_backward(ScalarDecay(backend, p, ScalarDecayGrads{dout, dq, dk, dv, dg}), comm, layout,
                 saved, workspace, stream);
}

}  // namespace lasp2
