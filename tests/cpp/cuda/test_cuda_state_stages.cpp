// The segment-state walk's copy ring (tc_state.cu, LASP2_CUDA_STATE_STAGES, session 21):
// 4 and 6 stages only keep more chunks in flight; each chunk's products and their order
// are those of the default 3 stages, so every result must equal the default's bit for bit.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "walking_passes.h"
#include "cuda_test_util.h"
#include "pass_bits.h"

namespace lasp2::cuda {
int tc_state_last_stages();  // launch.h (csrc): the ring of the last state walk launched
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

// Everything one ring computes for a case (pass_bits.h).
PassBits run_with_stages(const OpCase& c, const Problem<double>& pr, const std::string& stages) {
  const EnvGuard k("LASP2_CUDA_STATE_STAGES", stages);
  const AttentionParams p = pr.params();
  const PassBits r = run_pass_bits(c, pr, std::vector<float>(p.bh() * p.state_elems(), 0.25f));
  // the knob reached the walk (the cases are bf16 on the tensor-core route)
  EXPECT_EQ(lasp2::cuda::tc_state_last_stages(), stages.empty() ? 3 : std::stoi(stages)) << "ring " << stages;
  return r;
}

void run_stages_case(const OpCase& c) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const Problem<double> pr = make_problem(c, 7100 + static_cast<uint32_t>(c.T));
  const PassBits want = run_with_stages(c, pr, "");
  for (const char* stages : {"4", "6"}) {
    SCOPED_TRACE(std::string("LASP2_CUDA_STATE_STAGES=") + stages);
    expect_same_pass_bits(run_with_stages(c, pr, stages), want);
  }
  expect_states_near_cpu(c, pr, want);
}

OpCase stages_case(const char* name, DecayMode m, int64_t d, int64_t T, int seg_chunks) {
  return whole_sequence_case(name, m, d, d, T, seg_chunks);
}

// Walks shorter than the ring (2-chunk segments, pieces of 3 chunks, documents) and longer
// (40-chunk segments: gates stop near the 2^-48 floor after ~10 chunks, fixed decays walk
// further; floor 0 walks to underflow), D = 64 and 128, both copy paths where the device
// has sm_90 (the tensor-map kernel) and the cp.async kernel under LASP2_CUDA_TILE_COPY.
TEST(CudaStateStages, DeeperRingsSameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto edge = walking_edge_case;  // part [37, 1000): partial last chunk, 2-chunk segments
  std::vector<OpCase> cases = {edge("stg_gate_D128_docs_seg2", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               edge("stg_fixed_D64_seg2", ScalarType::kBFloat16, DecayMode::kFixed, 64, 64)};
  cases.push_back(stages_case("stg_gate_D128_seg40_floor", DecayMode::kGate, 128, 3000, 40));
  cases.push_back(stages_case("stg_gate_D64_seg40_floor", DecayMode::kGate, 64, 3000, 40));
  cases.push_back(stages_case("stg_fixed_D64_seg40_floor", DecayMode::kFixed, 64, 3000, 40));
  OpCase c = stages_case("stg_fixed_D128_seg16_sub3", DecayMode::kFixed, 128, 2200, 16);
  c.state_sub_chunks = 3;  // split walks of 3 chunks: shorter than 4 and 6 stages
  cases.push_back(c);
  c = stages_case("stg_fixed_D128_seg40_sub7_floor0", DecayMode::kFixed, 128, 3000, 40);
  c.state_sub_chunks = 7;
  c.state_floor = 0;  // walks to fp32 underflow only: every piece longer than the ring
  cases.push_back(c);
  c = stages_case("stg_gate_D64_seg24_docs", DecayMode::kGate, 64, 3000, 24);
  c.docs = {640, 1700, 1701, 2990};  // packed documents cut walks anywhere
  cases.push_back(c);
  cases.push_back(with_auto_segments(
      edge("stg_gate_D128_T4109_auto_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128)));
  for (const OpCase& x : cases) {
    run_stages_case(x);
    const EnvGuard cp("LASP2_CUDA_TILE_COPY", "cp_async");
    OpCase y = x;
    y.name += "_cp_async";
    run_stages_case(y);
  }
}

// Counts the walk was not built for are refused with the knob's name.
TEST(CudaStateStages, OtherCountsAreErrors) {
  LASP2_SKIP_WITHOUT_CUDA();
  OpCase c = stages_case("stg_bad", DecayMode::kGate, 128, 640, 4);
  const Problem<double> pr = make_problem(c, 7001);
  DeviceProblem dp(pr, c.dtype, c.layout);
  DevBuf<float> st(dp.p.bh() * dp.p.state_elems()), L(dp.p.bh());
  for (const char* bad : {"5", "2", "abc"}) {
    const EnvGuard k("LASP2_CUDA_STATE_STAGES", bad);
    try {
      cuda_backend().part_state(dp.p, {0, c.T}, st.p, L.p, nullptr);
      ADD_FAILURE() << "LASP2_CUDA_STATE_STAGES=" << bad << " was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("LASP2_CUDA_STATE_STAGES"), std::string::npos) << e.what();
    }
  }
}

}  // namespace
}  // namespace lasp2::testing
