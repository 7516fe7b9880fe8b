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
#include <cstring>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <random>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "../problem.h"

// csrc/core/cuda/launch.h (not a public header): which dk/dv kernel ran last, 0 cp.async,
// 1 tensor-map copies, 2 those with the staged dk / dv stores (StagedStoreSameBits)
namespace lasp2::cuda {
int tc_dkdv_last_kernel();
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

struct OpCase {
  std::string name;
  ScalarType dtype = ScalarType::kBFloat16;
  DecayMode mode = DecayMode::kGate;
  int64_t dk = 64, dv = 64, T = 1000, begin = 37, end = 1000;
  std::vector<int64_t> docs;
  Layout layout;
  int seg_chunks = 2;  // 0: the backend's own choice
  int state_sub_chunks = -1;  // LASP2_CUDA_STATE_SUB_CHUNKS (split state walks); -1: unset
  int state_floor = -1;       // LASP2_CUDA_STATE_FLOOR (where state walks may end); -1: unset
  bool force_generic = false;
  int64_t B = 2, H = 2;
};

std::vector<double> random_vec(size_t n, uint32_t seed, double sd = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, sd);
  std::vector<double> v(n);
  for (auto& x : v) x = static_cast<double>(static_cast<float>(normal(rng)));
  return v;
}

// Problem rounded to the device precision; decay values rounded to float32.
Problem<double> make_problem(const OpCase& c, uint32_t seed) {
  ProblemSpec s;
  s.batch = c.B;
  s.seqlen = c.T;
  s.heads = c.H;
  s.dim_k = c.dk;
  s.dim_v = c.dv;
  s.mode = c.mode;
  s.chunk_size = 48;  // the CPU's chunking need not match the GPU's 64
  s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dk)));
  s.doc_starts = c.docs;
  Problem<double> pr(s, seed);
  for (auto* v : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *v) x = round_to(c.dtype, x);
  for (auto& x : pr.gate) x = static_cast<double>(static_cast<float>(x));
  for (auto& x : pr.log_decay) x = static_cast<double>(static_cast<float>(x));
  return pr;
}

void report(const OpCase& c, const char* op, double err, double tol) {
  std::printf("[cuda-op] %-34s %-12s rel_err=%.3e tol=%.1e %s\n", c.name.c_str(), op, err, tol,
              err < tol ? "ok" : "FAIL");
}

void expect_rows(const OpCase& c, const char* op, const DevTensor& t, const std::vector<double>& want,
                 double tol) {
  const auto r = t.download();
  const Compare cmp = compare_rows(r.v, r.written, want, t.B, t.T, t.H, t.D, c.begin, c.end);
  report(c, op, cmp.rel, tol);
  EXPECT_EQ(cmp.missing, 0) << op << ": part elements not written or not finite";
  EXPECT_EQ(cmp.clobbered, 0) << op << ": elements outside the part were written";
  EXPECT_EQ(r.pad_clobbered, 0) << op << ": padding between heads was written";
  EXPECT_LT(cmp.rel, tol) << op;
}

// [B, T, H] scalars (q.dq, dg): inside the part against the reference, outside untouched.
void expect_scalars(const OpCase& c, const char* op, const DevBuf<float>& d,
                    const std::vector<double>& want, double tol) {
  std::vector<float> got = d.download();
  std::vector<float> in_got;
  std::vector<double> in_want;
  int64_t clobbered = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const int64_t i = (b * c.T + t) * c.H + h;
        if (t >= c.begin && t < c.end) {
          in_got.push_back(got[i]);
          in_want.push_back(want[i]);
        } else if (!std::isnan(got[i])) {
          ++clobbered;
        }
      }
  int64_t bad = 0;
  const double err = rel_err_f32(in_got, in_want, &bad);
  report(c, op, err, tol);
  EXPECT_EQ(bad, 0) << op << ": not written / not finite";
  EXPECT_EQ(clobbered, 0) << op << ": written outside the part";
  EXPECT_LT(err, tol) << op;
}

void expect_state(const OpCase& c, const char* op, const DevBuf<float>& d, const std::vector<float>& want,
                  double tol) {
  int64_t bad = 0;
  const double err = rel_err_f32(d.download(), want, &bad);
  report(c, op, err, tol);
  EXPECT_EQ(bad, 0) << op;
  EXPECT_LT(err, tol) << op;
}

void run_case(const OpCase& c) {
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  EnvGuard sub("LASP2_CUDA_STATE_SUB_CHUNKS",
               c.state_sub_chunks >= 0 ? std::to_string(c.state_sub_chunks) : "");
  EnvGuard gen("LASP2_CUDA_FORCE_GENERIC", c.force_generic ? "1" : "");
  EnvGuard floor("LASP2_CUDA_STATE_FLOOR", c.state_floor >= 0 ? std::to_string(c.state_floor) : "");
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
  auto mode_name = [](DecayMode m) {
    return m == DecayMode::kNone ? "none" : m == DecayMode::kFixed ? "fixed" : "gate";
  };
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
        c.name = std::string(dtype_name(t)) + "_" + mode_name(m) + "_D" + std::to_string(d) +
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
    OpCase c;
    c.name = "bf16_fixed_D128_seg16";
    c.mode = DecayMode::kFixed;
    c.dk = c.dv = 128;
    c.T = 2200;
    c.begin = 0;
    c.end = 2200;
    c.seg_chunks = 16;
    cases.push_back(c);
  }
  {  // Split segment-state walks (StateArgs::sub_chunks; the default splits fixed decays
     // into pieces of 32 chunks where segments are longer): pieces of 3 chunks over
     // 16-chunk segments (every piece walks and is added), pieces of 2 with gates and
     // documents (pieces after a document start or an underflow are skipped), one chunk
     // per piece with a short last segment (pieces past its end), D = 64 (one column
     // block), dv = 64 at D = 128 (no second column block), no decay, and the default
     // pieces over 40-chunk segments (32 + 8 chunks; head 1's second piece underflows)
    OpCase c;
    c.name = "bf16_fixed_D128_seg16_sub3";
    c.mode = DecayMode::kFixed;
    c.dk = c.dv = 128;
    c.T = 2200;
    c.begin = 0;
    c.end = 2200;
    c.seg_chunks = 16;
    c.state_sub_chunks = 3;
    cases.push_back(c);
    c.name = "bf16_fixed_D128_T3000_seg40_default_split";
    c.T = 3000;
    c.end = 3000;
    c.seg_chunks = 40;
    c.state_sub_chunks = -1;
    cases.push_back(c);
    // the walks as before session 14 (to fp32 underflow; by default head 0's end at the
    // 2^-48 floor after about 17 chunks, head 1's after 9, both inside the segments)
    c.name = "bf16_fixed_D128_T3000_seg40_floor0";
    c.state_floor = 0;
    cases.push_back(c);
    c.state_floor = -1;
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
    OpCase c;
    c.name = "bf16_gate_D128_T4109_auto";
    c.dk = c.dv = 128;
    c.T = 4109;
    c.begin = 0;
    c.end = 4109;
    c.docs = {64, 1000, 4096};
    c.seg_chunks = 0;
    cases.push_back(c);
    c.name = "fp32_gate_D64_T4109_auto";
    c.dtype = ScalarType::kFloat32;
    c.dk = c.dv = 64;
    cases.push_back(c);
  }
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat32}) {
    for (int64_t T : {1, 77}) {
      OpCase c;
      c.dtype = t;
      c.T = T;
      c.begin = 0;
      c.end = T;
      c.seg_chunks = 0;
      c.name = std::string(dtype_name(t)) + "_gate_D64_T" + std::to_string(T);
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

void PrintTo(const OpCase& c, std::ostream* os) { *os << c.name; }

class CudaOps : public ::testing::TestWithParam<OpCase> {};

TEST_P(CudaOps, MatchCpuBackendFloat64) {
  LASP2_SKIP_WITHOUT_CUDA();
  run_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(All, CudaOps, ::testing::ValuesIn(op_cases()),
                         [](const ::testing::TestParamInfo<OpCase>& i) { return i.param.name; });

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

// ---- combines ---------------------------------------------------------------------------
TEST(CudaCombine, MatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int parts = 7;
  const int64_t bh = 3, elems = 300;
  std::vector<std::vector<float>> states(parts);
  std::vector<DevBuf<float>> dstates;
  for (int i = 0; i < parts; ++i) {
    auto v = random_vec(bh * elems, 100 + i);
    states[i].assign(v.begin(), v.end());
    dstates.push_back(to_device_f32(states[i]));
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-2.f, 0.f);
  std::vector<float> L(parts * bh);
  for (auto& x : L) x = u(rng);
  L[2 * bh + 1] = -INFINITY;  // a part that starts a document
  DevBuf<float> Ld = to_device_f32(L);
  std::vector<const float*> hp, dp;
  for (int i = 0; i < parts; ++i) {
    hp.push_back(states[i].data());
    dp.push_back(dstates[i].p);
  }
  for (int target = 0; target < parts; ++target) {
    for (bool suffix : {false, true}) {
      std::vector<float> want(bh * elems);
      DevBuf<float> got(bh * elems);
      got.poison();
      if (suffix) {
        cpu_backend().combine_suffix(hp, L.data(), target, bh, elems, want.data(), nullptr);
        cuda_backend().combine_suffix(dp, Ld.p, target, bh, elems, got.p, nullptr);
      } else {
        cpu_backend().combine_prefix(hp, L.data(), target, bh, elems, want.data(), nullptr);
        cuda_backend().combine_prefix(dp, Ld.p, target, bh, elems, got.p, nullptr);
      }
      EXPECT_LT(rel_err_f32(got.download(), want), 1e-6) << "target " << target << " suffix " << suffix;
    }
  }
  std::vector<float> want(bh);
  DevBuf<float> got(bh);
  cpu_backend().state_dot(states[0].data(), states[1].data(), L.data(), states[2].data(), bh, elems,
                          want.data(), nullptr);
  cuda_backend().state_dot(dstates[0].p, dstates[1].p, Ld.p, dstates[2].p, bh, elems, got.p, nullptr);
  EXPECT_LT(rel_err_f32(got.download(), want), 1e-6);

  // copy / fill_zero
  DevBuf<float> a = to_device_f32(states[3]), b(bh * elems);
  cuda_backend().copy(b.p, a.p, bh * elems, nullptr);
  EXPECT_EQ(b.download(), states[3]);
  cuda_backend().fill_zero(b.p, bh * elems, nullptr);
  for (float x : b.download()) EXPECT_EQ(x, 0.f);
}

TEST(CudaCombine, TooManyPartsIsAnError) {
  LASP2_SKIP_WITHOUT_CUDA();
  DevBuf<float> s(4), L(1000), out(4);
  std::vector<const float*> parts(300, s.p);
  EXPECT_THROW(cuda_backend().combine_prefix(parts, L.p, 1, 1, 4, out.p, nullptr), Error);
}

// ---- segment states kept from forward for the dq pass -----------------------------------
// chunk_forward_saving keeps the exit-weighted segment states of (k, v) before their scan;
// chunk_backward_dq_saved reads them instead of running the state pass. They do not
// depend on the entering state (forward from zero, dq with S0: what LASP-2's
// overlapped forward and its backward do), so dq and q.dq equal the recomputing pass
// bit for bit, also when read twice (the scan leaves them intact); altered states
// change dq, so the pass reads them; and a dq on the generic route (padded views)
// reading states of the tensor-core forward still matches the CPU.
std::vector<uint32_t> float_bits(const std::vector<float>& x) {
  std::vector<uint32_t> bits(x.size());
  if (!x.empty()) std::memcpy(bits.data(), x.data(), x.size() * sizeof(float));
  return bits;
}

void run_saved_states_case(const OpCase& c) {
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  EnvGuard sub("LASP2_CUDA_STATE_SUB_CHUNKS",
               c.state_sub_chunks >= 0 ? std::to_string(c.state_sub_chunks) : "");
  const Problem<double> pr = make_problem(c, 2000 + static_cast<uint32_t>(c.T));
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const KernelBackend& gpu = cuda_backend();
  const int64_t bh = pc.bh(), se = pc.state_elems(), scalars = c.B * c.T * c.H;
  const std::vector<double> s0 = random_vec(bh * se, 21, 2.0);
  const std::vector<float> S0(s0.begin(), s0.end());
  DevBuf<float> S0d = to_device_f32(S0);

  const int64_t n = gpu.saved_states_floats(pg, part);
  ASSERT_GT(n, 0) << "one segment: nothing to keep, the case tests nothing";
  ASSERT_EQ(n % (bh * se), 0);
  DevBuf<float> kept(n);
  kept.poison();
  DevTensor o = dp.like_v(), o_plain = dp.like_v();
  gpu.chunk_forward_saving(pg, part, nullptr, o.mview(), kept.p, nullptr);
  gpu.chunk_forward(pg, part, nullptr, o_plain.mview(), nullptr);
  EXPECT_EQ(o.buf.download(), o_plain.buf.download()) << c.name << ": keeping changed o";
  const std::vector<float> kept_host = kept.download();
  for (float x : kept_host) ASSERT_TRUE(std::isfinite(x)) << c.name << ": kept states not all written";

  auto dq_of = [&](const float* saved, const KernelBackend& be, DevTensor& dq, DevBuf<float>& qdq) {
    qdq.poison();
    be.chunk_backward_dq_saved(pg, part, dp.dout.cview(), S0d.p, dq.mview(), qdq.p, saved, nullptr);
  };
  DevTensor dq_re = dp.like_k(), dq_a = dp.like_k(), dq_b = dp.like_k(), dq_bad = dp.like_k();
  DevBuf<float> qdq_re(scalars), qdq_a(scalars), qdq_b(scalars), qdq_bad(scalars);
  dq_of(nullptr, gpu, dq_re, qdq_re);
  dq_of(kept.p, gpu, dq_a, qdq_a);
  dq_of(kept.p, gpu, dq_b, qdq_b);
  EXPECT_EQ(dq_a.buf.download(), dq_re.buf.download()) << c.name << ": dq from kept states";
  // bit patterns: q.dq is written only where dg needs it (gates), elsewhere both keep
  // their NaN poison, which == would call unequal
  EXPECT_EQ(float_bits(qdq_a.download()), float_bits(qdq_re.download())) << c.name << ": q.dq from kept states";
  EXPECT_EQ(dq_b.buf.download(), dq_re.buf.download()) << c.name << ": second read";
  EXPECT_EQ(kept.download(), kept_host) << c.name << ": the dq pass changed the kept states";

  std::vector<float> altered = kept_host;
  for (float& x : altered) x = 0.5f * x + 1.f;
  kept.upload(altered);
  dq_of(kept.p, gpu, dq_bad, qdq_bad);
  EXPECT_NE(dq_bad.buf.download(), dq_re.buf.download()) << c.name << ": altered kept states left dq unchanged";
  kept.upload(kept_host);

  // the CPU reference, then dq on padded views (generic route) with the kept states
  std::vector<double> want_dq = pr.zeros_like_k(), want_qdq(scalars, 0.0);
  cpu_backend().chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), pr.strides(c.dk)},
                                  want_qdq.data(), nullptr);
  expect_rows(c, "dq_saved", dq_a, want_dq, tol_of(c.dtype));
  DeviceProblem padded(pr, c.dtype, Layout{true, 3});
  DevTensor dq_pad = padded.like_k();
  DevBuf<float> qdq_pad(scalars);
  qdq_pad.poison();
  gpu.chunk_backward_dq_saved(padded.p, part, padded.dout.cview(), S0d.p, dq_pad.mview(), qdq_pad.p, kept.p,
                              nullptr);
  expect_rows(c, "dq_saved_pad3", dq_pad, want_dq, tol_of(c.dtype));
  expect_scalars(c, "q.dq_saved_pad3", qdq_pad, want_qdq, tol_of(c.dtype));
  EXPECT_EQ(cpu_backend().saved_states_floats(pc, part), 0) << "the CPU backend keeps nothing";
}

TEST(CudaSavedStates, DqFromForwardStatesEqualsRecompute) {
  LASP2_SKIP_WITHOUT_CUDA();
  OpCase c;  // part [37, 1000), 2-chunk segments, documents at chunk and segment edges
  c.docs = {101, 293, 294, 600, 999};
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat16, ScalarType::kFloat32})
    for (DecayMode m : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate}) {
      c.dtype = t;
      c.mode = m;
      c.dk = c.dv = t == ScalarType::kFloat16 ? 64 : 128;
      c.name = std::string("saved_") + dtype_name(t) + "_" + std::to_string(static_cast<int>(m)) + "_D" +
               std::to_string(c.dk);
      run_saved_states_case(c);
    }
  c = OpCase{};  // the backend's own segments at T = 4109
  c.name = "saved_bf16_gate_D128_T4109_auto";
  c.dk = c.dv = 128;
  c.T = 4109;
  c.begin = 0;
  c.end = 4109;
  c.seg_chunks = 0;
  run_saved_states_case(c);
  c.name = "saved_bf16_fixed_D128_seg16_sub3";  // the kept states from split walks
  c.mode = DecayMode::kFixed;
  c.docs = {};
  c.T = c.end = 2200;
  c.seg_chunks = 16;
  c.state_sub_chunks = 3;
  run_saved_states_case(c);
}

// ---- the dk/dv kernel's 32-row warps at tile D = 128 (tc_dkdv.cu RM = 2) ----------------
// Edge cases of its row tiles against the CPU backend in float64, run twice (bitwise
// reproducible): the tile's full width and forced 2-chunk segments with documents, a
// partial last chunk, dims below the tile (dk = 72: a warp whose second m16 tile lies
// past dk; dv = 40 and 64: warps with no dv row), fixed and no decay, fp16, the backend's
// own segments at T = 4109 and a [T, B, H, D] view with padded heads. q.dq is random (the
// pass only reads it). On an H200 (session 12) these cases also gave dk, dv and dg equal
// bit for bit to the 16-row-warp kernel of sessions 4-11, which was then removed.
// cp_async_too: also run with LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernel, the
// fallback of the default tensor-map copies, session 16), whose dk, dv and dg must equal
// the default's bit for bit and, like it, the CPU's.
// One dk/dv pass problem (tests below): the inputs on the device, the CPU backend's
// float64 dk, dv and dg for them, and run(), the CUDA backend's pass under one knob
// setting. seed: the problem's (make_problem), vec_seed: the first of the three random
// vectors' (the entering dS state, the dg offsets, q.dq: random, the pass only reads it).
struct DkdvRun {
  struct Out {
    DevTensor dk, dv;
    DevBuf<float> dg;
    int kernel;  // tc_dkdv_last_kernel() after the launch
  };

  DkdvRun(const OpCase& c, uint32_t seed, uint64_t vec_seed)
      : c(c), pr(make_problem(c, seed + static_cast<uint32_t>(c.T))), dp(pr, c.dtype, c.layout),
        part{c.begin, c.end}, scalars(c.B * c.T * c.H) {
    const AttentionParams pc = pr.params();
    const std::vector<double> d0 = random_vec(pc.bh() * pc.state_elems(), vec_seed, 0.5),
                              off = random_vec(pc.bh(), vec_seed + 1, 1.0),
                              qdq = random_vec(scalars, vec_seed + 2, 1.0);
    D0.assign(d0.begin(), d0.end());
    dgoff.assign(off.begin(), off.end());
    const std::vector<float> qdqf(qdq.begin(), qdq.end());
    D0d = to_device_f32(D0);
    dgoffd = to_device_f32(dgoff);
    qdqd = to_device_f32(qdqf);
    want_dk = pr.zeros_like_k();
    want_dv = pr.zeros_like_v();
    want_dg.assign(scalars, 0.0);
    cpu_backend().chunk_backward_dkdv(pc, part, pr.dout_view(), D0.data(), {want_dk.data(), pr.strides(c.dk)},
                                      {want_dv.data(), pr.strides(c.dv)}, qdq.data(), dgoff.data(),
                                      want_dg.data(), nullptr);
  }

  Out run(const char* knob, const char* value) const {
    EnvGuard k(knob, value);
    Out o{dp.like_k(), dp.like_v(), DevBuf<float>(scalars), -1};
    o.dg.poison();  // dk, dv come poisoned: elements the stores miss fail expect_rows
    cuda_backend().chunk_backward_dkdv(dp.p, part, dp.dout.cview(), D0d.p, o.dk.mview(), o.dv.mview(), qdqd.p,
                                       dgoffd.p, o.dg.p, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "dkdv");
    o.kernel = lasp2::cuda::tc_dkdv_last_kernel();
    return o;
  }

  // b's dk, dv and dg bit for bit a's (what: the setting that gave b)
  static void expect_same_bits(const Out& a, const Out& b, const std::string& what) {
    EXPECT_EQ(b.dk.buf.download(), a.dk.buf.download()) << "dk: " << what;
    EXPECT_EQ(b.dv.buf.download(), a.dv.buf.download()) << "dv: " << what;
    EXPECT_EQ(float_bits(b.dg.download()), float_bits(a.dg.download())) << "dg: " << what;
  }

  void expect_matches_cpu(const Out& r, const std::string& tag) const {
    const double tol = tol_of(c.dtype);
    expect_rows(c, ("dk_" + tag).c_str(), r.dk, want_dk, tol);
    expect_rows(c, ("dv_" + tag).c_str(), r.dv, want_dv, tol);
    expect_scalars(c, ("dg_" + tag).c_str(), r.dg, want_dg, tol_dg(c.dtype, c.end - c.begin));
  }

  OpCase c;
  Problem<double> pr;
  DeviceProblem dp;
  TokenRange part;
  int64_t scalars;
  std::vector<float> D0, dgoff;
  DevBuf<float> D0d, dgoffd, qdqd;
  std::vector<double> want_dk, want_dv, want_dg;
};

void run_dkdv_rows_case(const OpCase& c, bool cp_async_too = false) {
  SCOPED_TRACE(c.name);
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  const DkdvRun r(c, 3000, 31);
  // the default copy path (tensor maps on sm_90), the knob explicitly unset
  const DkdvRun::Out a = r.run("LASP2_CUDA_TILE_COPY", ""), b = r.run("LASP2_CUDA_TILE_COPY", "");
  DkdvRun::expect_same_bits(a, b, "not reproducible");
  r.expect_matches_cpu(a, "rows32");
  if (cp_async_too) {
    const DkdvRun::Out o = r.run("LASP2_CUDA_TILE_COPY", "cp_async");
    DkdvRun::expect_same_bits(a, o, "LASP2_CUDA_TILE_COPY=cp_async differs");
    r.expect_matches_cpu(o, "rows32_cp_async");
  }
}

// The walking passes' edge cases (dk/dv rows of 32, the output / dq score split): part
// [37, 1000) of the default problem, so the last chunk is partial, with 2-chunk segments
// and documents (none with a fixed decay).
OpCase walking_edge_case(const char* name, ScalarType t, DecayMode m, int64_t dk, int64_t dv) {
  OpCase c;
  c.name = name;
  c.dtype = t;
  c.mode = m;
  c.dk = dk;
  c.dv = dv;
  c.docs = m == DecayMode::kFixed ? std::vector<int64_t>{} : std::vector<int64_t>{101, 293, 294, 600, 999};
  return c;
}
// The same over a whole T = 4109 with three documents and the backend's own segments.
OpCase with_auto_segments(OpCase c) {
  c.T = 4109;
  c.begin = 0;
  c.end = 4109;
  c.docs = {64, 1000, 4096};
  c.seg_chunks = 0;
  return c;
}

TEST(CudaDkdvKernel, Rows32EdgeCasesMatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  std::vector<OpCase> cases = {make("r32_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               make("r32_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128),
                               make("r32_bf16_none_dk72_dv40", ScalarType::kBFloat16, DecayMode::kNone, 72, 40),
                               make("r32_fp16_gate_dk128_dv64", ScalarType::kFloat16, DecayMode::kGate, 128, 64),
                               make("r32_bf16_gate_dk96_dv128", ScalarType::kBFloat16, DecayMode::kGate, 96, 128)};
  OpCase c = make("r32_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back(with_auto_segments(c));
  c = make("r32_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back(c);
  for (const OpCase& x : cases) run_dkdv_rows_case(x);
}

// tc_dkdv_kernel's two copy paths (session 16): the default (tensor-map copies on sm_90)
// against LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernel), bit for bit, and both
// against the CPU backend: tile widths 128 and 64, gates with documents, fixed decay, the
// partial last chunk of part [37, 1000), dims below the tile (zero-filled columns), a
// [T, B, H, D] view with padded heads (row stride not H * D), and the backend's own
// segments at T = 4109 (full chunks: the cp.async kernel's fast copy path). Without an
// sm_90 device both runs take the cp.async kernel and the comparison holds trivially; the
// CPU comparisons still run.
TEST(CudaDkdvKernel, TmaCopySameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  std::vector<OpCase> cases = {make("cv_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               make("cv_bf16_fixed_D128", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128),
                               make("cv_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128),
                               make("cv_bf16_gate_D64_docs", ScalarType::kBFloat16, DecayMode::kGate, 64, 64),
                               make("cv_bf16_fixed_D64", ScalarType::kBFloat16, DecayMode::kFixed, 64, 64),
                               make("cv_bf16_gate_dk96_dv72", ScalarType::kBFloat16, DecayMode::kGate, 96, 72)};
  OpCase c = make("cv_bf16_fixed_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128);
  cases.push_back(with_auto_segments(c));
  c = make("cv_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back(with_auto_segments(c));
  c = make("cv_bf16_gate_D64_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 64, 64);
  cases.push_back(with_auto_segments(c));
  c = make("cv_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back(c);
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const OpCase& x : cases)
    if (only == nullptr || x.name.find(only) != std::string::npos) run_dkdv_rows_case(x, true);
}

// ---- the dk/dv pass's staged tensor-map stores (tc_dkdv.cu kStore, session 17) ----------
// The default (each chunk's dk and dv tiles staged in shared memory by stmatrix.trans and
// written by one tensor-map store each, the copy engine clipping them to the part's tokens
// and the view's dims; D = 128 tiles only) against LASP2_CUDA_DKDV_STORE=direct (per-thread
// movmatrix + stores), bit for bit in dk, dv and dg (the same values, only how they reach
// memory differs), and against the CPU backend (float64). On an sm_90 device the test also
// checks which kernel ran: the staged one at tile D = 128 by default, the direct tensor-map
// kernel at D = 64 (no staged form there) and under the knob. The cases: parts [37, 1000)
// (the last chunk partial: the store must clip its rows; 2-chunk segments, so several stores
// in flight per block over the walk), gates with documents, fixed and no decay, fp16, dk != dv
// (96 / 72: both maps clip columns; 128 / 64 and 72 / 40: warps that stage no dv rows, their
// rows of the staging tile stale and outside the map), the backend's own segments at
// T = 4109 (full chunks, many chunks per block) and a [T, B, H, D] view with padded heads
// (row stride not H * D). Without an sm_90 device every run takes the cp.async kernel.
void run_dkdv_store_case(const OpCase& c, int tile_d) {
  SCOPED_TRACE(c.name);
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  EnvGuard copy("LASP2_CUDA_TILE_COPY", "");
  const DkdvRun r(c, 4000, 41);
  const DkdvRun::Out a = r.run("LASP2_CUDA_DKDV_STORE", "direct"), s = r.run("LASP2_CUDA_DKDV_STORE", "");
  int dev = 0, major = 0;
  cuda_ok(cudaGetDevice(&dev), "device");
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
  if (major == 9) {
    EXPECT_EQ(a.kernel, 1) << "LASP2_CUDA_DKDV_STORE=direct: not the tensor-map kernel";
    EXPECT_EQ(s.kernel, tile_d == 128 ? 2 : 1) << "default: unexpected kernel";
  }
  DkdvRun::expect_same_bits(a, s, "the staged stores differ from the direct ones");
  r.expect_matches_cpu(a, "direct");
  r.expect_matches_cpu(s, "staged");
}

TEST(CudaDkdvKernel, StagedStoreSameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  struct Case {
    OpCase c;
    int tile_d;
  };
  std::vector<Case> cases = {{make("st_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128), 128},
                             {make("st_bf16_fixed_D128", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128), 128},
                             {make("st_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128), 128},
                             {make("st_bf16_gate_dk96_dv72", ScalarType::kBFloat16, DecayMode::kGate, 96, 72), 128},
                             {make("st_fp16_gate_dk128_dv64", ScalarType::kFloat16, DecayMode::kGate, 128, 64), 128},
                             {make("st_bf16_none_dk72_dv40", ScalarType::kBFloat16, DecayMode::kNone, 72, 40), 128},
                             {make("st_bf16_gate_D64_docs", ScalarType::kBFloat16, DecayMode::kGate, 64, 64), 64}};
  OpCase c = make("st_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back({with_auto_segments(c), 128});
  c = make("st_bf16_fixed_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128);
  cases.push_back({with_auto_segments(c), 128});
  c = make("st_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back({c, 128});
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const Case& x : cases)
    if (only == nullptr || x.c.name.find(only) != std::string::npos) run_dkdv_store_case(x.c, x.tile_d);
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
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  EnvGuard sub("LASP2_CUDA_STATE_SUB_CHUNKS",
               c.state_sub_chunks >= 0 ? std::to_string(c.state_sub_chunks) : "");
  EnvGuard floor("LASP2_CUDA_STATE_FLOOR", c.state_floor >= 0 ? std::to_string(c.state_floor) : "");
  const Problem<double> pr = make_problem(c, 5000 + static_cast<uint32_t>(c.T));
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const int64_t bh = pc.bh(), se = pc.state_elems(), scalars = c.B * c.T * c.H;
  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const std::vector<float> S0 = f32(random_vec(bh * se, 51, 2.0)), D0 = f32(random_vec(bh * se, 52, 0.5)),
                           dgoff = f32(random_vec(bh, 53, 1.0));
  DevBuf<float> S0d = to_device_f32(S0), D0d = to_device_f32(D0), dgoffd = to_device_f32(dgoff);

  struct Out {
    DevBuf<float> st, L, dst;
    DevTensor o, dq, dk, dv;
    DevBuf<float> qdq, dg;
  };
  auto run = [&](const char* knob) {
    EnvGuard k("LASP2_CUDA_TILE_COPY", knob);
    Out r{DevBuf<float>(bh * se), DevBuf<float>(bh), DevBuf<float>(bh * se), dp.like_v(), dp.like_k(),
          dp.like_k(), dp.like_v(), DevBuf<float>(scalars), DevBuf<float>(scalars)};
    r.st.poison();
    r.L.poison();
    r.dst.poison();
    r.qdq.poison();
    r.dg.poison();
    const KernelBackend& gpu = cuda_backend();
    gpu.part_state(pg, part, r.st.p, r.L.p, nullptr);
    gpu.part_dstate(pg, part, dp.dout.cview(), r.dst.p, nullptr);
    gpu.chunk_forward(pg, part, S0d.p, r.o.mview(), nullptr);
    gpu.chunk_backward_dq(pg, part, dp.dout.cview(), S0d.p, r.dq.mview(), r.qdq.p, nullptr);
    gpu.chunk_backward_dkdv(pg, part, dp.dout.cview(), D0d.p, r.dk.mview(), r.dv.mview(), r.qdq.p, dgoffd.p,
                            r.dg.p, nullptr);
    return r;
  };
  const Out a = run(""), v = run("cp_async");  // the default (tma on sm_90), forced cp.async
  EXPECT_EQ(float_bits(v.st.download()), float_bits(a.st.download())) << "part_state differs";
  EXPECT_EQ(float_bits(v.L.download()), float_bits(a.L.download())) << "part_state's log decay differs";
  EXPECT_EQ(float_bits(v.dst.download()), float_bits(a.dst.download())) << "part_dstate differs";
  EXPECT_EQ(v.o.buf.download(), a.o.buf.download()) << "o differs";
  EXPECT_EQ(v.dq.buf.download(), a.dq.buf.download()) << "dq differs";
  EXPECT_EQ(float_bits(v.qdq.download()), float_bits(a.qdq.download())) << "q.dq differs";
  EXPECT_EQ(v.dk.buf.download(), a.dk.buf.download()) << "dk differs";
  EXPECT_EQ(v.dv.buf.download(), a.dv.buf.download()) << "dv differs";
  EXPECT_EQ(float_bits(v.dg.download()), float_bits(a.dg.download())) << "dg differs";

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

OpCase state_tma_case(const char* name, DecayMode m, int64_t dk, int64_t dv, int64_t T, int seg_chunks) {
  OpCase c;
  c.name = name;
  c.mode = m;
  c.dk = dk;
  c.dv = dv;
  c.T = c.end = T;
  c.begin = 0;
  c.seg_chunks = seg_chunks;
  return c;
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
  cases.push_back(state_tma_case("st_bf16_fixed_D128_seg40_floor", DecayMode::kFixed, 128, 128, 3000, 40));
  cases.push_back(state_tma_case("st_bf16_gate_D128_seg40_floor", DecayMode::kGate, 128, 128, 3000, 40));
  cases.push_back(state_tma_case("st_bf16_fixed_D64_seg40_floor", DecayMode::kFixed, 64, 64, 3000, 40));
  // split walks: pieces of 3 and 7 chunks; past the floor the later pieces walk no chunk
  OpCase c = state_tma_case("st_bf16_fixed_D128_seg16_sub3", DecayMode::kFixed, 128, 128, 2200, 16);
  c.state_sub_chunks = 3;
  cases.push_back(c);
  c = state_tma_case("st_bf16_fixed_dk128_dv64_seg40_sub7", DecayMode::kFixed, 128, 64, 3000, 40);
  c.state_sub_chunks = 7;
  cases.push_back(c);
  c = state_tma_case("st_bf16_fixed_D128_seg40_sub7_floor0", DecayMode::kFixed, 128, 128, 3000, 40);
  c.state_sub_chunks = 7;
  c.state_floor = 0;  // walks to fp32 underflow only
  cases.push_back(c);
  // documents through long segments (carry 0 at a document start), the backend's segments
  cases.push_back(with_auto_segments(edge("st_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate,
                                          128, 128)));
  c = state_tma_case("st_bf16_gate_D64_seg24_docs", DecayMode::kGate, 64, 64, 3000, 24);
  c.docs = {640, 1700, 1701, 2990};
  cases.push_back(c);
  c = edge("st_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back(c);
  c = state_tma_case("st_bf16_fixed_D128_TBHD_pad8_seg16", DecayMode::kFixed, 128, 128, 2200, 16);
  c.layout = {true, 8};
  cases.push_back(c);
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const OpCase& x : cases)
    if (only == nullptr || x.name.find(only) != std::string::npos) run_state_tma_case(x);
}

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
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
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
  // [T, B, H, D] with padded heads: the stores' row stride is not H * D
  c = make("fs_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back(c);
  c = make("fs_fp16_gate_D64_TBHD_pad8", ScalarType::kFloat16, DecayMode::kGate, 64, 64);
  c.layout = {true, 8};
  c.seg_chunks = 3;
  cases.push_back(c);
  return cases;
}

TEST(CudaFwdKernel, ScoreSplitEdgeCasesMatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  // LASP2_TEST_CASES=<substring>: only the matching cases (short sanitizer runs)
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const OpCase& x : fwd_split_cases())
    if (only == nullptr || x.name.find(only) != std::string::npos) run_fwd_split_case(x);
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
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
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
  OpCase c = with_auto_segments(walking_edge_case("cs_bf16_fixed_D128_T4109_auto", ScalarType::kBFloat16,
                                                  DecayMode::kFixed, 128, 128));
  c.docs = {};
  cases.push_back(c);
  c = walking_edge_case("cs_bf16_gate_D128_seg16", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  c.T = 4109;
  c.begin = 0;
  c.end = 4109;
  c.docs = {};
  c.seg_chunks = 16;
  cases.push_back(c);
  return cases;
}

TEST(CudaFwdKernel, TmaCopySameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const OpCase& x : fwd_copy_cases())
    if (only == nullptr || x.name.find(only) != std::string::npos)
      run_fwd_knob_case(x, "LASP2_CUDA_TILE_COPY", "cp_async");
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
// kernel (the comparison holds trivially; the CPU comparisons still run).

TEST(CudaFwdKernel, StagedStoreSameBitsAsV6) {
  LASP2_SKIP_WITHOUT_CUDA();
  std::vector<OpCase> cases = fwd_copy_cases();
  const struct {
    const char* name;
    DecayMode mode;
    int64_t d;
  } longs[] = {{"wb_bf16_fixed_D128_seg16_part37", DecayMode::kFixed, 128},
               {"wb_bf16_none_D128_seg16_part37", DecayMode::kNone, 128},
               {"wb_bf16_gate_D64_seg16_part37", DecayMode::kGate, 64}};
  for (const auto& l : longs) {
    OpCase c = walking_edge_case(l.name, ScalarType::kBFloat16, l.mode, l.d, l.d);
    c.T = 4109;
    c.begin = 37;  // 4072 tokens: 63 full chunks and one of 40
    c.end = 4109;
    c.docs = {};
    c.seg_chunks = 16;
    cases.push_back(c);
  }
  const char* only = std::getenv("LASP2_TEST_CASES");
  for (const OpCase& x : cases)
    if (only == nullptr || x.name.find(only) != std::string::npos)
      run_fwd_knob_case(x, "LASP2_CUDA_FWD_KERNEL", "v6");
}

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
