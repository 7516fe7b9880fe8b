// The LASP-1 ring schedule over any PartFamily and Communicator (see lasp1.h).
//
// The one-hop state updates reuse the family's folds on a 3-entry list whose map
// table is [0, A, 0] (rows that only ever multiply a zero accumulator):
//   combine_prefix({S_in, M, M}, target 2)     = A S_in + M            (S_out)
//   combine_suffix({E, E, dS_out}, target 0)   = E + A^T dS_out        (dS_in)
//
// "NaN at the call" (lasp2/call_check.h): a ring rank hears only from its predecessor,
// so the words the call's cross-rank check armed take one AllGather of their own
// (2 * count floats per rank, sent from the check's ring entry), posted before the ring
// and compared after it, when the outputs and final states are written: ranks whose
// words fail return NaN on every rank. The check arms alike on every rank (its row
// agreed at this call), so every rank posts that gather or none.
#include "lasp2/lasp1.h"

#include <memory>
#include <vector>

#include "lasp2/lasp2.h"  // one_device_forward / _backward
#include "lasp2/scalar_decay.h"
#include "schedule_util.h"

namespace lasp2 {
namespace {

using sp::Carve;
using sp::round_up8;

void check_ring(Communicator* comm, const PartLayout& layout, const PartFamily& f,
                const SequenceStates& seq, const Lasp1Saved& saved) {
  sp::check_group(comm, layout, f);
  sp::check_sequence_states(layout, seq);
  LASP2_CHECK(!seq.packed() || saved.head_maps != nullptr,
              "LASP-1 with packed documents' states needs the saved head maps");
}

// The ring's buffers (head_maps: check_ring).
void check_saved(const SummaryShape& s, int parts, const Lasp1Saved& saved) {
  sp::check_buffer(saved.entering_state, Lasp1Saved::entering_state_floats(s, parts), "floats",
                   "Lasp1Saved.entering_state");
  sp::check_buffer(saved.local_record, Lasp1Saved::local_record_floats(s, parts), "floats", "Lasp1Saved.local_record");
}

// The rank holding global part g.
int owner_of(const PartLayout& l, int g) {
  if (l.parts_per_rank == 1) return g;
  return g < l.world_size ? g : 2 * l.world_size - 1 - g;
}

// Whether the call is the plain single-device op (no ring, no states).
bool plain(const PartLayout& l, const SequenceStates& seq) { return l.world_size == 1 && !seq.any(); }

// Forward workspace: the states leaving the local parts (send buffers), a fold table,
// the parts' head records, with final states this rank's [N] block and the gathered ones,
// and the ranks' gathered check words (kCallCheckFloats each; used when a check is armed).
struct ForwardSpace {
  float *leaving, *table, *heads, *finals, *gathered, *words;
  int64_t floats;
  ForwardSpace(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq, void* base) {
    const int64_t D = seq.final_state != nullptr ? seq.floats(s.state_floats) : 0;
    Carve c{static_cast<float*>(base)};
    leaving = c.take(l.parts_per_rank * s.state_floats);
    table = c.take(3 * s.map_floats);
    heads = c.take(l.parts_per_rank * s.record_floats());
    finals = c.take(D);
    gathered = c.take(l.world_size * D);
    words = c.take(l.world_size * kCallCheckFloats);
    floats = c.used;
  }
};

// Backward workspace after the family's scratch: dS_in of the local parts (send
// buffers), received gradients, two states of scratch, a fold table, and with
// final-state gradients the summed [N] block and the gathered ones.
struct BackwardSpace {
  float *entering_grad, *received, *e, *e_head, *table, *final_grad, *gathered;
  int64_t floats;
  BackwardSpace(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq,
                int64_t family_scratch, void* base) {
    const int64_t D = seq.final_grad != nullptr ? seq.floats(s.state_floats) : 0;
    Carve c{base == nullptr ? nullptr
                            : reinterpret_cast<float*>(static_cast<char*>(base) + round_up8(family_scratch))};
    entering_grad = c.take(l.parts_per_rank * s.state_floats);
    received = c.take(l.parts_per_rank * s.state_floats);
    e = c.take(s.state_floats);
    e_head = c.take(s.state_floats);
    table = c.take(3 * s.map_floats);
    final_grad = c.take(D);
    gathered = c.take(l.world_size * D);
    floats = c.used;
  }
};

// Fills the [0, A, 0] table of a one-step fold.
void one_step_table(const PartFamily& f, const float* map, float* table, void* stream) {
  const int64_t n = f.shape().map_floats;
  f.fill_zero(table, 3 * n, stream);
  f.copy(table + n, map, n, stream);
}

// out = A x + M (x null: M): one part's (or head's) state M and map A applied to x.
void apply_record(const PartFamily& f, const float* x, const float* state, const float* map,
                  float* table, float* out, void* stream) {
  if (x == nullptr) {
    f.copy(out, state, f.shape().state_floats, stream);
    return;
  }
  one_step_table(f, map, table, stream);
  f.combine_prefix({x, state, state}, table, 2, out, stream);
}

// out = e + A^T d for map A.
void apply_transposed(const PartFamily& f, const float* e, const float* map, const float* d,
                      float* table, float* out, void* stream) {
  one_step_table(f, map, table, stream);
  f.combine_suffix({e, e, d}, table, 0, out, stream);
}

// dst = the sum of the ranks' `count`-float blocks of an AllGather.
void sum_over_ranks(const PartFamily& f, int world, const float* gathered, int64_t count, float* dst,
                    void* stream) {
  f.copy(dst, gathered, count, stream);
  for (int r = 1; r < world; ++r) f.add(dst, gathered + r * count, count, stream);
}

int64_t forward_bytes(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq) {
  if (plain(l, seq)) return 0;
  return round_up8(ForwardSpace(s, l, seq, nullptr).floats * 4);
}

int64_t backward_bytes(const SummaryShape& s, int64_t family_scratch, const PartLayout& l,
                       const SequenceStates& seq) {
  int64_t bytes = round_up8(family_scratch);
  if (!plain(l, seq)) bytes += round_up8(BackwardSpace(s, l, seq, 0, nullptr).floats * 4);
  return bytes;
}

}  // namespace

int64_t Lasp1Saved::entering_state_floats(const AttentionParams& p, int parts_per_rank) {
  return entering_state_floats(ScalarDecay::shape_of(p), parts_per_rank);
}
int64_t Lasp1Saved::local_record_floats(const AttentionParams& p, int parts_per_rank) {
  return local_record_floats(ScalarDecay::shape_of(p), parts_per_rank);
}

int64_t lasp1_forward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                      const SequenceStates& seq) {
  return forward_bytes(f.shape(), l, seq);
}

int64_t lasp1_backward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                       const SequenceStates& seq) {
  return backward_bytes(f.shape(), f.backward_scratch_bytes(), l, seq);
}

void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, const SequenceStates& seq, void* workspace,
                   void* stream) {
  const CallCheck check = sp::take_group_check(comm, f);
  check_ring(comm, layout, f, seq, saved);
  const int64_t T = f.local_tokens();
  if (plain(layout, seq)) {
    one_device_forward(f, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int64_t S = sh.state_floats, Mp = sh.map_floats, R = sh.record_floats();
  const int parts = layout.parts_per_rank, total = layout.total_parts(), rank = layout.rank;
  const bool packed = seq.packed();
  check_saved(sh, parts, saved);
  sp::check_buffer(workspace, lasp1_forward_workspace_bytes(f, layout, seq), "bytes", "lasp1_forward: workspace");
  const ForwardSpace ws(sh, layout, seq, workspace);
  const int64_t D = seq.floats(S);
  // the check's words fly while the ring runs (every rank posts this gather first)
  const int64_t word_floats = 2 * static_cast<int64_t>(check.count);
  std::unique_ptr<CommWork> words;
  if (check.armed()) {
    words = sp::gather(comm, f, reinterpret_cast<const float*>(check.words), ws.words, word_floats, stream);
  }

  DocStates docs;  // documents inside the parts (packed only)
  if (seq.final_state != nullptr) f.fill_zero(ws.finals, D, stream);
  if (packed) {
    docs.initial = seq.initial;
    docs.finals = seq.final_state != nullptr ? ws.finals : nullptr;  // begun and ended inside a part
  }
  // The local parts' own summaries first: each hop below then costs only a fold.
  for (int i = 0; i < parts; ++i) {
    float* record = saved.local_record + i * R;
    float* head = ws.heads + i * R;
    f.summarize(layout.local_range(i, T), docs, {record, record + S, head, head + S, packed}, stream);
    if (packed) f.copy(saved.head_maps + i * Mp, head + S, Mp, stream);
  }
  std::vector<std::unique_ptr<CommWork>> sent;
  for (int i = 0; i < parts; ++i) {  // local parts in global order
    const int g = layout.global_part(i);
    float* entering = saved.entering_state + i * S;
    const float* in = entering;
    if (g == 0) {
      if (seq.initial != nullptr) {
        f.copy(entering, seq.initial, S, stream);  // the first sequence's (every row's)
      } else {
        f.fill_zero(entering, S, stream);
        in = nullptr;
      }
    } else if (owner_of(layout, g - 1) == rank) {
      f.copy(entering, ws.leaving + (i - 1) * S, S, stream);  // the balanced split's turn
    } else {
      comm->recv(entering, S, ScalarType::kFloat32, owner_of(layout, g - 1), stream)->wait(stream);
    }
    const float* record = saved.local_record + i * R;
    float* leaving = ws.leaving + i * S;
    const bool last = g == total - 1;
    if (!last || seq.final_state != nullptr) {
      apply_record(f, in, record, record + S, ws.table, leaving, stream);
    }
    if (!last && owner_of(layout, g + 1) != rank) {
      sent.push_back(comm->send(leaving, S, ScalarType::kFloat32, owner_of(layout, g + 1), stream));
    }
    f.forward(layout.local_range(i, T), in, docs, stream);
    if (seq.final_state == nullptr) continue;
    if (packed && seq.head_doc[g] >= 0) {  // the document entering the part ends in its head
      const float* head = ws.heads + i * R;
      apply_record(f, in, head, head + S, ws.table, ws.finals + seq.head_doc[g] * S, stream);
    }
    if (last) f.copy(ws.finals + (packed ? (seq.count - 1) * S : 0), leaving, S, stream);
  }
  if (seq.final_state != nullptr) {  // every end state was written by exactly one rank
    sp::gather(comm, f, ws.finals, ws.gathered, D, stream)->wait(stream);
    sum_over_ranks(f, layout.world_size, ws.gathered, D, seq.final_state, stream);
  }
  if (words) {
    words->wait(stream);
    sp::poison_outputs(f, check, ws.words, word_floats, layout.world_size, seq.final_state, D, stream);
  }
  for (auto& work : sent) work->wait(stream);  // the send buffers live in the workspace
}

void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, const SequenceStates& seq, void* workspace,
                    void* stream) {
  check_ring(comm, layout, f, seq, saved);
  const int64_t T = f.local_tokens();
  void* family_scratch = workspace;
  if (plain(layout, seq)) {
    one_device_backward(f, family_scratch, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int64_t S = sh.state_floats, Mp = sh.map_floats, R = sh.record_floats();
  const int parts = layout.parts_per_rank, total = layout.total_parts(), rank = layout.rank;
  const bool packed = seq.packed();
  check_saved(sh, parts, saved);
  sp::check_buffer(workspace, lasp1_backward_workspace_bytes(f, layout, seq), "bytes", "lasp1_backward: workspace");
  const BackwardSpace ws(sh, layout, seq, f.backward_scratch_bytes(), workspace);
  const int64_t D = seq.floats(S);

  // The final states are replicated: their gradient is the sum of the ranks'.
  std::unique_ptr<CommWork> gathering;
  if (seq.final_grad != nullptr) gathering = sp::gather(comm, f, seq.final_grad, ws.gathered, D, stream);
  DocStates docs;
  if (packed) docs.initial = seq.initial;
  auto entering_of = [&](int i) -> const float* {
    const bool zero = layout.global_part(i) == 0 && seq.initial == nullptr;
    return zero ? nullptr : saved.entering_state + i * S;
  };
  // What needs only the cached entering states runs before this rank joins the chain.
  for (int i = 0; i < parts; ++i) {
    f.backward_entering(layout.local_range(i, T), entering_of(i), docs, family_scratch, stream);
  }
  const float* final_grad = nullptr;
  if (gathering) {
    gathering->wait(stream);
    sum_over_ranks(f, layout.world_size, ws.gathered, D, ws.final_grad, stream);
    final_grad = ws.final_grad;
  }
  if (packed) {
    docs.final_dstate = final_grad;
    docs.d_initial = seq.initial_grad;
  }
  if (seq.initial_grad != nullptr) f.fill_zero(seq.initial_grad, D, stream);  // this rank's share

  std::vector<std::unique_ptr<CommWork>> sent;
  for (int i = parts - 1; i >= 0; --i) {  // local parts in reverse global order
    const int g = layout.global_part(i);
    const TokenRange range = layout.local_range(i, T);
    const float* leaving = nullptr;  // D_g, the gradient of the state leaving part g
    if (g == total - 1) {
      if (final_grad != nullptr) leaving = final_grad + (packed ? (seq.count - 1) * S : 0);
    } else if (owner_of(layout, g + 1) == rank) {
      leaving = ws.entering_grad + (i + 1) * S;  // the balanced split's turn
    } else {
      float* in = ws.received + i * S;
      comm->recv(in, S, ScalarType::kFloat32, owner_of(layout, g + 1), stream)->wait(stream);
      leaving = in;
    }
    const float* record = saved.local_record + i * R;
    if (g > 0 || seq.initial_grad != nullptr) {
      // dS_in = E_g (+ A_head^T dF(head document)) + A_g^T D_g
      float* dS_in = ws.entering_grad + i * S;
      const float* e = ws.e;
      f.entering_grad(range, ws.e, stream);
      if (packed && final_grad != nullptr && seq.head_doc[g] >= 0) {
        apply_transposed(f, ws.e, saved.head_maps + i * Mp, final_grad + seq.head_doc[g] * S, ws.table,
                         ws.e_head, stream);
        e = ws.e_head;
      }
      if (leaving != nullptr) {
        apply_transposed(f, e, record + S, leaving, ws.table, dS_in, stream);
      } else {
        f.copy(dS_in, e, S, stream);
      }
      if (g > 0 && owner_of(layout, g - 1) != rank) {
        sent.push_back(comm->send(dS_in, S, ScalarType::kFloat32, owner_of(layout, g - 1), stream));
      }
      if (g == 0) f.copy(seq.initial_grad, dS_in, S, stream);  // the first sequence (every row)
    }
    const PartStates states{saved.entering_state + i * S, record, record + S, leaving};
    f.backward(range, states, docs, family_scratch, stream);
  }
  for (auto& work : sent) work->wait(stream);
}

void lasp1_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp1Saved& saved, void* workspace, void* stream) {
  lasp1_forward(f, comm, layout, saved, SequenceStates{}, workspace, stream);
}

void lasp1_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp1Saved& saved, void* workspace, void* stream) {
  lasp1_backward(f, comm, layout, saved, SequenceStates{}, workspace, stream);
}

// --- the scalar-decay family -------------------------------------------------

int64_t lasp1_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  return forward_bytes(ScalarDecay::shape_of(p), l, {});
}

int64_t lasp1_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  return backward_bytes(ScalarDecay::shape_of(p), ScalarDecay::backward_scratch_bytes(p, need_dg), l, {});
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
