// The LASP-2 schedule over any KernelBackend and Communicator (see lasp2.h).
#include "lasp2/lasp2.h"

#include <vector>

#include "schedule_util.h"

namespace lasp2 {
namespace {

using sp::check_group;
using sp::q_dot_bytes;
using sp::round_up8;

bool single_part(const PartLayout& layout) { return layout.world_size == 1; }

}  // namespace

int64_t Lasp2Saved::local_records_floats(const AttentionParams& p, const PartLayout& l) {
  return l.parts_per_rank * StateRecord::of(p).size();
}
int64_t Lasp2Saved::prefix_states_floats(const AttentionParams& p, const PartLayout& l) {
  return l.parts_per_rank * StateRecord::of(p).states();
}
int64_t Lasp2Saved::log_decays_floats(const AttentionParams& p, const PartLayout& l) {
  return l.total_parts() * p.bh();
}

int64_t lasp2_forward_workspace_bytes(const AttentionParams& p, const PartLayout& l) {
  return single_part(l) ? 0 : round_up8(l.total_parts() * StateRecord::of(p).size() * 4);
}

int64_t lasp2_backward_workspace_bytes(const AttentionParams& p, const PartLayout& l,
                                       bool need_dg) {
  const StateRecord rec = StateRecord::of(p);
  int64_t bytes = need_dg ? q_dot_bytes(p) : 0;
  if (!single_part(l)) {
    int64_t floats = l.parts_per_rank * rec.states();  // send: local dM
    floats += l.total_parts() * rec.states();          // recv: every part's dM
    floats += rec.states();                            // suffix D of one part
    floats += rec.bh;                                  // dg offset of one part
    bytes += round_up8(floats * 4);
  }
  return bytes;
}

void lasp2_forward(const KernelBackend& be, Communicator* comm, const PartLayout& layout,
                   const AttentionParams& p, MutView o, const Lasp2Saved& saved,
                   void* workspace, const Lasp2Options& options, void* stream) {
  check_group(comm, layout, p);
  if (single_part(layout)) {
    be.chunk_forward(p, {0, p.seqlen}, nullptr, o, stream);
    return;
  }
  const StateRecord rec = StateRecord::of(p);
  const int parts = layout.parts_per_rank;
  for (int i = 0; i < parts; ++i) {
    float* record = saved.local_records + i * rec.size();
    be.part_state(p, layout.local_range(i, p.seqlen), record, record + rec.states(), stream);
  }
  float* gathered = static_cast<float*>(workspace);
  auto work = comm->all_gather(saved.local_records, gathered, parts * rec.size(),
                               ScalarType::kFloat32, stream);
  if (options.overlap_forward) {
    for (int i = 0; i < parts; ++i) be.chunk_forward(p, layout.local_range(i, p.seqlen), nullptr, o, stream);
  }
  work->wait(stream);

  std::vector<const float*> states(layout.total_parts());
  for (int g = 0; g < layout.total_parts(); ++g) {
    const float* record = gathered + layout.gather_slot(g) * rec.size();
    states[g] = record;
    be.copy(saved.log_decays + g * rec.bh, record + rec.states(), rec.bh, stream);
  }
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    float* prefix = saved.prefix_states + i * rec.states();
    be.combine_prefix(states, saved.log_decays, g, rec.bh, rec.state_elems, prefix, stream);
    const TokenRange range = layout.local_range(i, p.seqlen);
    if (!options.overlap_forward) {
      be.chunk_forward(p, range, g == 0 ? nullptr : prefix, o, stream);
    } else if (g > 0) {
      be.add_prefix_output(p, range, prefix, o, stream);
    }
  }
}

void lasp2_backward(const KernelBackend& be, Communicator* comm, const PartLayout& layout,
                    const AttentionParams& p, ConstView dout, const Lasp2Saved& saved,
                    MutView dq, MutView dk, MutView dv, void* dg, void* workspace,
                    void* stream) {
  check_group(comm, layout, p);
  char* scratch = static_cast<char*>(workspace);
  void* q_dot_dq = nullptr;
  if (dg != nullptr) {
    q_dot_dq = scratch;
    scratch += q_dot_bytes(p);
  }
  if (single_part(layout)) {
    const TokenRange all{0, p.seqlen};
    be.chunk_backward_dq(p, all, dout, nullptr, dq, q_dot_dq, stream);
    be.chunk_backward_dkdv(p, all, dout, nullptr, dk, dv, q_dot_dq, nullptr, dg, stream);
    return;
  }
  const StateRecord rec = StateRecord::of(p);
  const int parts = layout.parts_per_rank;
  float* send = reinterpret_cast<float*>(scratch);
  float* gathered = send + parts * rec.states();
  float* suffix = gathered + layout.total_parts() * rec.states();
  float* dg_offset = suffix + rec.states();

  for (int i = 0; i < parts; ++i) {
    be.part_dstate(p, layout.local_range(i, p.seqlen), dout, send + i * rec.states(), stream);
  }
  auto work = comm->all_gather(send, gathered, parts * rec.states(), ScalarType::kFloat32, stream);
  // dq needs only forward states (cached prefixes), so it runs while the gather flies.
  for (int i = 0; i < parts; ++i) {
    const float* prefix = layout.global_part(i) == 0 ? nullptr : saved.prefix_states + i * rec.states();
    be.chunk_backward_dq(p, layout.local_range(i, p.seqlen), dout, prefix, dq, q_dot_dq, stream);
  }
  work->wait(stream);

  std::vector<const float*> dstates(layout.total_parts());
  for (int g = 0; g < layout.total_parts(); ++g) {
    dstates[g] = gathered + layout.gather_slot(g) * rec.states();
  }
  for (int i = 0; i < parts; ++i) {
    const int g = layout.global_part(i);
    be.combine_suffix(dstates, saved.log_decays, g, rec.bh, rec.state_elems, suffix, stream);
    if (dg != nullptr) {
      be.state_dot(saved.prefix_states + i * rec.states(), saved.local_records + i * rec.size(),
                   saved.log_decays + g * rec.bh, suffix, rec.bh, rec.state_elems, dg_offset,
                   stream);
    }
    be.chunk_backward_dkdv(p, layout.local_range(i, p.seqlen), dout, suffix, dk, dv, q_dot_dq,
                           dg != nullptr ? dg_offset : nullptr, dg, stream);
  }
}

}  // namespace lasp2
