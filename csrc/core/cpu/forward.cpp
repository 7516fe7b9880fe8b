// CPU forward passes: chunked causal linear attention (intra-chunk masked part
// plus the inter-chunk state part), the state of a part, and the LASP-2 prefix term.
#include <algorithm>
#include <limits>

#include "chunk_scan.h"
#include "cpu_kernels.h"

namespace lasp2::cpu {

template <typename T>
void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state,
                   MutView o, float* final_state) {
  using Acc = AccOf<T>;
  const int64_t dk = p.dim_k, dv = p.dim_v;
  std::vector<Acc> acc(dv);
  ChunkInfo<Acc> info;
  auto outputs = [&](int64_t b, int64_t h, int64_t c0, int64_t n, const State<Acc>& S) {
    if (o.data == nullptr) return;
    for (int64_t x = 0; x < n; ++x) {
      const T* qx = row<T>(p.q, b, c0 + x, h);
      std::fill(acc.begin(), acc.end(), Acc(0));
      S.left_mul_add(info.entry_weight(x), qx, acc.data());  // inter-chunk part
      info.add_causal(  // intra-chunk part
          x, qx, [&](int64_t y) { return row<T>(p.k, b, c0 + y, h); }, dk,
          [&](int64_t y) { return row<T>(p.v, b, c0 + y, h); }, dv, acc.data());
      T* ox = row<T>(o, b, c0 + x, h);
      for (int64_t j = 0; j < dv; ++j) ox[j] = static_cast<T>(p.scale * acc[j]);
    }
  };
  forward_state_scan<T>(p, part, initial_state, info, outputs, [&](int64_t b, int64_t h, const State<Acc>& S) {
    if (final_state) S.store(final_state + bh_index(p, b, h) * dk * dv);
  });
}

void part_log_decay(const AttentionParams& p, TokenRange part, float* log_decay) {
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      double total = 0;
      bool blocked = false;
      for (int64_t t = part.begin; t < part.end; ++t) {
        blocked = blocked || starts_segment(p, b, t, h);
        if (!blocked) total += p.decay.at(b, t, h);
      }
      log_decay[bh_index(p, b, h)] =
          blocked ? -std::numeric_limits<float>::infinity() : static_cast<float>(total);
    }
  }
}

template <typename T>
void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix,
                       MutView o) {
  using Acc = AccOf<T>;
  const int64_t dk = p.dim_k, dv = p.dim_v;
  std::vector<Acc> acc(dv);
  ChunkInfo<Acc> info;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      State<Acc> P(dk, dv);
      P.load(prefix + bh_index(p, b, h) * dk * dv);
      info.compute(p, b, h, part.begin, part.length());
      for (int64_t x = 0; x < info.n && info.seg[x] == 0; ++x) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        P.left_mul_add(info.entry_weight(x), row<T>(p.q, b, part.begin + x, h), acc.data());
        T* ox = row<T>(o, b, part.begin + x, h);
        for (int64_t j = 0; j < dv; ++j)
          ox[j] = static_cast<T>(static_cast<Acc>(ox[j]) + p.scale * acc[j]);
      }
    }
  }
}

#define LASP2_INSTANTIATE_FORWARD(T)                                                         \
  template void chunk_forward<T>(const AttentionParams&, TokenRange, const float*, MutView, \
                                 float*);                                                    \
  template void add_prefix_output<T>(const AttentionParams&, TokenRange, const float*, MutView);
LASP2_INSTANTIATE_FORWARD(float)
LASP2_INSTANTIATE_FORWARD(double)

}  // namespace lasp2::cpu
