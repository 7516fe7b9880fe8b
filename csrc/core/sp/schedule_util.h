// Pieces both sequence-parallel schedules (LASP-2, LASP-1) use: argument checks
// and scratch sizing.
#pragma once

#include "lasp2/communicator.h"
#include "lasp2/params.h"
#include "lasp2/part_layout.h"

namespace lasp2::sp {

inline void check_group(Communicator* comm, const PartLayout& layout, const AttentionParams& p) {
  layout.validate(p.seqlen);
  if (comm == nullptr) {
    LASP2_CHECK(layout.world_size == 1, "a sequence-parallel layout needs a communicator");
    return;
  }
  LASP2_CHECK(comm->size() == layout.world_size && comm->rank() == layout.rank,
              "the communicator's rank/size differ from the part layout's");
}

inline int64_t round_up8(int64_t bytes) { return (bytes + 7) / 8 * 8; }

// Scratch for q_t . dq_t, one value per token and head in the decay's precision.
inline int64_t q_dot_bytes(const AttentionParams& p) {
  return round_up8(p.batch * p.seqlen * p.heads * static_cast<int64_t>(element_size(p.decay.dtype)));
}

}  // namespace lasp2::sp
