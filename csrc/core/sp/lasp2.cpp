// The LASP-2 schedule over any PartFamily and Communicator (see lasp2.h and, for
// what a family provides, part_family.h).
//
// Both folds run over lists of gathered blocks and the saved map table
// [0, A_0, ..., A_{P-1}, 0]: list entry k pairs with map row k + offset. The optional
// sequence states ride at the ends of the lists, where the zero rows meet them
// (A * 0 = 0): the initial state is entry 0 of the prefix list (then P_j is entry
// j + 1), the final-state gradient the last entry of the suffix list. A one-step map
// (a part's head) folds through the 3-row table [0, A_head, 0]. Every list keeps its
// fold target below its length (the CUDA combine's precondition).
//
// Every rank's block of the forward AllGather ends in kCallCheckFloats slots: the
// device values the call's cross-rank check armed (lasp2/call_check.h; unwritten when
// none was armed, which the check makes alike on every rank), compared on the device
// after the gather, so a call whose ranks disagree returns NaN on every rank at once.
#include "lasp2/lasp2.h"

#include <vector>

#include "lasp2/call_check.h"
#include "lasp2/scalar_decay.h"
#include "schedule_util.h"

namespace lasp2 {
namespace {

using sp::Carve;
using sp::check_group;
using sp::check_sequence_states;
using sp::round_up8;

// Where each piece of the forward workspace lives. The send block is [local records]
// [local head records][inner documents' end states]; the head records and end states
// travel only with packed documents (the heads' buffers exist anyway: a family may
// always write them), then the call's check words (kCallCheckFloats, at `words`; written
// after the summaries, as without packed documents they lie where the heads' are).
// A block of records is [the parts' states][the parts' maps] (PartFamily::summarize_parts:
// each list's buffers one after another).
struct ForwardSpace {
  int64_t S, Mp, record, parts, sent, words;  // floats per state / map / record, local parts, floats sent per rank, words' offset
  float *send, *gathered, *state, *table;
  int64_t floats;

  ForwardSpace(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq, void* base)
      : S(s.state_floats), Mp(s.map_floats), record(s.record_floats()), parts(l.parts_per_rank) {
    const bool packed = seq.packed();
    const int64_t finals = packed && seq.final_state ? seq.floats(s.state_floats) : 0;
    words = parts * record * (packed ? 2 : 1) + finals;
    sent = words + kCallCheckFloats;
    Carve c{static_cast<float*>(base)};
    send = c.take(2 * parts * record + finals + kCallCheckFloats);
    gathered = c.take(l.world_size * sent);
    state = c.take(s.state_floats);
    table = c.take(3 * s.map_floats);
    floats = c.used;
  }
  // Offsets of local part i's state and map in a rank's block (head: its head's).
  int64_t state_at(int i, bool head) const { return (head ? parts * record : 0) + i * S; }
  int64_t map_at(int i, bool head) const { return (head ? parts * record : 0) + parts * S + i * Mp; }
  // Part g's gathered state and map (head: its head's).
  const float* state_of(const PartLayout& l, int g, bool head) const {
    const int slot = l.gather_slot(g);
    return gathered + (slot / parts) * sent + state_at(slot % parts, head);
  }
  const float* map_of(const PartLayout& l, int g, bool head) const {
    const int slot = l.gather_slot(g);
    return gathered + (slot / parts) * sent + map_at(slot % parts, head);
  }
};

// The backward workspace after the family's scratch: [local dP][final grads] sent,
// the gathered blocks, the summed final grads, the parts' E (packed), the local parts' D,
// a table.
struct BackwardSpace {
  int64_t state, sent;
  float *send, *gathered, *final_grad, *entering, *suffix, *table;
  int64_t floats;

  BackwardSpace(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq,
                int64_t family_scratch, void* base)
      : state(s.state_floats) {
    const int64_t D = seq.floats(state);
    const bool final_grad_wanted = seq.final_grad != nullptr;
    sent = l.parts_per_rank * state + (final_grad_wanted ? D : 0);
    Carve c{base == nullptr ? nullptr
                            : reinterpret_cast<float*>(static_cast<char*>(base) + round_up8(family_scratch))};
    send = c.take(sent);
    gathered = c.take(l.world_size * sent);
    final_grad = c.take(final_grad_wanted ? D : 0);
    entering = c.take(seq.packed() && final_grad_wanted ? l.total_parts() * state : 0);
    suffix = c.take(l.parts_per_rank * state);
    table = c.take(3 * s.map_floats);
    floats = c.used;
  }
  const float* dstate_of(const PartLayout& l, int g) const {
    const int slot = l.gather_slot(g);
    return gathered + (slot / l.parts_per_rank) * sent + (slot % l.parts_per_rank) * state;
  }
};

// Fills the [0, A, 0] table of a one-step fold.
void one_step_table(const PartFamily& f, const float* map, float* table, void* stream) {
  const int64_t n = f.shape().map_floats;
  f.fill_zero(table, 3 * n, stream);
  f.copy(table + n, map, n, stream);
}

// dst = sum over the group's ranks of the block at offset `at` of each rank's `sent` floats.
void sum_over_ranks(const PartFamily& f, const PartLayout& l, const float* gathered, int64_t sent,
                    int64_t at, int64_t count, float* dst, void* stream) {
  f.copy(dst, gathered + at, count, stream);
  for (int r = 1; r < l.world_size; ++r) f.add(dst, gathered + r * sent + at, count, stream);
}

bool holds_first_part(const PartLayout& l) {
  for (int i = 0; i < l.parts_per_rank; ++i)
    if (l.global_part(i) == 0) return true;
  return false;
}

// The buffers forward writes and backward reads on the sequence-parallel path.
void check_saved(const SummaryShape& s, const PartLayout& l, bool packed, const Lasp2Saved& saved) {
  sp::check_buffer(saved.local_records, l.parts_per_rank * s.record_floats(), "floats", "Lasp2Saved.local_records");
  sp::check_buffer(saved.prefix_states, l.parts_per_rank * s.state_floats, "floats", "Lasp2Saved.prefix_states");
  sp::check_buffer(saved.maps, (l.total_parts() + 2) * s.map_floats, "floats", "Lasp2Saved.maps");
  if (packed) sp::check_buffer(saved.head_maps, l.total_parts() * s.map_floats, "floats", "Lasp2Saved.head_maps");
}

int64_t forward_bytes(const SummaryShape& s, const PartLayout& l, const SequenceStates& seq) {
  return round_up8(ForwardSpace(s, l, seq, nullptr).floats * 4);
}

int64_t backward_bytes(const SummaryShape& s, int64_t family_scratch, const PartLayout& l,
                       const SequenceStates& seq) {
  return round_up8(family_scratch) + round_up8(BackwardSpace(s, l, seq, 0, nullptr).floats * 4);
}

}  // namespace

int64_t Lasp2Saved::local_records_floats(const SummaryShape& s, const PartLayout& l) {
  return l.parts_per_rank * s.record_floats();
}
int64_t Lasp2Saved::prefix_states_floats(const SummaryShape& s, const PartLayout& l) {
  return l.parts_per_rank * s.state_floats;
}
int64_t Lasp2Saved::maps_floats(const SummaryShape& s, const PartLayout& l) {
  return (l.total_parts() + 2) * s.map_floats;
}
int64_t Lasp2Saved::head_maps_floats(const SummaryShape& s, const PartLayout& l, bool packed) {
  return packed ? l.total_parts() * s.map_floats : 0;
}
int64_t Lasp2Saved::local_records_floats(const AttentionParams& p, const PartLayout& l) {
  return local_records_floats(ScalarDecay::shape_of(p), l);
}
int64_t Lasp2Saved::prefix_states_floats(const AttentionParams& p, const PartLayout& l) {
  return prefix_states_floats(ScalarDecay::shape_of(p), l);
}
int64_t Lasp2Saved::log_decays_floats(const AttentionParams& p, const PartLayout& l) {
  return maps_floats(ScalarDecay::shape_of(p), l);
}
int64_t Lasp2Saved::segment_states_floats(const KernelBackend& backend, const AttentionParams& p,
                                          const PartLayout& l) {
  return ScalarDecay::saved_states_floats(backend, p, l);
}

int64_t lasp2_forward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                      const SequenceStates& seq) {
  return forward_bytes(f.shape(), l, seq);
}

int64_t lasp2_backward_workspace_bytes(const PartFamily& f, const PartLayout& l,
                                       const SequenceStates& seq) {
  return backward_bytes(f.shape(), f.backward_scratch_bytes(), l, seq);
}

void one_device_forward(const PartFamily& f, void* stream) {
  f.forward({0, f.local_tokens()}, nullptr, DocStates{}, stream);
}

void one_device_backward(const PartFamily& f, void* family_scratch, void* stream) {
  sp::check_buffer(family_scratch, f.backward_scratch_bytes(), "bytes", "the backward workspace");
  const TokenRange all{0, f.local_tokens()};
  f.backward_entering(all, nullptr, DocStates{}, family_scratch, stream);
  f.backward(all, PartStates{}, DocStates{}, family_scratch, stream);
}

void lasp2_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp2Saved& saved, const SequenceStates& seq, void* workspace,
                   const Lasp2Options& options, void* stream) {
  const CallCheck check = sp::take_group_check(comm, f);
  check_group(comm, layout, f);
  check_sequence_states(layout, seq);
  const int64_t T = f.local_tokens();
  if (layout.world_size == 1 && !seq.any()) {
    one_device_forward(f, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int64_t S = sh.state_floats, Mp = sh.map_floats, D = seq.floats(S);
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  const bool packed = seq.packed();
  check_saved(sh, layout, packed, saved);
  sp::check_buffer(workspace, lasp2_forward_workspace_bytes(f, layout, seq), "bytes", "lasp2_forward: workspace");
  const ForwardSpace ws(sh, layout, seq, workspace);

  DocStates docs;  // documents inside the parts (packed only)
  if (packed) {
    docs.initial = seq.initial;
    if (seq.final_state != nullptr) {
      docs.finals = ws.send + 2 * parts * ws.record;
      f.fill_zero(docs.finals, D, stream);
    }
  }
  const std::vector<TokenRange> ranges = layout.local_ranges(T);
  std::vector<PartSummary> summaries(parts);
  for (int i = 0; i < parts; ++i) {
    summaries[i] = {ws.send + ws.state_at(i, false), ws.send + ws.map_at(i, false), ws.send + ws.state_at(i, true),
                    ws.send + ws.map_at(i, true), packed};
  }
  f.summarize_parts(ranges, docs, summaries, stream);
  f.copy(saved.local_records, ws.send, parts * ws.record, stream);
  if (check.armed()) {
    f.copy(ws.send + ws.words, reinterpret_cast<const float*>(check.words), 2 * check.count, stream);
  }
  auto work = sp::gather(comm, f, ws.send, ws.gathered, ws.sent, stream);
  const bool overlap = options.overlap_forward && f.has_entering_output();
  if (overlap) f.forward_parts(ranges, std::vector<const float*>(parts, nullptr), docs, stream);
  work->wait(stream);

  const int first = seq.initial != nullptr ? 1 : 0;  // list index of part 0's state
  std::vector<const float*> states(first + total + 1);
  if (first) states[0] = seq.initial;  // the first document's (or every row's)
  // saved.maps: [zeros][every global part's map][zeros], one launch (not one copy a part)
  std::vector<const float*> map_rows(total + 2, nullptr), head_rows(packed ? total : 0);
  for (int g = 0; g < total; ++g) {
    states[first + g] = ws.state_of(layout, g, false);
    map_rows[g + 1] = ws.map_of(layout, g, false);
    if (packed) head_rows[g] = ws.map_of(layout, g, true);
  }
  f.copy_rows(saved.maps, map_rows, Mp, stream);
  if (packed) f.copy_rows(saved.head_maps, head_rows, Mp, stream);
  states.back() = states[first + total - 1];  // pairs with the zero row; keeps targets in range
  const float* maps = saved.maps + (1 - first) * Mp;  // the row of list entry 0
  // P_g of every local part (zeros for part 0 without an initial state: the fold over
  // nothing), then the parts' outputs
  std::vector<const float*> entering(parts);
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    float* prefix = saved.prefix_states + i * S;
    f.combine_prefix(states, maps, first + g, prefix, stream);
    entering[i] = (g == 0 && !first) ? nullptr : prefix;
  }
  if (!overlap) {
    f.forward_parts(ranges, entering, docs, stream);
  } else {
    for (int i = 0; i < parts; ++i)
      if (entering[i] != nullptr) f.add_entering_output(ranges[i], entering[i], stream);
  }
  if (seq.final_state != nullptr && !packed) {
    f.combine_prefix(states, maps, first + total, seq.final_state, stream);
  } else if (seq.final_state != nullptr) {
    // Documents begun and ended inside one part: written by that part's rank only.
    sum_over_ranks(f, layout, ws.gathered, ws.sent, 2 * parts * ws.record, D, seq.final_state, stream);
    for (int g = 0; g < total; ++g) {  // ending in part g's head: A_head P_g + M_head
      const int64_t d = seq.head_doc[g];
      if (d < 0) continue;
      f.combine_prefix(states, maps, first + g, ws.state, stream);
      one_step_table(f, saved.head_maps + g * Mp, ws.table, stream);
      const float* head = ws.state_of(layout, g, true);
      f.combine_prefix({ws.state, head, head}, ws.table, 2, seq.final_state + d * S, stream);
    }
    f.combine_prefix(states, maps, first + total, seq.final_state + (seq.count - 1) * S, stream);
  }
  sp::poison_outputs(f, check, ws.gathered + ws.words, ws.sent, layout.world_size, seq.final_state, D, stream);
}

void lasp2_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp2Saved& saved, const SequenceStates& seq, void* workspace,
                    void* stream) {
  check_group(comm, layout, f);
  check_sequence_states(layout, seq);
  const int64_t T = f.local_tokens();
  void* family_scratch = workspace;
  if (layout.world_size == 1 && !seq.any()) {
    one_device_backward(f, family_scratch, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int64_t S = sh.state_floats, Mp = sh.map_floats, D = seq.floats(S);
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  const bool packed = seq.packed();
  check_saved(sh, layout, packed, saved);
  sp::check_buffer(workspace, lasp2_backward_workspace_bytes(f, layout, seq), "bytes", "lasp2_backward: workspace");
  const BackwardSpace ws(sh, layout, seq, f.backward_scratch_bytes(), workspace);

  const std::vector<TokenRange> ranges = layout.local_ranges(T);
  std::vector<float*> own_dstates(parts);
  for (int i = 0; i < parts; ++i) own_dstates[i] = ws.send + i * S;
  f.entering_grads(ranges, own_dstates, stream);
  if (seq.final_grad != nullptr) f.copy(ws.send + parts * S, seq.final_grad, D, stream);
  auto work = sp::gather(comm, f, ws.send, ws.gathered, ws.sent, stream);
  // What needs only forward states (the cached prefixes) runs while the gather flies.
  DocStates docs;
  if (packed) docs.initial = seq.initial;
  std::vector<const float*> entering(parts);  // zeros in the forward's slot where null
  for (int i = 0; i < parts; ++i) {
    const bool zero = layout.global_part(i) == 0 && seq.initial == nullptr;
    entering[i] = zero ? nullptr : saved.prefix_states + i * S;
  }
  f.backward_entering_parts(ranges, entering, docs, family_scratch, stream);
  work->wait(stream);

  // The final states are replicated: their gradient is the sum of the ranks'.
  const float* final_grad = nullptr;
  if (seq.final_grad != nullptr) {
    sum_over_ranks(f, layout, ws.gathered, ws.sent, parts * S, D, ws.final_grad, stream);
    final_grad = ws.final_grad;
  }
  // [unused entry (when the initial-state gradient is wanted)] E_0 .. E_{P-1} [final grad]
  const int first = seq.initial_grad != nullptr ? 1 : 0;
  std::vector<const float*> dstates(first + total);
  for (int g = 0; g < total; ++g) {
    const float* E = ws.dstate_of(layout, g);
    if (packed && final_grad != nullptr && seq.head_doc[g] >= 0) {  // + A_head^T dF(head's document)
      float* out = ws.entering + g * S;
      one_step_table(f, saved.head_maps + g * Mp, ws.table, stream);
      f.combine_suffix({E, E, final_grad + seq.head_doc[g] * S}, ws.table, 0, out, stream);
      E = out;
    }
    dstates[first + g] = E;
  }
  if (first) dstates[0] = dstates[1];  // below every target: never read
  if (final_grad != nullptr) dstates.push_back(final_grad + (packed ? (seq.count - 1) * S : 0));
  const float* maps = saved.maps + (1 - first) * Mp;
  if (packed) {
    docs.final_dstate = final_grad;
    docs.d_initial = seq.initial_grad;
  }
  if (seq.initial_grad != nullptr) f.fill_zero(seq.initial_grad, D, stream);  // this rank's share
  std::vector<PartStates> states(parts);
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    const bool last = g == total - 1 && final_grad == nullptr;
    float* suffix = ws.suffix + i * S;
    if (!last) f.combine_suffix(dstates, maps, first + g, suffix, stream);
    else if (parts > 1) f.fill_zero(suffix, S, stream);  // backward_parts' zero slot
    // the records as the forward's send block has them: [the parts' states][their maps]
    states[i] = {saved.prefix_states + i * S, saved.local_records + i * S, saved.local_records + parts * S + i * Mp,
                 last ? nullptr : suffix};
  }
  f.backward_parts(ranges, states, docs, family_scratch, stream);
  // The first sequence (every row) enters global part 0.
  if (seq.initial_grad != nullptr && holds_first_part(layout)) {
    f.combine_suffix(dstates, maps, 0, seq.initial_grad, stream);
  }
}

// --- the scalar-decay family -------------------------------------------------

int64_t lasp2_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  return forward_bytes(ScalarDecay::shape_of(p), l, {});
}

int64_t lasp2_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  return backward_bytes(ScalarDecay::shape_of(p), ScalarDecay::backward_scratch_bytes(p, need_dg), l, {});
}

void lasp2_forward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp2Saved& saved,
                   void* workspace, const Lasp2Options& options, void* stream) {
  ScalarDecay family(backend, p, o);
  family.with_saved_states(saved.segment_states, layout);
  lasp2_forward(family, comm, layout, saved, SequenceStates{}, workspace, options, stream);
}

void lasp2_backward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp2Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream) {
  ScalarDecay family(backend, p, ScalarDecayGrads{dout, dq, dk, dv, dg});
  family.with_saved_states(saved.segment_states, layout);
  lasp2_backward(family, comm, layout, saved, SequenceStates{}, workspace, stream);
}

}  // namespace lasp2
