// The prefix scan over segment states folded into the tensor-core output and dq kernels
// (LASP2_CUDA_SCAN_FOLD=1, session 21; passes.cpp: run_output, tc_forward.cu:
// fold_entering_state): each block runs the scan's fp32 recurrence (segment_scan_step)
// over the segments before its own, so every output, gradient and kept state must equal
// the scan's bit for bit: gates with documents and -inf gates (a -inf fixed decay), an entering state, D = 64
// and 128, bf16 and fp16, 2 to 24 segments (and the backend's own), both tile-copy paths.
// A fixed decay splits its state walks by default: its forward keeps the scan (the dq pass
// reading the forward's kept states, whole, folds), with the split off it folds too.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "pass_bits.h"

namespace lasp2::cuda {
int64_t scan_folded_passes();  // passes.h (csrc): output passes run with the scan folded
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

// -inf log decays: gates (kGate) block a state at a segment's first, last and inner
// tokens; a fixed decay (kFixed) of -inf blocks the last head at every token
void add_blocking_decays(const OpCase& c, Problem<double>& pr) {
  if (c.mode == DecayMode::kFixed) {
    pr.log_decay[c.H - 1] = -INFINITY;
    return;
  }
  for (int64_t t : {c.begin, c.begin + 63, c.begin + 64, (c.begin + c.end) / 2, c.end - 1})
    pr.gate[(1 * c.T + t) * c.H + (c.H - 1)] = -INFINITY;
}

struct FoldCase {
  OpCase op;
  bool blocking;  // add_blocking_decays
  bool forward_folds;  // chunk_forward with the knob: no split walk (its scan is folded)
};

void run_fold_case(const FoldCase& fc) {
  const OpCase& c = fc.op;
  SCOPED_TRACE(c.name);
  const EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  const EnvGuard sub("LASP2_CUDA_STATE_SUB_CHUNKS",
                     c.state_sub_chunks >= 0 ? std::to_string(c.state_sub_chunks) : "");
  Problem<double> pr = make_problem(c, 7300 + static_cast<uint32_t>(c.T + c.dk));
  if (fc.blocking) add_blocking_decays(c, pr);
  const AttentionParams p = pr.params();
  const std::vector<double> s0 = random_vec(p.bh() * p.state_elems(), 7301, 0.5);
  const std::vector<float> S0(s0.begin(), s0.end());
  const PassBits want = with_env("LASP2_CUDA_SCAN_FOLD", "", [&] {
    const int64_t n0 = cuda::scan_folded_passes();
    PassBits r = run_pass_bits(c, pr, S0);
    EXPECT_EQ(cuda::scan_folded_passes(), n0) << "folded with the knob unset";
    return r;
  });
  expect_states_near_cpu(c, pr, want);
  {
    SCOPED_TRACE("LASP2_CUDA_SCAN_FOLD=0");
    const int64_t n0 = cuda::scan_folded_passes();
    expect_same_pass_bits(with_env("LASP2_CUDA_SCAN_FOLD", "0", [&] { return run_pass_bits(c, pr, S0); }), want);
    EXPECT_EQ(cuda::scan_folded_passes(), n0) << "folded with the knob 0";
  }
  SCOPED_TRACE("LASP2_CUDA_SCAN_FOLD=1");
  const EnvGuard knob("LASP2_CUDA_SCAN_FOLD", "1");
  const int64_t n0 = cuda::scan_folded_passes();
  expect_same_pass_bits(run_pass_bits(c, pr, S0), want);
  // the knob took effect: the e2e dq pass reads whole kept states, so it folds in every
  // case; chunk_forward alone folds only without a split walk
  EXPECT_GT(cuda::scan_folded_passes(), n0) << "no pass folded its scan";
  DeviceProblem dp(pr, c.dtype, c.layout);
  DevBuf<float> init = to_device_f32(S0);
  DevTensor o = dp.like_v();
  const int64_t n1 = cuda::scan_folded_passes();
  cuda_backend().chunk_forward(dp.p, {c.begin, c.end}, init.p, o.mview(), nullptr);
  cuda_ok(cudaDeviceSynchronize(), "chunk_forward");
  EXPECT_EQ(cuda::scan_folded_passes() - n1, fc.forward_folds ? 1 : 0) << "chunk_forward's fold";
}

OpCase fold_case(const char* name, ScalarType t, DecayMode m, int64_t d, int64_t T, int seg_chunks) {
  OpCase c;
  c.name = name;
  c.dtype = t;
  c.mode = m;
  c.dk = c.dv = d;
  c.T = c.end = T;
  c.begin = 0;
  c.seg_chunks = seg_chunks;
  return c;
}

std::vector<FoldCase> fold_cases() {
  constexpr ScalarType bf = ScalarType::kBFloat16, hf = ScalarType::kFloat16;
  const auto edge = walking_edge_case;  // part [37, 1000): partial last chunk, 2-chunk segments
  std::vector<FoldCase> cases;
  cases.push_back({edge("fold_gate_D64_docs_seg2", bf, DecayMode::kGate, 64, 64), true, true});
  cases.push_back({edge("fold_gate_D128_docs_seg2_fp16", hf, DecayMode::kGate, 128, 128), true, true});
  cases.push_back({fold_case("fold_gate_D128_seg5", bf, DecayMode::kGate, 128, 3000, 5), false, true});
  cases.push_back({fold_case("fold_gate_D64_seg3_fp16", hf, DecayMode::kGate, 64, 3000, 3), true, true});
  OpCase c = fold_case("fold_gate_D128_seg2_docs_fp16", hf, DecayMode::kGate, 128, 3000, 2);
  c.docs = {640, 1700, 1701, 2990};  // 24 segments, packed documents
  cases.push_back({c, true, true});
  c = fold_case("fold_gate_D64_seg13_dims", bf, DecayMode::kGate, 64, 2000, 13);
  c.dk = 40;  // da != dv: the state's element index, both orientations (o and dq)
  c.dv = 56;
  cases.push_back({c, false, true});
  cases.push_back({with_auto_segments(edge("fold_gate_D128_T4109_auto_docs", bf, DecayMode::kGate, 128, 128)),
                   true, true});
  // fixed decay: split walks by default (the forward keeps its scan), or not split
  cases.push_back({fold_case("fold_fixed_D128_seg40", bf, DecayMode::kFixed, 128, 3000, 40), false, false});
  cases.push_back({edge("fold_fixed_D64_seg2_fp16", hf, DecayMode::kFixed, 64, 64), false, true});
  c = fold_case("fold_fixed_D64_seg40_nosplit", bf, DecayMode::kFixed, 64, 3000, 40);
  c.state_sub_chunks = 0;
  cases.push_back({c, true, true});
  return cases;
}

TEST(CudaScanFold, SameBitsAsTheScan) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const FoldCase& x : fold_cases()) {
    run_fold_case(x);
    const EnvGuard cp("LASP2_CUDA_TILE_COPY", "cp_async");
    FoldCase y = x;
    y.op.name += "_cp_async";
    run_fold_case(y);
  }
}

}  // namespace
}  // namespace lasp2::testing
