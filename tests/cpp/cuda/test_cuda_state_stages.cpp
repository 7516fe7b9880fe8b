// The segment-state walk's copy ring (tc_state.cu, LASP2_CUDA_STATE_STAGES, session 21):
// 4 and 6 stages only keep more chunks in flight; each chunk's products and their order
// are those of the default 3 stages, so every result must equal the default's bit for bit.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "walking_passes.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/lasp2.h"
#include "../problem.h"

namespace lasp2::cuda {
int tc_state_last_stages();  // launch.h (csrc): the ring of the last state walk launched
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

// Everything one ring computes for a case: the backend's state passes and the walking
// passes that read segment states (over the case's part), then lasp2_forward +
// lasp2_backward of the whole problem on one rank.
struct StageRun {
  std::vector<uint32_t> st, L, dst, qdq, dg;
  std::vector<unsigned char> o, dq, dk, dv;  // the tensors' bytes
  Grads e2e;
};

StageRun run_with_stages(const OpCase& c, const Problem<double>& pr, const std::string& stages) {
  const EnvGuard k("LASP2_CUDA_STATE_STAGES", stages);
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const int64_t bh = pg.bh(), se = pg.state_elems(), scalars = c.B * c.T * c.H;
  DevBuf<float> S0 = to_device_f32(std::vector<float>(bh * se, 0.25f)),
                D0 = to_device_f32(std::vector<float>(bh * se, -0.5f)),
                dgoff = to_device_f32(std::vector<float>(bh, 1.f));
  DevBuf<float> st(bh * se), L(bh), dst(bh * se), qdq(scalars), dg(scalars);
  DevTensor o = dp.like_v(), dq = dp.like_k(), dk = dp.like_k(), dv = dp.like_v();
  for (DevBuf<float>* b : {&st, &L, &dst, &qdq, &dg}) b->poison();
  const KernelBackend& gpu = cuda_backend();
  gpu.part_state(pg, part, st.p, L.p, nullptr);
  gpu.part_dstate(pg, part, dp.dout.cview(), dst.p, nullptr);
  gpu.chunk_forward(pg, part, S0.p, o.mview(), nullptr);
  gpu.chunk_backward_dq(pg, part, dp.dout.cview(), S0.p, dq.mview(), qdq.p, nullptr);
  gpu.chunk_backward_dkdv(pg, part, dp.dout.cview(), D0.p, dk.mview(), dv.mview(), qdq.p, dgoff.p, dg.p,
                          nullptr);
  StageRun r{float_bits(st.download()),  float_bits(L.download()), float_bits(dst.download()),
             float_bits(qdq.download()), float_bits(dg.download()), o.buf.download(),
             dq.buf.download(),          dk.buf.download(),        dv.buf.download(),
             {}};
  const PartLayout layout = PartLayout::contiguous(1, 0);
  DeviceRank rank(pr, c.dtype, layout);
  rank.enqueue(gpu, nullptr, layout, true, nullptr);
  cuda_ok(cudaStreamSynchronize(nullptr), "lasp2 forward + backward");
  r.e2e = rank.grads();
  // the knob reached the walk (the cases are bf16 on the tensor-core route)
  EXPECT_EQ(lasp2::cuda::tc_state_last_stages(), stages.empty() ? 3 : std::stoi(stages)) << "ring " << stages;
  return r;
}

void run_stages_case(const OpCase& c) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const Problem<double> pr = make_problem(c, 7100 + static_cast<uint32_t>(c.T));
  const StageRun want = run_with_stages(c, pr, "");
  for (const char* stages : {"4", "6"}) {
    SCOPED_TRACE(std::string("LASP2_CUDA_STATE_STAGES=") + stages);
    const StageRun got = run_with_stages(c, pr, stages);
    EXPECT_EQ(got.st, want.st) << "part_state differs";
    EXPECT_EQ(got.L, want.L) << "part_state's log decay differs";
    EXPECT_EQ(got.dst, want.dst) << "part_dstate differs";
    EXPECT_EQ(got.o, want.o) << "o differs";
    EXPECT_EQ(got.dq, want.dq) << "dq differs";
    EXPECT_EQ(got.qdq, want.qdq) << "q.dq differs";
    EXPECT_EQ(got.dk, want.dk) << "dk differs";
    EXPECT_EQ(got.dv, want.dv) << "dv differs";
    EXPECT_EQ(got.dg, want.dg) << "dg differs";
    EXPECT_EQ(got.e2e.o, want.e2e.o) << "lasp2_forward's o differs";
    EXPECT_EQ(got.e2e.dq, want.e2e.dq) << "lasp2_backward's dq differs";
    EXPECT_EQ(got.e2e.dk, want.e2e.dk) << "lasp2_backward's dk differs";
    EXPECT_EQ(got.e2e.dv, want.e2e.dv) << "lasp2_backward's dv differs";
    EXPECT_EQ(got.e2e.dg, want.e2e.dg) << "lasp2_backward's dg differs";
  }
  // and the default's states against the float64 CPU backend, so that equal runs are right ones
  const AttentionParams pc = pr.params();
  const int64_t n = pc.bh() * pc.state_elems();
  std::vector<float> cpu_st(n), cpu_L(pc.bh()), cpu_dst(n);
  const TokenRange part{c.begin, c.end};
  cpu_backend().part_state(pc, part, cpu_st.data(), cpu_L.data(), nullptr);
  cpu_backend().part_dstate(pc, part, pr.dout_view(), cpu_dst.data(), nullptr);
  auto floats = [](const std::vector<uint32_t>& bits) {
    std::vector<float> f(bits.size());
    std::memcpy(f.data(), bits.data(), bits.size() * sizeof(float));
    return f;
  };
  const double tol = tol_of(c.dtype);
  EXPECT_LT(rel_err_f32(floats(want.st), cpu_st), tol) << "part_state against the CPU";
  EXPECT_LT(rel_err_f32(floats(want.dst), cpu_dst), tol) << "part_dstate against the CPU";
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
