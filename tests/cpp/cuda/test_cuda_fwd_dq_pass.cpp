// The output and dq passes of the scalar family's CUDA kernels (tc_forward.cu): the
// score-tile split, the two copy paths and the staged stores, against the CPU backend and
// bit for bit against the kernels they replace.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "../problem.h"

namespace lasp2::testing {
namespace {

// ---- the output and dq passes' score-tile split (tc_forward.cu, session 13) -------------
// Edge cases against the CPU backend in float64, run twice (bitwise reproducible): forced
// 2-chunk segments with documents and a partial last chunk (part [37, 1000)), dims below
// the tile (dv = 40: warps 3-7 write no output but still compute their score tiles and,
// warps 6 and 7, the weights; dk = 96, dv = 72), D = 64 (the 4-warp kernel), fixed and
// no decay, fp16, the backend's own segments at T = 4109; D = 64 also with dk = 48,
// dv = 40 and fixed decay, and each case also with LASP2_CUDA_FWD_KERNEL=old, which must
// give the same bits (D = 64's straight score loops, session 13; the old kernel copies by
// cp.async, so on sm_90 it is compared with the default tensor-map kernel, and
// TmaCopySameBits below compares that with the cp.async variant 2). On an H200 (session 13) these
// cases also gave o, dq and q.dq equal bit for bit to the kernel of sessions 4-12 and to
// the measured variants (tc_scores' Spread; the fine split with the inter product after
// the barrier), which were then removed.
// One case of the output and dq passes on the device (o, dq and q.dq from a random
// entering state) with its CPU reference in float64; run(knob, value) is both passes
// under one environment setting (o and dq poisoned first).
struct FwdDqRun {
  struct Out {
    DevTensor o, dq;
    DevBuf<float> qdq;
  };

  explicit FwdDqRun(const OpCase& c)
      : c(c), pr(make_problem(c, 4000 + static_cast<uint32_t>(c.T))), dp(pr, c.dtype, c.layout),
        part{c.begin, c.end}, scalars(c.B * c.T * c.H) {
    const AttentionParams pc = pr.params();
    const std::vector<double> s0 = random_vec(pc.bh() * pc.state_elems(), 41, 2.0);
    S0.assign(s0.begin(), s0.end());
    S0d = to_device_f32(S0);
    want_o = pr.zeros_like_v();
    want_dq = pr.zeros_like_k();
    want_qdq.assign(scalars, 0.0);
    cpu_backend().chunk_forward(pc, part, S0.data(), {want_o.data(), pr.strides(c.dv)}, nullptr);
    cpu_backend().chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), pr.strides(c.dk)},
                                    want_qdq.data(), nullptr);
  }

  Out run(const char* knob, const char* value) const {
    EnvGuard k(knob, value);
    Out r{dp.like_v(), dp.like_k(), DevBuf<float>(scalars)};
    r.qdq.poison();
    cuda_backend().chunk_forward(dp.p, part, S0d.p, r.o.mview(), nullptr);
    cuda_backend().chunk_backward_dq(dp.p, part, dp.dout.cview(), S0d.p, r.dq.mview(), r.qdq.p, nullptr);
    return r;
  }

  // b's o, dq and q.dq bit for bit a's (what: the setting that gave b)
  static void expect_same_bits(const Out& a, const Out& b, const std::string& what) {
    EXPECT_EQ(b.o.buf.download(), a.o.buf.download()) << "o: " << what;
    EXPECT_EQ(b.dq.buf.download(), a.dq.buf.download()) << "dq: " << what;
    EXPECT_EQ(float_bits(b.qdq.download()), float_bits(a.qdq.download())) << "q.dq: " << what;
  }

  void expect_matches_cpu(const Out& r, const std::string& tag) const {
    const double tol = tol_of(c.dtype);
    expect_rows(c, ("o_" + tag).c_str(), r.o, want_o, tol);
    expect_rows(c, ("dq_" + tag).c_str(), r.dq, want_dq, tol);
    expect_scalars(c, ("q.dq_" + tag).c_str(), r.qdq, want_qdq, tol);
  }

  OpCase c;
  Problem<double> pr;
  DeviceProblem dp;
  TokenRange part;
  int64_t scalars;
  std::vector<float> S0;
  DevBuf<float> S0d;
  std::vector<double> want_o, want_dq, want_qdq;
};

void run_fwd_split_case(const OpCase& c) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const FwdDqRun f(c);
  // the default kernels (twice) and LASP2_CUDA_FWD_KERNEL=old (D = 64: tc_scores instead
  // of tc_scores_split, session 13; the other tiles have one kernel): the same bits
  const FwdDqRun::Out a = f.run("LASP2_CUDA_FWD_KERNEL", ""), b = f.run("LASP2_CUDA_FWD_KERNEL", ""),
                      old = f.run("LASP2_CUDA_FWD_KERNEL", "old");
  FwdDqRun::expect_same_bits(a, old, "LASP2_CUDA_FWD_KERNEL=old differs");
  f.expect_matches_cpu(a, "split");
  FwdDqRun::expect_same_bits(a, b, "not reproducible");
}

std::vector<OpCase> fwd_split_cases() {
  const auto make = walking_edge_case;
  std::vector<OpCase> cases = {make("fs_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               make("fs_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128),
                               make("fs_bf16_none_dk128_dv40", ScalarType::kBFloat16, DecayMode::kNone, 128, 40),
                               make("fs_bf16_gate_dk96_dv72", ScalarType::kBFloat16, DecayMode::kGate, 96, 72),
                               make("fs_bf16_gate_D64_docs", ScalarType::kBFloat16, DecayMode::kGate, 64, 64),
                               make("fs_fp16_gate_D64", ScalarType::kFloat16, DecayMode::kGate, 64, 64),
                               make("fs_bf16_none_dk48_dv40", ScalarType::kBFloat16, DecayMode::kNone, 48, 40),
                               make("fs_fp16_fixed_D64", ScalarType::kFloat16, DecayMode::kFixed, 64, 64)};
  OpCase c = make("fs_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back(with_auto_segments(c));
  cases.push_back(as_padded_tbhd(make("fs_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128,
                                      128)));
  cases.push_back(as_padded_tbhd(make("fs_fp16_gate_D64_TBHD_pad8", ScalarType::kFloat16, DecayMode::kGate, 64, 64)));
  return cases;
}

TEST(CudaFwdKernel, ScoreSplitEdgeCasesMatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const OpCase& x : fwd_split_cases())
    if (selected_by_env(x)) run_fwd_split_case(x);
}

// ---- the output and dq passes' two copy paths (session 16) ----------------------------
// The default (variant 10 on sm_90, 6 until session 17) fetches the next chunk's qa, ka,
// va (and x) tiles by tensor-map copies issued by one thread (the copy engine writing the
// padded tile and zero-filling tokens past the part and columns past the dims);
// LASP2_CUDA_TILE_COPY=cp_async
// forces the cp.async kernel (variant 2, every thread copying). The arithmetic is the same,
// so o, dq and q.dq must be equal bit for bit, on the edge cases
// above (partial last chunk, 2- and 3-chunk segments whose ends stop the copies early,
// documents, fixed / no decay, dv = 40 and 72 where the maps' zero columns stand in for the
// missing dims, D = 64 and 128, padded [T, B, H, D] rows, parts that start mid-sequence) and,
// with several segments of many chunks (both stages' barriers through many phases), on
// T = 4109 (the backend's own segments). Both paths' outputs are also checked against the
// CPU backend (float64). Without an sm_90 device both runs take the cp.async kernel and the
// comparison holds trivially; the CPU comparisons still run.
// run_fwd_knob_case: case c with `knob` unset (the default) and set to `value`: o, dq and
// q.dq bit for bit, and each run against the CPU backend.
void run_fwd_knob_case(const OpCase& c, const char* knob, const char* value) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const FwdDqRun f(c);
  const FwdDqRun::Out a = f.run(knob, ""), v = f.run(knob, value);
  FwdDqRun::expect_same_bits(a, v, std::string(knob) + "=" + value + " differs");
  f.expect_matches_cpu(a, "default");
  f.expect_matches_cpu(v, value);
}

// The split cases and, with many chunks per segment at D = 128 (the measured shape's loop),
// fixed and gated decay.
std::vector<OpCase> fwd_copy_cases() {
  std::vector<OpCase> cases = fwd_split_cases();
  cases.push_back(whole_sequence_case("cs_bf16_fixed_D128_T4109_auto", DecayMode::kFixed, 128, 128, 4109, 0));
  cases.push_back(whole_sequence_case("cs_bf16_gate_D128_seg16", DecayMode::kGate, 128, 128, 4109, 16));
  return cases;
}

TEST(CudaFwdKernel, TmaCopySameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const OpCase& x : fwd_copy_cases())
    if (selected_by_env(x)) run_fwd_knob_case(x, "LASP2_CUDA_TILE_COPY", "cp_async");
}

// ---- the default tensor-map kernel against the previous one (session 17) ---------------
// The default on sm_90 (variant 10: each chunk's per-token weights as a 1-d bulk copy by
// the tile-copy thread onto the stage's mbarrier, not warp 0's cp.async, and at D = 128
// the output tile staged by stmatrix and written by tensor-map stores that clip it to the
// part's tokens and the view's dims) against LASP2_CUDA_FWD_KERNEL=v6 (variant 6, the
// default of session 16 and variant 10's fallback: cp.async weights, per-thread stores),
// bit for bit (the same values in the same places), and each against the CPU backend
// (float64). The cases: TmaCopySameBits' (gates with documents, fixed and no decay,
// D = 64 and 128, narrow dims, parts [37, 1000) whose last chunk is partial, 2- and
// 3-chunk segments, padded [T, B, H, D]) and, for the staging tiles' store / wait ring
// through many phases at each decay, 16-chunk segments of a part [37, 4109) with fixed and
// no decay and D = 64 with gates. Without an sm_90 device both settings run the cp.async
// kernel (the comparison holds trivially; the CPU comparisons still run). Since session 30
// the default output mode at D = 128 is variant 16 (below), so those cases compare it, not
// variant 10, against variant 6: the same bits either way.

// TmaCopySameBits' cases and 16-chunk segments of a part [37, 4109) (63 full chunks and one
// of 40) with fixed and no decay at D = 128 and gates at D = 64: the rings through many phases.
std::vector<OpCase> ring_cases() {
  std::vector<OpCase> cases = fwd_copy_cases();
  const struct {
    const char* name;
    DecayMode mode;
    int64_t d;
  } longs[] = {{"wb_bf16_fixed_D128_seg16_part37", DecayMode::kFixed, 128},
               {"wb_bf16_none_D128_seg16_part37", DecayMode::kNone, 128},
               {"wb_bf16_gate_D64_seg16_part37", DecayMode::kGate, 64}};
  for (const auto& l : longs) {
    OpCase c = whole_sequence_case(l.name, l.mode, l.d, l.d, 4109, 16);
    c.begin = 37;
    cases.push_back(c);
  }
  return cases;
}

TEST(CudaFwdKernel, StagedStoreSameBitsAsV6) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const OpCase& x : ring_cases())
    if (selected_by_env(x)) run_fwd_knob_case(x, "LASP2_CUDA_FWD_KERNEL", "v6");
}

// ---- the warp-specialized output kernel against variant 10 (session 30) -----------------
// The default output pass at D = 128 on sm_90 (variant 16: consumer warps that own their
// state rows, producer warps for P and the weights, a three-stage mbarrier ring, per-warp
// tensor-map stores of 16-column slices) against LASP2_CUDA_FWD_KERNEL=v10 (variant 10, the
// default before), bit for bit, and each against the CPU backend, on ring_cases() with a
// gated 16-chunk segment at D = 128 added. The dq mode and D = 64 run variant 10 under both
// settings (equal trivially there; the CPU comparisons still run).
TEST(CudaFwdKernel, WarpSpecializedSameBitsAsV10) {
  LASP2_SKIP_WITHOUT_CUDA();
  std::vector<OpCase> cases = ring_cases();
  OpCase g = whole_sequence_case("ws_bf16_gate_D128_seg16_part37", DecayMode::kGate, 128, 128, 4109, 16);
  g.begin = 37;
  cases.push_back(g);
  for (const OpCase& x : cases)
    if (selected_by_env(x)) run_fwd_knob_case(x, "LASP2_CUDA_FWD_KERNEL", "v10");
}

}  // namespace
}  // namespace lasp2::testing
