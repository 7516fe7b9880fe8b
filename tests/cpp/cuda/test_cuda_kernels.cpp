// Every CUDA backend function against the CPU backend run in float64 on the SAME
// inputs (rounded to the device dtype first, decay values to float32), over a
// part that starts mid-sequence, with random entering states, packed documents
// at chunk and segment edges, strided views, odd sizes, both kernel paths
// (tensor cores and generic) and forced multi-segment splits.
//
// Tolerances (relative max-norm error, |got - want|_max / |want|_max), against a
// float64 computation on identical inputs, so they measure the kernels alone:
//   fp32 1e-4: generic FMA path, fp32 accumulation over <= a few thousand terms.
//   fp16 3e-3: tensor cores round the score tile P and the running state S to
//              fp16 (2^-11 relative) before each product; outputs are rounded
//              to fp16 (2^-11): a few roundings of 4.9e-4.
//   bf16 1e-2: the same roundings at 2^-8 = 3.9e-3.
// dg is a reverse cumulative sum over the part of per-token terms (q.dq - k.dk)
// whose exact sum cancels to the few token pairs that straddle t: the term
// errors (one rounding tolerance each) add up like a random walk, so its
// tolerance grows with sqrt(tokens / 64).
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "../problem.h"

namespace lasp2::testing {
namespace {

void run_case(const OpCase& c) {
  const CaseKnobs knobs(c);
  const Problem<double> pr = make_problem(c, 1000 + static_cast<uint32_t>(c.T));
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const KernelBackend& gpu = cuda_backend();
  const KernelBackend& cpu = cpu_backend();
  const int64_t bh = pc.bh(), se = pc.state_elems();
  const double tol = tol_of(c.dtype);
  const auto sv = pr.strides(c.dv), sk = pr.strides(c.dk);

  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const std::vector<float> S0 = f32(random_vec(bh * se, 11, 2.0));
  const std::vector<float> P0 = f32(random_vec(bh * se, 12, 2.0));
  const std::vector<float> D0 = f32(random_vec(bh * se, 13, 0.5));
  const std::vector<float> dgoff = f32(random_vec(bh, 14, 1.0));
  DevBuf<float> S0d = to_device_f32(S0), P0d = to_device_f32(P0), D0d = to_device_f32(D0),
                dgoffd = to_device_f32(dgoff);

  // 1. part_state
  {
    std::vector<float> want(bh * se), wantL(bh);
    cpu.part_state(pc, part, want.data(), wantL.data(), nullptr);
    DevBuf<float> st(bh * se), L(bh);
    st.poison();
    L.poison();
    gpu.part_state(pg, part, st.p, L.p, nullptr);
    expect_state(c, "part_state", st, want, tol);
    const std::vector<float> gotL = L.download();
    for (int64_t i = 0; i < bh; ++i) {
      if (std::isinf(wantL[i])) EXPECT_TRUE(std::isinf(gotL[i]) && gotL[i] < 0) << "log decay " << i;
      else EXPECT_NEAR(gotL[i], wantL[i], 1e-5 * (1 + std::abs(wantL[i]))) << "log decay " << i;
    }
  }
  // 2. chunk_forward with an entering state (twice: must be bitwise reproducible)
  {
    std::vector<double> want = pr.zeros_like_v();
    cpu.chunk_forward(pc, part, S0.data(), {want.data(), sv}, nullptr);
    DevTensor o = dp.like_v(), o2 = dp.like_v();
    gpu.chunk_forward(pg, part, S0d.p, o.mview(), nullptr);
    gpu.chunk_forward(pg, part, S0d.p, o2.mview(), nullptr);
    expect_rows(c, "chunk_forward", o, want, tol);
    EXPECT_EQ(o.buf.download(), o2.buf.download()) << "chunk_forward is not deterministic";
  }
  // 3. chunk_forward from zero, then add_prefix_output
  {
    std::vector<double> want = pr.zeros_like_v();
    cpu.chunk_forward(pc, part, nullptr, {want.data(), sv}, nullptr);
    cpu.add_prefix_output(pc, part, P0.data(), {want.data(), sv}, nullptr);
    DevTensor o = dp.like_v();
    gpu.chunk_forward(pg, part, nullptr, o.mview(), nullptr);
    gpu.add_prefix_output(pg, part, P0d.p, o.mview(), nullptr);
    expect_rows(c, "fwd+prefix", o, want, tol);
  }
  // 4. part_dstate
  {
    std::vector<float> want(bh * se);
    cpu.part_dstate(pc, part, pr.dout_view(), want.data(), nullptr);
    DevBuf<float> d(bh * se);
    d.poison();
    gpu.part_dstate(pg, part, dp.dout.cview(), d.p, nullptr);
    expect_state(c, "part_dstate", d, want, tol);
  }
  // 5. dq (+ q.dq), 6. dk, dv, dg
  {
    std::vector<double> want_dq = pr.zeros_like_k(), want_qdq(c.B * c.T * c.H, 0.0);
    cpu.chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), sk}, want_qdq.data(),
                          nullptr);
    DevTensor dq = dp.like_k();
    DevBuf<float> qdq(c.B * c.T * c.H);
    qdq.poison();
    gpu.chunk_backward_dq(pg, part, dp.dout.cview(), S0d.p, dq.mview(), qdq.p, nullptr);
    expect_rows(c, "dq", dq, want_dq, tol);
    expect_scalars(c, "q.dq", qdq, want_qdq, tol);

    std::vector<double> want_dk = pr.zeros_like_k(), want_dv = pr.zeros_like_v(),
                        want_dg(c.B * c.T * c.H, 0.0);
    cpu.chunk_backward_dkdv(pc, part, pr.dout_view(), D0.data(), {want_dk.data(), sk},
                            {want_dv.data(), sv}, want_qdq.data(), dgoff.data(), want_dg.data(),
                            nullptr);
    DevTensor dk = dp.like_k(), dv = dp.like_v(), dk2 = dp.like_k();
    DevBuf<float> dg(c.B * c.T * c.H);
    dg.poison();
    gpu.chunk_backward_dkdv(pg, part, dp.dout.cview(), D0d.p, dk.mview(), dv.mview(), qdq.p,
                            dgoffd.p, dg.p, nullptr);
    expect_rows(c, "dk", dk, want_dk, tol);
    expect_rows(c, "dv", dv, want_dv, tol);
    expect_scalars(c, "dg", dg, want_dg, tol_dg(c.dtype, c.end - c.begin));
    // without dg, a second time: identical dk
    DevTensor dv2 = dp.like_v();
    gpu.chunk_backward_dkdv(pg, part, dp.dout.cview(), D0d.p, dk2.mview(), dv2.mview(), nullptr,
                            nullptr, nullptr, nullptr);
    EXPECT_EQ(dk.buf.download(), dk2.buf.download()) << "dk is not deterministic";
  }
}

std::vector<OpCase> op_cases() {
  std::vector<OpCase> cases;
  // Part [37, 1000): chunks start at 37 + 64 i, segments (2 chunks) at 37 + 128 i.
  // Documents at a chunk start (101), a segment start (293) and the token after
  // it, mid-chunk (600) and the last token (999).
  const std::vector<int64_t> docs = {101, 293, 294, 600, 999};
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat16, ScalarType::kFloat32})
    for (DecayMode m : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate})
      for (int64_t d : {64, 128}) {
        OpCase c;
        c.dtype = t;
        c.mode = m;
        c.dk = c.dv = d;
        c.docs = m == DecayMode::kFixed ? std::vector<int64_t>{} : docs;
        c.name = std::string(dtype_name(t)) + "_" + decay_mode_name(m) + "_D" + std::to_string(d) +
                 (c.docs.empty() ? "" : "_docs");
        cases.push_back(c);
      }
  {  // longer forced segments: the 3-stage copy pipeline of the segment-state
     // kernel wraps around its stages; documents stop the entry-state walk early
    OpCase c;
    c.name = "bf16_gate_D128_seg5_docs";
    c.dk = c.dv = 128;
    c.docs = docs;
    c.seg_chunks = 5;
    cases.push_back(c);
    c.name = "fp16_fixed_D64_seg7";
    c.dtype = ScalarType::kFloat16;
    c.mode = DecayMode::kFixed;
    c.dk = c.dv = 64;
    c.docs = {};
    c.seg_chunks = 7;
    cases.push_back(c);
    c.name = "bf16_none_D128_seg3";
    c.dtype = ScalarType::kBFloat16;
    c.mode = DecayMode::kNone;
    c.dk = c.dv = 128;
    c.seg_chunks = 3;
    cases.push_back(c);
  }
  {  // 16-chunk segments with fixed decays (-0.03, -0.06 per token: no underflow): the
     // exit-weighted states walk each segment backward, carrying the decay to its end
     // over 16 chunks (the gated cases' decays, -0.3 per token on average, underflow
     // after about 6 chunks and stop the walks early, e.g. T4109_auto)
    cases.push_back(whole_sequence_case("bf16_fixed_D128_seg16", DecayMode::kFixed, 128, 128, 2200, 16));
  }
  {  // Split segment-state walks (StateArgs::sub_chunks; the default splits fixed decays
     // into pieces of 32 chunks where segments are longer): pieces of 3 chunks over
     // 16-chunk segments (every piece walks and is added), pieces of 2 with gates and
     // documents (pieces after a document start or an underflow are skipped), one chunk
     // per piece with a short last segment (pieces past its end), D = 64 (one column
     // block), dv = 64 at D = 128 (no second column block), no decay, and the default
     // pieces over 40-chunk segments (32 + 8 chunks; head 1's second piece underflows)
    OpCase c = whole_sequence_case("bf16_fixed_D128_seg16_sub3", DecayMode::kFixed, 128, 128, 2200, 16);
    c.state_sub_chunks = 3;
    cases.push_back(c);
    c = whole_sequence_case("bf16_fixed_D128_T3000_seg40_default_split", DecayMode::kFixed, 128, 128, 3000, 40);
    cases.push_back(c);
    // the walks as before session 14 (to fp32 underflow; by default head 0's end at the
    // 2^-48 floor after about 17 chunks, head 1's after 9, both inside the segments)
    c.name = "bf16_fixed_D128_T3000_seg40_floor0";
    c.state_floor = 0;
    cases.push_back(c);
    c = OpCase();
    c.name = "bf16_gate_D128_seg5_docs_sub2";
    c.dk = c.dv = 128;
    c.docs = docs;
    c.seg_chunks = 5;
    c.state_sub_chunks = 2;
    cases.push_back(c);
    c.name = "bf16_none_D128_seg3_sub2";
    c.mode = DecayMode::kNone;
    c.docs = {};
    c.seg_chunks = 3;
    cases.push_back(c);
    c.name = "fp16_fixed_D64_seg7_sub1";
    c.dtype = ScalarType::kFloat16;
    c.mode = DecayMode::kFixed;
    c.dk = c.dv = 64;
    c.seg_chunks = 7;
    c.state_sub_chunks = 1;
    cases.push_back(c);
    c.name = "fp16_fixed_dk128_dv64_seg6_sub4";
    c.dk = 128;
    c.seg_chunks = 6;
    c.state_sub_chunks = 4;
    cases.push_back(c);
  }
  {  // 4096 + 13 tokens, the backend's own segmentation
    OpCase c = with_auto_segments(walking_edge_case("bf16_gate_D128_T4109_auto", ScalarType::kBFloat16,
                                                    DecayMode::kGate, 128, 128));
    cases.push_back(c);
    c.name = "fp32_gate_D64_T4109_auto";
    c.dtype = ScalarType::kFloat32;
    c.dk = c.dv = 64;
    cases.push_back(c);
  }
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat32}) {
    for (int64_t T : {1, 77}) {
      const std::string name = std::string(dtype_name(t)) + "_gate_D64_T" + std::to_string(T);
      OpCase c = whole_sequence_case(name.c_str(), DecayMode::kGate, 64, 64, T, 0);
      c.dtype = t;
      cases.push_back(c);
    }
    OpCase c;
    c.dtype = t;
    c.T = 77;
    c.begin = 13;
    c.end = 77;
    c.docs = {13, 40};
    c.seg_chunks = 1;
    c.name = std::string(dtype_name(t)) + "_gate_D64_T77_part13";
    cases.push_back(c);
  }
  auto odd = [&](const char* name, ScalarType t, int64_t dk, int64_t dv, bool generic = false) {
    OpCase c;
    c.name = name;
    c.dtype = t;
    c.dk = dk;
    c.dv = dv;
    c.T = 300;
    c.begin = 5;
    c.end = 300;
    c.docs = {69, 200};
    c.seg_chunks = 1;
    c.force_generic = generic;
    cases.push_back(c);
  };
  odd("bf16_dk40_dv24_tc_padded", ScalarType::kBFloat16, 40, 24);
  odd("bf16_dk96_dv128_tc", ScalarType::kBFloat16, 96, 128);
  odd("fp16_dk128_dv64_tc", ScalarType::kFloat16, 128, 64);
  odd("fp16_dk33_dv17_generic", ScalarType::kFloat16, 33, 17);
  odd("fp32_dk256_dv192_global_state", ScalarType::kFloat32, 256, 192);
  odd("bf16_dk160_dv96_generic", ScalarType::kBFloat16, 160, 96);
  odd("bf16_D128_forced_generic", ScalarType::kBFloat16, 128, 128, true);
  {  // strided views: Megatron [T, B, H, D] with padded heads
    OpCase c;
    c.name = "bf16_gate_D128_TBHD_pad8_tc";
    c.dk = c.dv = 128;
    c.layout = {true, 8};
    c.docs = docs;
    cases.push_back(c);
    c.name = "bf16_gate_D64_TBHD_pad3_generic";
    c.dk = c.dv = 64;
    c.layout = {true, 3};
    cases.push_back(c);
    c.name = "fp16_gate_D64_BTHD_pad8_tc";
    c.dtype = ScalarType::kFloat16;
    c.layout = {false, 8};
    cases.push_back(c);
    c.name = "fp32_gate_D64_TBHD_pad1";
    c.dtype = ScalarType::kFloat32;
    c.layout = {true, 1};
    cases.push_back(c);
  }
  {  // more heads than batch rows, B = 1
    OpCase c;
    c.name = "bf16_gate_D64_B1_H5";
    c.B = 1;
    c.H = 5;
    c.docs = docs;
    cases.push_back(c);
  }
  return cases;
}

class CudaOps : public ::testing::TestWithParam<OpCase> {};

TEST_P(CudaOps, MatchCpuBackendFloat64) {
  LASP2_SKIP_WITHOUT_CUDA();
  run_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(All, CudaOps, ::testing::ValuesIn(op_cases()),
                         [](const ::testing::TestParamInfo<OpCase>& i) { return i.param.name; });

// ---- errors -----------------------------------------------------------------------------
TEST(CudaErrors, RejectsUnsupportedInputs) {
  LASP2_SKIP_WITHOUT_CUDA();
  OpCase c;
  c.T = 64;
  c.begin = 0;
  c.end = 64;
  const Problem<double> pr = make_problem(c, 1);
  DeviceProblem dp(pr, ScalarType::kBFloat16, {});
  DevTensor o = dp.like_v();
  AttentionParams p = dp.p;
  p.decay.dtype = ScalarType::kFloat64;  // decay values must be float32 on CUDA
  EXPECT_THROW(cuda_backend().chunk_forward(p, {0, 64}, nullptr, o.mview(), nullptr), Error);
  p = dp.p;
  p.dtype = ScalarType::kFloat64;
  EXPECT_THROW(cuda_backend().chunk_forward(p, {0, 64}, nullptr, o.mview(), nullptr), Error);
  p = dp.p;
  p.dim_k = 300;
  EXPECT_THROW(cuda_backend().chunk_forward(p, {0, 64}, nullptr, o.mview(), nullptr), Error);
  p = dp.p;
  EXPECT_THROW(cuda_backend().chunk_forward(p, {10, 65}, nullptr, o.mview(), nullptr), Error);
  EXPECT_EQ(cuda_backend().device(), Device::kCUDA);
  EXPECT_EQ(&backend_for(Device::kCUDA), &cuda_backend());
}

}  // namespace
}  // namespace lasp2::testing
