// Helpers shared by the KDA CUDA tests (test_kda_cuda.cpp) and timings
// (test_kda_timing.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <random>
#include <vector>

namespace lasp2::testing {

// `count` vectors of `floats` normal values (sd 0.3) from one generator seeded `seed`,
// one after another: entering states and leaving-state gradients.
inline std::vector<std::vector<float>> random_states(uint32_t seed, int count, int64_t floats) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<std::vector<float>> out(count, std::vector<float>(floats));
  for (auto& vec : out)
    for (auto& x : vec) x = normal(rng);
  return out;
}

// The number of elements of a and b (same size) whose bits differ.
template <typename E>
int64_t differing_words(const std::vector<E>& a, const std::vector<E>& b) {
  int64_t differ = 0;
  for (size_t e = 0; e < a.size(); ++e) differ += std::memcmp(&a[e], &b[e], sizeof(E)) != 0;
  return differ;
}

}  // namespace lasp2::testing
