// Pieces both sequence-parallel schedules (LASP-2, LASP-1) use: argument checks,
// scratch sizing and the gather of a group that may be a single device.
#pragma once

#include <memory>

#include "lasp2/communicator.h"
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

inline int64_t round_up8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

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

}  // namespace lasp2::sp
