// Pieces both sequence-parallel schedules (LASP-2, LASP-1) use: argument checks,
// scratch sizing, the gather of a group that may be a single device, and the call's
// armed check (lasp2/call_check.h: taken at the start, its outputs poisoned at the end).
#pragma once

#include <memory>
#include <string>

#include "lasp2/call_check.h"
#include "lasp2/communicator.h"
#include "lasp2/lasp2.h"
#include "lasp2/params.h"
#include "lasp2/part_family.h"
#include "lasp2/part_layout.h"

namespace lasp2::sp {

inline void check_group(Communicator* comm, const PartLayout& layout, const PartFamily& f) {
  layout.validate(f.local_tokens());
  if (comm == nullptr) {
    LASP2_CHECK(layout.world_size == 1, "a sequence-parallel layout needs a communicator");
    return;
  }
  LASP2_CHECK(comm->size() == layout.world_size && comm->rank() == layout.rank,
              "the communicator's rank/size differ from the part layout's");
  LASP2_CHECK(comm->device() == f.device(),
              "the communicator and the kernels work on different devices (CPU vs CUDA)");
}

// Sequence states of packed documents: one head_doc entry per global part, each naming
// a document that is not the last (the last never ends in a head).
inline void check_sequence_states(const PartLayout& l, const SequenceStates& seq) {
  if (!seq.packed()) return;
  LASP2_CHECK(static_cast<int64_t>(seq.head_doc.size()) == l.total_parts(),
              "sequence states of packed documents need one head_doc entry per global part");
  LASP2_CHECK(seq.count >= 1, "sequence states of packed documents need the number of documents");
  for (int64_t d : seq.head_doc)
    LASP2_CHECK(d >= -1 && d < seq.count - 1, "head_doc names a document out of range");
}

inline int64_t round_up8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

// A buffer the caller sized with the schedule's *_floats / *_bytes functions: null only
// when that size is 0 (an empty tensor's storage may be null), else the schedule would
// write through a null pointer.
inline void check_buffer(const void* data, int64_t size, const char* unit, const char* what) {
  LASP2_CHECK(size <= 0 || data != nullptr,
              std::string(what) + " is null (it needs " + std::to_string(size) + " " + unit + ")");
}

// Cuts consecutive fp32 buffers from a workspace; with a null base it only counts.
struct Carve {
  float* base;
  int64_t used = 0;
  float* take(int64_t floats) {
    float* p = base == nullptr ? nullptr : base + used;
    used += floats;
    return p;
  }
};

// Scratch for q_t . dq_t, one value per token and head in the decay's precision.
inline int64_t q_dot_bytes(const AttentionParams& p) {
  return round_up8(p.batch * p.seqlen * p.heads * static_cast<int64_t>(element_size(p.decay.dtype)));
}

// An AllGather of fp32 blocks; without a communicator (one device) a local copy.
inline std::unique_ptr<CommWork> gather(Communicator* comm, const PartFamily& f, const float* send,
                                        float* recv, int64_t count, void* stream) {
  if (comm == nullptr) {
    f.copy(recv, send, count, stream);
    return std::make_unique<CompletedWork>();
  }
  return comm->all_gather(send, recv, static_cast<std::size_t>(count), ScalarType::kFloat32,
                          stream);
}

// The check the call's cross-rank check armed (lasp2/call_check.h), taken whatever
// follows: it belongs to this call only. A call without a group (one device) takes
// none (a group of one is never armed).
inline CallCheck take_group_check(Communicator* comm, const PartFamily& f) {
  const CallCheck taken = take_call_check();
  if (comm == nullptr) return {};
  LASP2_CHECK(!taken.armed() || taken.device == f.device(),
              "the call's consistency check and the kernels work on different devices (CPU vs CUDA)");
  return taken;
}

// After every rank's words were gathered (rank r's at gathered + r * rank_stride): the
// call's output and its `final_floats` floats of final states (null: none) become NaN
// on every rank when they fail, nothing is written otherwise. Every rank reads the same
// gathered words, so all poison or none.
inline void poison_outputs(const PartFamily& f, const CallCheck& check, const float* gathered,
                           int64_t rank_stride, int world, float* final_state, int64_t final_floats,
                           void* stream) {
  if (!check.armed()) return;
  const PoisonTarget targets[] = {f.output(), PoisonTarget::floats(final_state, final_state ? final_floats : 0)};
  poison_on_failed_check(f.device(), gathered, rank_stride, world, check, targets, 2, stream);
}

}  // namespace lasp2::sp
