// The LASP-2 schedule over any PartFamily and Communicator (see lasp2.h and, for
// what a family provides, part_family.h).
//
// Both folds run over lists of gathered blocks and the saved map table
// [0, A_0, ..., A_{P-1}, 0]: list entry k pairs with map row k + offset. The optional
// sequence states ride at the ends of the lists, where the zero rows meet them
// (A * 0 = 0): the initial state is entry 0 of the prefix list (then P_j is entry
// j + 1), the final-state gradient the last entry of the suffix list.
#include "lasp2/lasp2.h"

#include <vector>

#include "lasp2/scalar_decay.h"
#include "schedule_util.h"

namespace lasp2 {
namespace {

using sp::check_group;
using sp::round_up8;

bool without_states(const SequenceStates& s) {
  return s.initial == nullptr && s.final_state == nullptr && s.final_grad == nullptr &&
         s.initial_grad == nullptr;
}

// Forward: every part's gathered record.
int64_t forward_bytes(const SummaryShape& s, const PartLayout& l) {
  return round_up8(l.total_parts() * s.record_floats() * 4);
}

// Backward: the family's scratch, then local dP, gathered dP and one D.
int64_t backward_bytes(const SummaryShape& s, int64_t family_scratch, const PartLayout& l) {
  return round_up8(family_scratch) +
         round_up8((l.parts_per_rank + l.total_parts() + 1) * s.state_floats * 4);
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
int64_t Lasp2Saved::local_records_floats(const AttentionParams& p, const PartLayout& l) {
  return local_records_floats(ScalarDecay::shape_of(p), l);
}
int64_t Lasp2Saved::prefix_states_floats(const AttentionParams& p, const PartLayout& l) {
  return prefix_states_floats(ScalarDecay::shape_of(p), l);
}
int64_t Lasp2Saved::log_decays_floats(const AttentionParams& p, const PartLayout& l) {
  return maps_floats(ScalarDecay::shape_of(p), l);
}

int64_t lasp2_forward_workspace_bytes(const PartFamily& f, const PartLayout& l) {
  return forward_bytes(f.shape(), l);
}

int64_t lasp2_backward_workspace_bytes(const PartFamily& f, const PartLayout& l) {
  return backward_bytes(f.shape(), f.backward_scratch_bytes(), l);
}

void lasp2_forward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                   const Lasp2Saved& saved, const SequenceStates& seq, void* workspace,
                   const Lasp2Options& options, void* stream) {
  check_group(comm, layout, f);
  const int64_t T = f.local_tokens();
  if (layout.world_size == 1 && without_states(seq)) {
    f.forward({0, T}, nullptr, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  for (int i = 0; i < parts; ++i) {
    float* record = saved.local_records + i * sh.record_floats();
    f.summarize(layout.local_range(i, T), record, record + sh.state_floats, stream);
  }
  float* gathered = static_cast<float*>(workspace);
  auto work = sp::gather(comm, f, saved.local_records, gathered, parts * sh.record_floats(), stream);
  const bool overlap = options.overlap_forward && f.has_entering_output();
  if (overlap) {
    for (int i = 0; i < parts; ++i) f.forward(layout.local_range(i, T), nullptr, stream);
  }
  work->wait(stream);

  f.fill_zero(saved.maps, sh.map_floats, stream);
  f.fill_zero(saved.maps + (total + 1) * sh.map_floats, sh.map_floats, stream);
  const int first = seq.initial != nullptr ? 1 : 0;  // list index of part 0's state
  std::vector<const float*> states(first + total);
  if (first) states[0] = seq.initial;
  for (int g = 0; g < total; ++g) {
    const float* record = gathered + layout.gather_slot(g) * sh.record_floats();
    states[first + g] = record;
    f.copy(saved.maps + (g + 1) * sh.map_floats, record + sh.state_floats, sh.map_floats, stream);
  }
  const float* maps = saved.maps + (1 - first) * sh.map_floats;  // the row of list entry 0
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    float* prefix = saved.prefix_states + i * sh.state_floats;
    f.combine_prefix(states, maps, first + g, prefix, stream);
    const float* entering = (g == 0 && !first) ? nullptr : prefix;
    const TokenRange range = layout.local_range(i, T);
    if (!overlap) {
      f.forward(range, entering, stream);
    } else if (entering != nullptr) {
      f.add_entering_output(range, entering, stream);
    }
  }
  if (seq.final_state != nullptr) {
    f.combine_prefix(states, maps, first + total, seq.final_state, stream);
  }
}

void lasp2_backward(const PartFamily& f, Communicator* comm, const PartLayout& layout,
                    const Lasp2Saved& saved, const SequenceStates& seq, void* workspace,
                    void* stream) {
  check_group(comm, layout, f);
  const int64_t T = f.local_tokens();
  void* family_scratch = workspace;
  if (layout.world_size == 1 && without_states(seq)) {
    const TokenRange all{0, T};
    f.backward_entering(all, nullptr, family_scratch, stream);
    f.backward(all, PartStates{}, family_scratch, stream);
    return;
  }
  const SummaryShape sh = f.shape();
  const int parts = layout.parts_per_rank, total = layout.total_parts();
  float* send = reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                         round_up8(f.backward_scratch_bytes()));
  float* gathered = send + parts * sh.state_floats;
  float* suffix = gathered + total * sh.state_floats;

  for (int i = 0; i < parts; ++i) {
    f.entering_grad(layout.local_range(i, T), send + i * sh.state_floats, stream);
  }
  auto work = sp::gather(comm, f, send, gathered, parts * sh.state_floats, stream);
  // What needs only forward states (the cached prefixes) runs while the gather flies.
  auto entering_of = [&](int i) -> const float* {
    const bool zero = layout.global_part(i) == 0 && seq.initial == nullptr;
    return zero ? nullptr : saved.prefix_states + i * sh.state_floats;
  };
  for (int i = 0; i < parts; ++i) {
    f.backward_entering(layout.local_range(i, T), entering_of(i), family_scratch, stream);
  }
  work->wait(stream);

  // [unused entry (when the initial-state gradient is wanted)] dP_0 .. dP_{P-1} [final grad]
  const int first = seq.initial_grad != nullptr ? 1 : 0;
  std::vector<const float*> dstates(first + total);
  for (int g = 0; g < total; ++g) {
    dstates[first + g] = gathered + layout.gather_slot(g) * sh.state_floats;
  }
  if (first) dstates[0] = dstates[1];  // below every target: never read
  if (seq.final_grad != nullptr) dstates.push_back(seq.final_grad);
  const float* maps = saved.maps + (1 - first) * sh.map_floats;
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    const bool last = g == total - 1 && seq.final_grad == nullptr;
    if (!last) f.combine_suffix(dstates, maps, first + g, suffix, stream);
    const float* record = saved.local_records + i * sh.record_floats();
    const PartStates states{saved.prefix_states + i * sh.state_floats, record,
                            record + sh.state_floats, last ? nullptr : suffix};
    f.backward(layout.local_range(i, T), states, family_scratch, stream);
  }
  if (seq.initial_grad != nullptr) f.combine_suffix(dstates, maps, 0, seq.initial_grad, stream);
}

// --- the scalar-decay family -------------------------------------------------

int64_t lasp2_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  return forward_bytes(ScalarDecay::shape_of(p), l);
}

int64_t lasp2_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  return backward_bytes(ScalarDecay::shape_of(p), ScalarDecay::backward_scratch_bytes(p, need_dg), l);
}

void lasp2_forward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp2Saved& saved,
                   void* workspace, const Lasp2Options& options, void* stream) {
  lasp2_forward(ScalarDecay(backend, p, o), comm, layout, saved, SequenceStates{}, workspace,
                options, stream);
}

void lasp2_backward(const KernelBackend& backend, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp2Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream) {
  lasp2_backward(ScalarDecay(backend, p, ScalarDecayGrads{dout, dq, dk, dv, dg}), comm, layout,
                 saved, SequenceStates{}, workspace, stream);
}

}  // namespace lasp2
