// Where this rank's tokens sit in the global sequence. The sequence is cut into
// world_size * parts_per_rank equal parts ("chunks" in the LASP papers):
//   contiguous (parts_per_rank = 1): rank r holds part r;
//   balanced   (parts_per_rank = 2): rank r holds parts r and 2P-1-r, which
//     evens out causal work (each rank gets one early and one late part).
// Local tokens are the rank's parts concatenated in that order.
#pragma once

#include <vector>

#include "lasp2/types.h"

namespace lasp2 {

struct PartLayout {
  int world_size = 1;
  int rank = 0;
  int parts_per_rank = 1;

  static PartLayout contiguous(int world_size, int rank) { return {world_size, rank, 1}; }
  static PartLayout balanced(int world_size, int rank) { return {world_size, rank, 2}; }

  int total_parts() const { return world_size * parts_per_rank; }

  // Global index of local part i.
  int global_part(int i) const {
    if (parts_per_rank == 1) return rank;
    return i == 0 ? rank : 2 * world_size - 1 - rank;
  }

  // Where global part g's record lands in an AllGather of [parts_per_rank] records per rank.
  int gather_slot(int g) const {
    if (parts_per_rank == 1) return g;
    return g < world_size ? g * 2 : (2 * world_size - 1 - g) * 2 + 1;
  }

  TokenRange local_range(int i, int64_t local_seqlen) const {
    const int64_t n = local_seqlen / parts_per_rank;
    return {i * n, (i + 1) * n};
  }
  // Every local part's range, in local order.
  std::vector<TokenRange> local_ranges(int64_t local_seqlen) const {
    std::vector<TokenRange> out;
    for (int i = 0; i < parts_per_rank; ++i) out.push_back(local_range(i, local_seqlen));
    return out;
  }

  void validate(int64_t local_seqlen) const {
    LASP2_CHECK(world_size >= 1 && rank >= 0 && rank < world_size,
                "part layout: rank must lie in [0, world_size)");
    LASP2_CHECK(parts_per_rank == 1 || parts_per_rank == 2,
                "part layout: parts_per_rank must be 1 (contiguous) or 2 (balanced)");
    LASP2_CHECK(local_seqlen % parts_per_rank == 0,
                "part layout: the balanced split needs an even number of local tokens");
  }
};

}  // namespace lasp2
