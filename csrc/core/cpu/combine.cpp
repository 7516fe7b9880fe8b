// Combining gathered per-part states into the state entering (prefix) or the
// state gradient leaving (suffix) one part. Sizes never depend on the sequence.
#include <cmath>
#include <vector>

#include "combine_cpu.h"

namespace lasp2::cpu {

// Horner's rule in the direction of travel: acc = exp(L_m) * acc + M_m. A part holding
// a document start or reset has exp(L_m) = 0: what came before is dropped, not multiplied
// (0 * inf = NaN would carry one document's non-finite values into the next ones).
static inline double carry(double a, double acc) { return a == 0.0 ? 0.0 : a * acc; }

void combine_prefix(const std::vector<const float*>& parts, const float* log_decays, int target,
                    int64_t bh, int64_t state_elems, float* out) {
  std::vector<double> acc(state_elems);
  for (int64_t i = 0; i < bh; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int m = 0; m < target; ++m) {
      const double a = std::exp(static_cast<double>(log_decays[m * bh + i]));
      const float* M = parts[m] + i * state_elems;
      for (int64_t e = 0; e < state_elems; ++e) acc[e] = carry(a, acc[e]) + M[e];
    }
    for (int64_t e = 0; e < state_elems; ++e) out[i * state_elems + e] = static_cast<float>(acc[e]);
  }
}

void combine_suffix(const std::vector<const float*>& parts, const float* log_decays, int target,
                    int64_t bh, int64_t state_elems, float* out) {
  const int num_parts = static_cast<int>(parts.size());
  std::vector<double> acc(state_elems);
  for (int64_t i = 0; i < bh; ++i) {
    std::fill(acc.begin(), acc.end(), 0.0);
    for (int m = num_parts - 1; m > target; --m) {
      const double a = std::exp(static_cast<double>(log_decays[m * bh + i]));
      const float* dM = parts[m] + i * state_elems;
      for (int64_t e = 0; e < state_elems; ++e) acc[e] = carry(a, acc[e]) + dM[e];
    }
    for (int64_t e = 0; e < state_elems; ++e) out[i * state_elems + e] = static_cast<float>(acc[e]);
  }
}

void state_dot(const float* prefix, const float* state, const float* log_decay,
               const float* dstate, int64_t bh, int64_t state_elems, float* out) {
  for (int64_t i = 0; i < bh; ++i) {
    const double a = std::exp(static_cast<double>(log_decay[i]));
    double s = 0;
    for (int64_t e = 0; e < state_elems; ++e) {
      const int64_t idx = i * state_elems + e;
      s += (carry(a, prefix[idx]) + state[idx]) * static_cast<double>(dstate[idx]);
    }
    out[i] = static_cast<float>(s);
  }
}

}  // namespace lasp2::cpu
