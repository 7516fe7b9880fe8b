// The chunked CPU kernels against the step-by-step float64 recurrence: every decay
// mode, odd lengths, several chunk sizes, packed documents, fp32 and fp64.
#include <gtest/gtest.h>

#include <tuple>

#include "lasp2/lasp2.h"
#include "problem.h"
#include "recurrent_reference.h"

namespace lasp2::testing {
namespace {

struct KernelCase {
  DecayMode mode;
  int64_t seqlen;
  int chunk_size;
  bool with_docs;
};

std::string case_name(const ::testing::TestParamInfo<KernelCase>& info) {
  const auto& c = info.param;
  const char* mode = decay_mode_name(c.mode);
  return std::string(mode) + "_T" + std::to_string(c.seqlen) + "_C" + std::to_string(c.chunk_size) +
         (c.with_docs ? "_docs" : "");
}

ProblemSpec spec_of(const KernelCase& c) {
  ProblemSpec s;
  s.mode = c.mode;
  s.seqlen = c.seqlen;
  s.chunk_size = c.chunk_size;
  if (c.with_docs) {
    for (int64_t t : {int64_t(3), c.seqlen / 2, c.seqlen / 2 + 1, c.seqlen - 1})
      if (t > 0 && t < c.seqlen) s.doc_starts.push_back(t);
  }
  return s;
}

template <typename T>
struct Outputs {
  std::vector<T> o, dq, dk, dv, dg;
};

template <typename T>
Outputs<T> run_single_device(const Problem<T>& pr) {
  const AttentionParams p = pr.params();
  Outputs<T> out{pr.zeros_like_v(), pr.zeros_like_k(), pr.zeros_like_k(), pr.zeros_like_v(),
                 std::vector<T>(pr.gate.size(), T(0))};
  const auto layout = PartLayout::contiguous(1, 0);
  const auto sv = pr.strides(p.dim_v), sk = pr.strides(p.dim_k);
  lasp2_forward(cpu_backend(), nullptr, layout, p, {out.o.data(), sv}, {}, nullptr, {}, nullptr);
  Workspace ws(lasp2_backward_workspace_bytes(p, layout, true));
  lasp2_backward(cpu_backend(), nullptr, layout, p, pr.dout_view(), {}, {out.dq.data(), sk},
                 {out.dk.data(), sk}, {out.dv.data(), sv}, out.dg.data(), ws.data(), nullptr);
  return out;
}

template <typename T>
void check_against_reference(const KernelCase& c, double tol) {
  const Problem<T> pr(spec_of(c));
  const auto ref = recurrent_reference(pr);
  const auto got = run_single_device(pr);
  EXPECT_LT(rel_error(got.o, ref.o), tol);
  EXPECT_LT(rel_error(got.dq, ref.dq), tol);
  EXPECT_LT(rel_error(got.dk, ref.dk), tol);
  EXPECT_LT(rel_error(got.dv, ref.dv), tol);
  if (c.mode != DecayMode::kNone) EXPECT_LT(rel_error(got.dg, ref.dg), 50 * tol);
}

class ChunkKernels : public ::testing::TestWithParam<KernelCase> {};

TEST_P(ChunkKernels, Float64MatchesRecurrence) { check_against_reference<double>(GetParam(), 1e-11); }
TEST_P(ChunkKernels, Float32MatchesRecurrence) { check_against_reference<float>(GetParam(), 2e-5); }

std::vector<KernelCase> all_cases() {
  std::vector<KernelCase> cases;
  for (DecayMode mode : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate})
    for (int64_t T : {1, 13, 37, 64})
      for (int C : {1, 4, 16, 64})
        for (bool docs : {false, true}) cases.push_back({mode, T, C, docs});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(AllModes, ChunkKernels, ::testing::ValuesIn(all_cases()), case_name);

// The state of a part is the recurrence's final state; the state gradient of a part
// is what the queries of the part owe the state entering it.
TEST(PartState, EqualsFinalStateOfRecurrence) {
  ProblemSpec s;
  s.seqlen = 29;
  Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<float> state(p.bh() * p.state_elems()), log_decay(p.bh());
  cpu_backend().part_state(p, {0, p.seqlen}, state.data(), log_decay.data(), nullptr);
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      std::vector<double> S(p.state_elems(), 0.0);
      double L = 0;
      for (int64_t t = 0; t < p.seqlen; ++t) {
        const double g = p.decay.at(b, t, h);
        L += g;
        const double* k = &pr.k[((b * p.seqlen + t) * p.heads + h) * p.dim_k];
        const double* v = &pr.v[((b * p.seqlen + t) * p.heads + h) * p.dim_v];
        for (int64_t i = 0; i < p.dim_k; ++i)
          for (int64_t j = 0; j < p.dim_v; ++j) S[i * p.dim_v + j] = std::exp(g) * S[i * p.dim_v + j] + k[i] * v[j];
      }
      const float* got = &state[(b * p.heads + h) * p.state_elems()];
      for (int64_t e = 0; e < p.state_elems(); ++e) EXPECT_NEAR(got[e], S[e], 1e-5 * (1 + std::abs(S[e])));
      EXPECT_NEAR(log_decay[b * p.heads + h], L, 1e-5);
    }
  }
}

TEST(PartState, DocumentStartBlocksTheState) {
  ProblemSpec s;
  s.seqlen = 20;
  s.doc_starts = {11};
  Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<float> state(p.bh() * p.state_elems()), log_decay(p.bh());
  cpu_backend().part_state(p, {0, p.seqlen}, state.data(), log_decay.data(), nullptr);
  for (float L : log_decay) EXPECT_TRUE(std::isinf(L) && L < 0);
  // Only the tokens of the last document are in the state: equal to the state of [11, 20).
  std::vector<float> tail(state.size()), tail_decay(p.bh());
  cpu_backend().part_state(p, {11, 20}, tail.data(), tail_decay.data(), nullptr);
  EXPECT_LT(max_abs_diff(state, tail), 1e-6);
}

TEST(Errors, CpuRejectsHalfPrecision) {
  ProblemSpec s;
  Problem<float> pr(s);
  AttentionParams p = pr.params();
  p.dtype = ScalarType::kBFloat16;
  std::vector<float> o(pr.v.size());
  EXPECT_THROW(cpu_backend().chunk_forward(p, {0, p.seqlen}, nullptr, {o.data(), pr.strides(p.dim_v)}, nullptr),
               Error);
}

}  // namespace
}  // namespace lasp2::testing
