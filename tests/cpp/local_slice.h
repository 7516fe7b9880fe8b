// Cuts a rank's tokens out of a global problem for a part layout, and puts rank
// results back into global order, so the SP tests compare like with like.
#pragma once

#include "lasp2/part_layout.h"
#include "problem.h"

namespace lasp2::testing {

// Global token index of local token t on this rank.
inline int64_t global_token(const PartLayout& l, int64_t global_seqlen, int64_t t) {
  const int64_t part_len = global_seqlen / l.total_parts();
  const int i = static_cast<int>(t / part_len);
  return l.global_part(i) * part_len + t % part_len;
}

// Rows of [B, T, H, D] arrays: copy local <- global.
template <typename T>
std::vector<T> take_tokens(const std::vector<T>& global, const PartLayout& l, int64_t B, int64_t T_, int64_t H, int64_t D) {
  const int64_t local = T_ / l.world_size;
  std::vector<T> out(B * local * H * D);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < local; ++t) {
      const int64_t g = global_token(l, T_, t);
      std::copy_n(&global[(b * T_ + g) * H * D], H * D, &out[(b * local + t) * H * D]);
    }
  return out;
}

template <typename T>
void put_tokens(std::vector<T>& global, const std::vector<T>& local_data, const PartLayout& l, int64_t B, int64_t T_, int64_t H, int64_t D) {
  const int64_t local = T_ / l.world_size;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < local; ++t) {
      const int64_t g = global_token(l, T_, t);
      std::copy_n(&local_data[(b * local + t) * H * D], H * D, &global[(b * T_ + g) * H * D]);
    }
}

// The rank's slice of a global problem as a problem of its own.
template <typename T>
Problem<T> local_problem(const Problem<T>& global, const PartLayout& l) {
  const auto& s = global.spec;
  Problem<T> out = global;
  out.spec.seqlen = s.seqlen / l.world_size;
  out.q = take_tokens(global.q, l, s.batch, s.seqlen, s.heads, s.dim_k);
  out.k = take_tokens(global.k, l, s.batch, s.seqlen, s.heads, s.dim_k);
  out.v = take_tokens(global.v, l, s.batch, s.seqlen, s.heads, s.dim_v);
  out.dout = take_tokens(global.dout, l, s.batch, s.seqlen, s.heads, s.dim_v);
  out.gate = take_tokens(global.gate, l, s.batch, s.seqlen, s.heads, 1);
  out.doc_start = take_tokens(global.doc_start, l, 1, s.seqlen, 1, 1);
  out.spec.doc_starts.clear();
  for (int64_t t = 0; t < out.spec.seqlen; ++t)
    if (out.doc_start[t]) out.spec.doc_starts.push_back(t);
  return out;
}

}  // namespace lasp2::testing
