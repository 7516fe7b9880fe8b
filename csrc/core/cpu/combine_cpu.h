#pragma once

#include <cstdint>
#include <vector>

namespace lasp2::cpu {

void combine_prefix(const std::vector<const float*>& parts, const float* log_decays, int target,
                    int64_t bh, int64_t state_elems, float* out);
void combine_suffix(const std::vector<const float*>& parts, const float* log_decays, int target,
                    int64_t bh, int64_t state_elems, float* out);
void state_dot(const float* prefix, const float* state, const float* log_decay,
               const float* dstate, int64_t bh, int64_t state_elems, float* out);

}  // namespace lasp2::cpu
