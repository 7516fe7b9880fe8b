// The prefix/suffix combines of gathered states: checked against direct sums and
// for associativity (merging two adjacent parts first gives the same prefix).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>

#include "lasp2/kernel_backend.h"
#include "problem.h"

namespace lasp2::testing {
namespace {

struct Records {
  int parts;
  int64_t bh, elems;
  std::vector<std::vector<float>> states;
  std::vector<float> log_decays;  // [parts][bh]

  Records(int parts_, int64_t bh_, int64_t elems_, uint32_t seed) : parts(parts_), bh(bh_), elems(elems_) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal;
    std::uniform_real_distribution<float> uniform(-2.f, 0.f);
    states.assign(parts, std::vector<float>(bh * elems));
    for (auto& s : states)
      for (auto& x : s) x = normal(rng);
    log_decays.resize(parts * bh);
    for (auto& x : log_decays) x = uniform(rng);
  }
  std::vector<const float*> pointers() const {
    std::vector<const float*> p;
    for (const auto& s : states) p.push_back(s.data());
    return p;
  }
};

// What the combine at part `target` must hold, computed directly: the sum over the
// earlier parts (combine_prefix) or the later ones (combine_suffix) of each part's state
// times the decay of the parts strictly between it and `target`.
enum class Side { kEarlier, kLater };

void expect_direct_decayed_sums(const Records& r, Side side) {
  for (int target = 0; target < r.parts; ++target) {
    SCOPED_TRACE("target part " + std::to_string(target));
    std::vector<float> got(r.bh * r.elems);
    const auto combine = side == Side::kEarlier ? &KernelBackend::combine_prefix : &KernelBackend::combine_suffix;
    (cpu_backend().*combine)(r.pointers(), r.log_decays.data(), target, r.bh, r.elems, got.data(), nullptr);
    const int first = side == Side::kEarlier ? 0 : target + 1, end = side == Side::kEarlier ? target : r.parts;
    for (int64_t i = 0; i < r.bh; ++i) {
      for (int64_t e = 0; e < r.elems; ++e) {
        double want = 0;
        for (int m = first; m < end; ++m) {
          double L = 0;
          for (int j = std::min(m, target) + 1; j < std::max(m, target); ++j) L += r.log_decays[j * r.bh + i];
          want += std::exp(L) * r.states[m][i * r.elems + e];
        }
        EXPECT_NEAR(got[i * r.elems + e], want, 1e-5);
      }
    }
  }
}

TEST(Combine, PrefixIsTheDecayedSumOfEarlierParts) {
  expect_direct_decayed_sums(Records(5, 3, 4, 7), Side::kEarlier);
}

TEST(Combine, SuffixIsTheDecayedSumOfLaterParts) {
  expect_direct_decayed_sums(Records(4, 2, 3, 8), Side::kLater);
}

// (M1, L1) then (M2, L2) merge into (exp(L2) M1 + M2, L1 + L2); the prefix of the
// last part is the same whether or not the first two parts were merged first.
TEST(Combine, IsAssociative) {
  Records r(4, 2, 6, 9);
  std::vector<float> full(r.bh * r.elems);
  cpu_backend().combine_prefix(r.pointers(), r.log_decays.data(), 3, r.bh, r.elems, full.data(), nullptr);

  Records merged = r;
  merged.parts = 3;
  merged.states.erase(merged.states.begin());
  merged.log_decays.erase(merged.log_decays.begin(), merged.log_decays.begin() + r.bh);
  for (int64_t i = 0; i < r.bh; ++i) {
    const float L2 = r.log_decays[1 * r.bh + i];
    for (int64_t e = 0; e < r.elems; ++e)
      merged.states[0][i * r.elems + e] = std::exp(L2) * r.states[0][i * r.elems + e] + r.states[1][i * r.elems + e];
    merged.log_decays[i] = r.log_decays[i] + L2;
  }
  std::vector<float> via_merge(r.bh * r.elems);
  cpu_backend().combine_prefix(merged.pointers(), merged.log_decays.data(), 2, r.bh, r.elems, via_merge.data(), nullptr);
  EXPECT_LT(max_abs_diff(full, via_merge), 1e-5);
}

TEST(Combine, BlockedPartStopsThePrefix) {
  Records r(3, 1, 2, 10);
  r.log_decays[1] = -std::numeric_limits<float>::infinity();
  std::vector<float> got(r.elems);
  cpu_backend().combine_prefix(r.pointers(), r.log_decays.data(), 2, 1, r.elems, got.data(), nullptr);
  for (int64_t e = 0; e < r.elems; ++e) EXPECT_FLOAT_EQ(got[e], r.states[1][e]);
}

}  // namespace
}  // namespace lasp2::testing
