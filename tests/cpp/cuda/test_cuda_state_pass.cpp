// The segment-state walk of the scalar family's CUDA kernels (tc_state.cu): where it ends
// (LASP2_CUDA_STATE_FLOOR) and its two copy paths.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "walking_passes.h"
#include "../problem.h"

namespace lasp2::testing {
namespace {

// ---- where state walks end (LASP2_CUDA_STATE_FLOOR) -------------------------------------
// The default floor (a walk ends once every term left weighs below 2^-48 of its first)
// against walks to fp32 underflow (floor 0): on 40-chunk segments both fixed-decay heads
// (-0.03, -0.06 per token) and the gated ones end early, and the states differ by no more
// than fp32 rounding of what is kept (the kernel rounds each kept term to bf16, 2^-8).
TEST(CudaStateFloor, DropsOnlyTermsBelowRounding) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const DecayMode mode : {DecayMode::kFixed, DecayMode::kGate}) {
    OpCase c;
    c.name = mode == DecayMode::kFixed ? "floor_fixed" : "floor_gate";
    c.mode = mode;
    c.dk = c.dv = 128;
    c.T = c.end = 3000;
    c.begin = 0;
    c.seg_chunks = 40;
    EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", "40");
    const Problem<double> pr = make_problem(c, 31);
    DeviceProblem dp(pr, c.dtype, c.layout);
    const AttentionParams& pg = dp.p;
    const int64_t n = pg.bh() * pg.state_elems();
    std::vector<float> got[2][2];  // [floor 0, default][exit, entry]
    for (int f = 0; f < 2; ++f) {
      EnvGuard floor("LASP2_CUDA_STATE_FLOOR", f == 0 ? "0" : "");
      DevBuf<float> st(n), L(pg.bh()), d(n);
      cuda_backend().part_state(pg, {0, c.T}, st.p, L.p, nullptr);
      cuda_backend().part_dstate(pg, {0, c.T}, dp.dout.cview(), d.p, nullptr);
      got[f][0] = st.download();
      got[f][1] = d.download();
    }
    for (int e = 0; e < 2; ++e) {
      int64_t bad = 0;
      const double err = rel_err_f32(got[1][e], got[0][e], &bad);
      std::printf("[cuda-op] %-34s %-12s rel_diff=%.3e\n", c.name.c_str(), e ? "part_dstate" : "part_state", err);
      EXPECT_EQ(bad, 0);
      EXPECT_LT(err, 1e-6) << c.name << (e ? " entry" : " exit");
    }
  }
}

// ---- the segment-state walk's two copy paths (tc_state.cu, session 16) ------------------
// The default (tensor-map tile copies and a bulk copy of the weights, one thread, per-stage
// mbarriers on sm_90) against LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernel): the
// walk reads the same bytes, so everything downstream must equal bit for bit: the exit
// states (part_state) and their log decays, the entry states (part_dstate), and the
// passes that walk segment states inside (chunk_forward's o, dq and q.dq, dk, dv and dg);
// the default's are also checked against the CPU backend (float64). The cases make the walk
// stop early (default floor on 40-chunk segments, documents), split it into pieces of which
// later ones walk no chunk (LASP2_CUDA_STATE_SUB_CHUNKS), end on a partial chunk, read
// dims below the tile (dk 128 / dv 64: the b map's zero columns and an idle warp) and padded
// [T, B, H, D] rows. Without an sm_90 device both runs take the cp.async kernel and the
// comparison holds trivially; the CPU comparisons still run.
void run_state_tma_case(const OpCase& c) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const Problem<double> pr = make_problem(c, 5000 + static_cast<uint32_t>(c.T));
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const TokenRange part{c.begin, c.end};
  const int64_t bh = pc.bh(), se = pc.state_elems(), scalars = c.B * c.T * c.H;
  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const std::vector<float> S0 = f32(random_vec(bh * se, 51, 2.0)), D0 = f32(random_vec(bh * se, 52, 0.5)),
                           dgoff = f32(random_vec(bh, 53, 1.0));
  DevBuf<float> S0d = to_device_f32(S0), D0d = to_device_f32(D0), dgoffd = to_device_f32(dgoff);

  auto run = [&](const char* knob) {
    const EnvGuard k("LASP2_CUDA_TILE_COPY", knob);
    return run_walking_passes(cuda_backend(), c, dp, S0d.p, D0d.p, dgoffd.p);
  };
  const WalkOutputs a = run(""), v = run("cp_async");  // the default (tma on sm_90), forced cp.async
  expect_same_walk_bits(v.bits(), a.bits());

  const KernelBackend& cpu = cpu_backend();
  const double tol = tol_of(c.dtype);
  std::vector<float> want_st(bh * se), want_L(bh), want_dst(bh * se);
  cpu.part_state(pc, part, want_st.data(), want_L.data(), nullptr);
  cpu.part_dstate(pc, part, pr.dout_view(), want_dst.data(), nullptr);
  expect_state(c, "tma_part_state", a.st, want_st, tol);
  expect_state(c, "tma_part_dstate", a.dst, want_dst, tol);
  std::vector<double> want_o = pr.zeros_like_v(), want_dq = pr.zeros_like_k(), want_qdq(scalars, 0.0),
                      want_dk = pr.zeros_like_k(), want_dv = pr.zeros_like_v(), want_dg(scalars, 0.0);
  cpu.chunk_forward(pc, part, S0.data(), {want_o.data(), pr.strides(c.dv)}, nullptr);
  cpu.chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), pr.strides(c.dk)}, want_qdq.data(),
                        nullptr);
  cpu.chunk_backward_dkdv(pc, part, pr.dout_view(), D0.data(), {want_dk.data(), pr.strides(c.dk)},
                          {want_dv.data(), pr.strides(c.dv)}, want_qdq.data(), dgoff.data(), want_dg.data(),
                          nullptr);
  expect_rows(c, "tma_o", a.o, want_o, tol);
  expect_rows(c, "tma_dq", a.dq, want_dq, tol);
  expect_scalars(c, "tma_q.dq", a.qdq, want_qdq, tol);
  expect_rows(c, "tma_dk", a.dk, want_dk, tol);
  expect_rows(c, "tma_dv", a.dv, want_dv, tol);
  expect_scalars(c, "tma_dg", a.dg, want_dg, tol_dg(c.dtype, c.end - c.begin));
}

TEST(CudaStateKernel, TmaCopySameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto edge = walking_edge_case;  // part [37, 1000): partial last chunk, 2-chunk segments
  std::vector<OpCase> cases = {edge("st_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               edge("st_bf16_fixed_D128", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128),
                               edge("st_bf16_none_D64_docs", ScalarType::kBFloat16, DecayMode::kNone, 64, 64),
                               edge("st_fp16_gate_dk128_dv64", ScalarType::kFloat16, DecayMode::kGate, 128, 64),
                               edge("st_bf16_fixed_dk64_dv128", ScalarType::kBFloat16, DecayMode::kFixed, 64, 128)};
  // 40-chunk segments: walks that stop at the default floor (fixed: -0.03 / -0.06 a token;
  // gates) with copies of the next two chunks in flight; T = 3000 ends on a partial chunk
  cases.push_back(whole_sequence_case("st_bf16_fixed_D128_seg40_floor", DecayMode::kFixed, 128, 128, 3000, 40));
  cases.push_back(whole_sequence_case("st_bf16_gate_D128_seg40_floor", DecayMode::kGate, 128, 128, 3000, 40));
  cases.push_back(whole_sequence_case("st_bf16_fixed_D64_seg40_floor", DecayMode::kFixed, 64, 64, 3000, 40));
  // split walks: pieces of 3 and 7 chunks; past the floor the later pieces walk no chunk
  OpCase c = whole_sequence_case("st_bf16_fixed_D128_seg16_sub3", DecayMode::kFixed, 128, 128, 2200, 16);
  c.state_sub_chunks = 3;
  cases.push_back(c);
  c = whole_sequence_case("st_bf16_fixed_dk128_dv64_seg40_sub7", DecayMode::kFixed, 128, 64, 3000, 40);
  c.state_sub_chunks = 7;
  cases.push_back(c);
  c = whole_sequence_case("st_bf16_fixed_D128_seg40_sub7_floor0", DecayMode::kFixed, 128, 128, 3000, 40);
  c.state_sub_chunks = 7;
  c.state_floor = 0;  // walks to fp32 underflow only
  cases.push_back(c);
  // documents through long segments (carry 0 at a document start), the backend's segments
  cases.push_back(with_auto_segments(edge("st_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate,
                                          128, 128)));
  c = whole_sequence_case("st_bf16_gate_D64_seg24_docs", DecayMode::kGate, 64, 64, 3000, 24);
  c.docs = {640, 1700, 1701, 2990};
  cases.push_back(c);
  cases.push_back(
      as_padded_tbhd(edge("st_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128)));
  c = whole_sequence_case("st_bf16_fixed_D128_TBHD_pad8_seg16", DecayMode::kFixed, 128, 128, 2200, 16);
  c.layout = {true, 8};
  cases.push_back(c);
  for (const OpCase& x : cases)
    if (selected_by_env(x)) run_state_tma_case(x);
}

}  // namespace
}  // namespace lasp2::testing
