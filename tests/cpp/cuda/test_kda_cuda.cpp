// The chunked KDA forward kernels (kda_chunk.h) against the token-recurrent kernels
// (the same backend with LASP2_DELTA_KDA_CHUNKED=0) and the CPU backend, call by call:
// forward (o over a part that starts and ends mid-chunk, with an entering state),
// part_summary (A, M and the head maps; A and M give the state leaving the part from
// any entering state, the final state) and entering_dstate (the entering state's
// gradient from the part's own outputs). bf16 / fp16, d = 64 and 128, rows and packed
// documents (starts inside chunks, on a chunk's first token, one-token documents),
// -inf log gates on some key dims and on all of them, and strong gates (down to -5 a
// dim and token); and the chunked backward (kda_chunk_bwd.h, DeltaCudaKdaBackward): dq,
// dk, dv, dg, dbeta and the entering state's gradient. The recurrent kernels are held to the CPU backend by
// test_delta_cuda.cpp; the CPU chunk form takes no -inf gates, so those cases compare
// with the recurrent kernels alone. Plus the state pass on tensor-map copies against the
// tile kernel (DeltaCudaKdaStateTma) and the chunk-gradient kernel's tensor-map form (tma,
// the default on sm_90) against the cp.async one (lean; DeltaCudaKdaBwdKernels); their
// timings and A/Bs are in test_kda_timing.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/delta_backend.h"
#include "kda_test_util.h"
#include "lasp2/lasp2.h"

namespace lasp2::testing {
namespace {

using delta::DeltaKernelBackend;
using delta::DeltaParams;
using delta::DocStates;
using delta::GateKind;
using delta::testing::DeltaProblem;
using delta::testing::DeltaSpec;

enum class Gates { kMild, kNegInf, kStrong };

struct KdaCase {
  ScalarType type;
  int d;
  bool packed;
  Gates gates;
  int heads = 2;
};

// The test name of a case, e.g. bf16_d128_packed_neginf.
std::string kda_case_name(const ::testing::TestParamInfo<KdaCase>& info) {
  const KdaCase& c = info.param;
  const char* gates = c.gates == Gates::kMild ? "mild" : c.gates == Gates::kNegInf ? "neginf" : "strong";
  return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + (c.packed ? "_packed_" : "_rows_") + gates +
         (c.heads != 2 ? "_h" + std::to_string(c.heads) : "");
}

// The problem: q, k, v rounded to `type` (k scaled to about unit norm, as KDA layers
// l2-normalize it), per-key gates per `gates`.
DeltaProblem<float> kda_problem(const KdaCase& c) {
  DeltaSpec s;
  s.gate_kind = GateKind::kPerKey;
  s.seqlen = 300;
  s.heads = c.heads;
  s.dim_k = s.dim_v = c.d;
  s.chunk_size = 64;
  s.scale = 1.0 / std::sqrt(static_cast<double>(c.d));
  s.batch = c.packed ? 1 : 2;
  // the part's chunks begin at 37, 101, 165, 229
  if (c.packed) s.doc_starts = {5, 64, 65, 101, 130, 200, 201, 263};
  DeltaProblem<float> pr(s, 31);
  const double kscale = 2.0 / std::sqrt(static_cast<double>(c.d));
  for (auto& x : pr.k) x = static_cast<float>(x * kscale);
  for (auto* vec : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *vec) x = static_cast<float>(round_to(c.type, x));
  const int64_t rows = s.batch * s.seqlen * s.heads;
  if (c.gates == Gates::kStrong) {
    std::mt19937 rng(5);
    std::uniform_real_distribution<float> u(-5.f, 0.f);
    for (auto& g : pr.g) g = u(rng);
  } else if (c.gates == Gates::kNegInf) {
    // every third key dim forgotten inside a chunk, at the part's first token, at a
    // chunk's first token and the next; all dims at token 120
    for (int64_t row = 0; row < rows; ++row) {
      const int64_t t = (row / s.heads) % s.seqlen;
      for (int64_t i = 0; i < c.d; ++i) {
        const bool some = (t == 37 || t == 90 || t == 165 || t == 166 || t == 250) && i % 3 == 0;
        if (some || t == 120) pr.g[row * c.d + i] = -INFINITY;
      }
    }
  }
  return pr;
}

// The cases of both suites: bf16 / fp16, d = 64 and 128, rows and packed documents, each
// gate kind; the backward also takes bf16 d = 128 packed with strong gates.
std::vector<KdaCase> kda_cases(bool backward) {
  std::vector<KdaCase> cases = {KdaCase{ScalarType::kBFloat16, 128, false, Gates::kMild},
                                KdaCase{ScalarType::kBFloat16, 128, true, Gates::kNegInf},
                                KdaCase{ScalarType::kBFloat16, 64, true, Gates::kStrong},
                                KdaCase{ScalarType::kBFloat16, 64, false, Gates::kNegInf},
                                KdaCase{ScalarType::kFloat16, 64, false, Gates::kMild},
                                KdaCase{ScalarType::kFloat16, 64, true, Gates::kNegInf},
                                KdaCase{ScalarType::kFloat16, 128, true, Gates::kMild},
                                KdaCase{ScalarType::kFloat16, 128, false, Gates::kStrong}};
  if (backward) cases.push_back(KdaCase{ScalarType::kBFloat16, 128, true, Gates::kStrong});
  return cases;
}

// The fixture of both suites: the case's problem on the host and (after the device check)
// on the device, and the part they run, [37, 280): starting and ending inside chunks.
class KdaCaseTest : public ::testing::TestWithParam<KdaCase> {
 protected:
  void SetUp() override {
    LASP2_SKIP_WITHOUT_CUDA();
    dev_ = std::make_unique<DeltaDeviceProblem>(pr, c.type, lay);
  }
  const DeltaDeviceProblem& dev() const { return *dev_; }

  const KdaCase c = GetParam();
  const DeltaProblem<float> pr = kda_problem(c);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const Layout lay{false, 0};
  const TokenRange part{37, s.seqlen - 20};
  const int64_t bh = hp.bh(), se = hp.state_elems();

 private:
  std::unique_ptr<DeltaDeviceProblem> dev_;
};

struct KdaResult {
  std::vector<double> o;
  std::vector<char> o_written;
  std::vector<float> A, M, hA, hM, E;
};

class DeltaCudaKdaChunked : public KdaCaseTest {};

TEST_P(DeltaCudaKdaChunked, MatchesRecurrentAndCpu) {
  const DeltaParams& dp = dev().p;
  const DevTensor& dout = dev().dout;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const int64_t me = hp.map_elems();
  const std::vector<float> entering = random_states(9, 1, bh * se)[0];
  const DevBuf<float> d_entering = to_device_f32(entering);

  auto run = [&]() {
    KdaResult r;
    DevTensor og(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay);
    gpu.forward(dp, part, d_entering.p, DocStates{}, og.mview(), nullptr);
    auto ob = og.download();
    r.o = ob.v;
    r.o_written = ob.written;
    DevBuf<float> A(bh * me), M(bh * se), hA(bh * me), hM(bh * se);
    for (auto* b : {&A, &M, &hA, &hM}) b->poison();
    gpu.part_summary(dp, part, DocStates{}, A.p, M.p, hA.p, hM.p, nullptr);
    r.A = A.download();
    r.M = M.download();
    r.hA = hA.download();
    r.hM = hM.download();
    DevBuf<float> E(bh * se);
    E.poison();
    gpu.entering_dstate(dp, part, dout.cview(), E.p, nullptr);
    r.E = E.download();
    return r;
  };
  const KdaResult got = run(), want = with_env("LASP2_DELTA_KDA_CHUNKED", "0", run);
  // o in the input dtype; the maps are fp32 sums of products whose operands (T, w, kd,
  // v_new, the carried state) are rounded to the input dtype, as in the GDN chunk maps
  const double tol_io = 1e-2, tol_map = 5e-3;
  const Compare co = compare_rows(got.o, got.o_written, want.o, s.batch, s.seqlen, s.heads, s.dim_v, part.begin,
                                  part.end);
  EXPECT_LT(co.rel, tol_io) << "o vs recurrent";
  EXPECT_EQ(co.missing, 0) << "o";
  EXPECT_EQ(co.clobbered, 0) << "o";
  EXPECT_EQ(got.o_written, want.o_written) << "o written where the recurrent kernels write";
  EXPECT_LT(rel_err_f32(got.A, want.A), tol_map) << "A vs recurrent";
  EXPECT_LT(rel_err_f32(got.M, want.M), tol_map) << "M vs recurrent";
  EXPECT_LT(rel_err_f32(got.hA, want.hA), tol_map) << "head A vs recurrent";
  EXPECT_LT(rel_err_f32(got.hM, want.hM), tol_map) << "head M vs recurrent";
  EXPECT_LT(rel_err_f32(got.E, want.E), tol_map) << "entering dstate vs recurrent";
  // the state leaving the part from `entering`: A S_in + M
  auto leaving = [&](const KdaResult& r) {
    std::vector<float> out(bh * se);
    for (int64_t b = 0; b < bh; ++b)
      for (int64_t i = 0; i < s.dim_k; ++i)
        for (int64_t j = 0; j < s.dim_v; ++j) {
          double acc = r.M[b * se + i * s.dim_v + j];
          for (int64_t m = 0; m < s.dim_k; ++m)
            acc += double(r.A[b * me + i * s.dim_k + m]) * entering[b * se + m * s.dim_v + j];
          out[b * se + i * s.dim_v + j] = static_cast<float>(acc);
        }
    return out;
  };
  const std::vector<float> fin = leaving(got);
  EXPECT_LT(rel_err_f32(fin, leaving(want)), tol_map) << "final state vs recurrent";
  if (s.packed()) EXPECT_EQ(delta::testing::max_abs(got.A), 0.0) << "a part with a document start has A = 0 exactly";

  if (c.gates != Gates::kNegInf) {  // and the CPU backend (its chunk form takes finite gates)
    const DeltaKernelBackend& cpu = delta::delta_cpu_backend();
    std::vector<float> o(pr.v.size(), 0.f);
    cpu.forward(hp, part, entering.data(), DocStates{}, {o.data(), pr.strides(s.dim_v)}, nullptr);
    const Compare cc = compare_rows(got.o, got.o_written, o, s.batch, s.seqlen, s.heads, s.dim_v, part.begin,
                                    part.end);
    EXPECT_LT(cc.rel, tol_io) << "o vs CPU";
    std::vector<float> A(bh * me), M(bh * se), hA(bh * me), hM(bh * se);
    cpu.part_summary(hp, part, DocStates{}, A.data(), M.data(), hA.data(), hM.data(), nullptr);
    EXPECT_LT(rel_err_f32(got.A, A), tol_map) << "A vs CPU";
    EXPECT_LT(rel_err_f32(got.M, M), tol_map) << "M vs CPU";
    EXPECT_LT(rel_err_f32(got.hA, hA), tol_map) << "head A vs CPU";
    EXPECT_LT(rel_err_f32(got.hM, hM), tol_map) << "head M vs CPU";
    std::vector<float> E(bh * se);
    cpu.entering_dstate(hp, part, pr.dout_view(), E.data(), nullptr);
    EXPECT_LT(rel_err_f32(got.E, E), tol_map) << "entering dstate vs CPU";
  }
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCudaKdaChunked, ::testing::ValuesIn(kda_cases(false)), kda_case_name);

// The chunked backward (kda_chunk_bwd.h) against the recurrent one
// (LASP2_DELTA_KDA_CHUNKED_BWD=0) and, without -inf gates, the CPU backend: dq, dk, dv
// (16-bit; written on the part's rows only), dg per key dim, dbeta and the entering
// state's gradient, with an entering state and a leaving-state gradient, on the cases
// above. Packed documents with document states take the recurrent backward (checked:
// the d_initial call equals the CPU backend's).
class DeltaCudaKdaBackward : public KdaCaseTest {};

struct KdaGrads {
  DevTensor::Readback dq, dk, dv;
  std::vector<float> dg, db, dE;
};

// The CUDA backend's backward of a case's problem over `part` from the entering state and
// the leaving-state gradient.
KdaGrads kda_device_backward(const DeltaProblem<float>& pr, const DeltaDeviceProblem& dev, ScalarType type, Layout lay,
                             TokenRange part, const DevBuf<float>& entering, const DevBuf<float>& leaving) {
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const int64_t bh = hp.bh(), se = hp.state_elems();
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  KdaGrads r;
  DevTensor dq(s.batch, s.seqlen, s.heads, s.dim_k, type, lay), dk(s.batch, s.seqlen, s.heads, s.dim_k, type, lay),
      dv(s.batch, s.seqlen, s.heads, s.dim_v, type, lay);
  DevBuf<float> dg = to_device_f32(std::vector<float>(pr.g.size(), 0.f));
  DevBuf<float> db = to_device_f32(std::vector<float>(pr.beta.size(), 0.f));
  DevBuf<float> dE(bh * se);
  dE.poison();
  gpu.backward(dev.p, part, dev.dout.cview(), entering.p, leaving.p, DocStates{}, dq.mview(), dk.mview(), dv.mview(),
               dg.p, db.p, dE.p, nullptr);
  r.dq = dq.download();
  r.dk = dk.download();
  r.dv = dv.download();
  r.dg = dg.download();
  r.db = db.download();
  r.dE = dE.download();
  return r;
}

TEST_P(DeltaCudaKdaBackward, MatchesRecurrentAndCpu) {
  const DeltaParams& dp = dev().p;
  const DevTensor& dout = dev().dout;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const std::vector<std::vector<float>> edge = random_states(11, 2, bh * se);
  const std::vector<float>& entering = edge[0];
  const std::vector<float>& leaving = edge[1];
  const DevBuf<float> d_entering = to_device_f32(entering), d_leaving = to_device_f32(leaving);

  auto run = [&]() { return kda_device_backward(pr, dev(), c.type, lay, part, d_entering, d_leaving); };
  const KdaGrads got = run(), want = with_env("LASP2_DELTA_KDA_CHUNKED_BWD", "0", run);
  // as GDN's chunked backward: 16-bit outputs at 1e-2; dg, dbeta and the entering-state
  // gradient are fp32 sums of products of 16-bit operands (h, dh, T, v_new, dU, dB, the
  // scaled sub-chunk tiles): 1e-2 in bfloat16, 2e-3 in float16
  const double tol_io = 1e-2, tol_sum = c.type == ScalarType::kBFloat16 ? 1e-2 : 2e-3;
  for (auto [name, a, b, dim] : {std::tuple{"dq", &got.dq, &want.dq, s.dim_k}, {"dk", &got.dk, &want.dk, s.dim_k},
                                 {"dv", &got.dv, &want.dv, s.dim_v}}) {
    const Compare cmp = compare_rows(a->v, a->written, b->v, s.batch, s.seqlen, s.heads, dim, part.begin, part.end);
    EXPECT_LT(cmp.rel, tol_io) << name << " vs recurrent";
    EXPECT_EQ(cmp.missing, 0) << name;
    EXPECT_EQ(cmp.clobbered, 0) << name;
    EXPECT_EQ(a->written, b->written) << name << " written where the recurrent kernels write";
  }
  EXPECT_LT(rel_err_f32(got.dg, want.dg), tol_sum) << "dg vs recurrent";
  EXPECT_LT(rel_err_f32(got.db, want.db), tol_sum) << "dbeta vs recurrent";
  EXPECT_LT(rel_err_f32(got.dE, want.dE), tol_sum) << "d_entering vs recurrent";
  EXPECT_GT(delta::testing::max_abs(got.dg), 0.0) << "dg is not all zero";

  const DeltaKernelBackend& cpu = delta::delta_cpu_backend();
  if (c.gates != Gates::kNegInf) {
    std::vector<float> dq(pr.q.size(), 0.f), dk(pr.k.size(), 0.f), dv(pr.v.size(), 0.f), dg(pr.g.size(), 0.f),
        db(pr.beta.size(), 0.f), dE(bh * se);
    cpu.backward(hp, part, pr.dout_view(), entering.data(), leaving.data(), DocStates{},
                 {dq.data(), pr.strides(s.dim_k)}, {dk.data(), pr.strides(s.dim_k)}, {dv.data(), pr.strides(s.dim_v)},
                 dg.data(), db.data(), dE.data(), nullptr);
    for (auto [name, a, b, dim] : {std::tuple{"dq", &got.dq, &dq, s.dim_k}, {"dk", &got.dk, &dk, s.dim_k},
                                   {"dv", &got.dv, &dv, s.dim_v}}) {
      const Compare cmp = compare_rows(a->v, a->written, *b, s.batch, s.seqlen, s.heads, dim, part.begin, part.end);
      EXPECT_LT(cmp.rel, tol_io) << name << " vs CPU";
    }
    EXPECT_LT(rel_err_f32(got.dg, dg), tol_sum) << "dg vs CPU";
    EXPECT_LT(rel_err_f32(got.db, db), tol_sum) << "dbeta vs CPU";
    EXPECT_LT(rel_err_f32(got.dE, dE), tol_sum) << "d_entering vs CPU";
  }
  if (s.packed() && c.gates != Gates::kNegInf) {  // document states: the recurrent backward takes the call
    const int64_t D = s.num_docs() * s.heads * se;
    DevBuf<float> gdI = to_device_f32(std::vector<float>(D, 0.f));
    DevTensor dq(s.batch, s.seqlen, s.heads, s.dim_k, c.type, lay), dk(s.batch, s.seqlen, s.heads, s.dim_k, c.type, lay),
        dv(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay);
    DevBuf<float> dg(pr.g.size()), db(pr.beta.size()), dE(bh * se);
    DocStates ddoc;
    ddoc.d_initial = gdI.p;
    gpu.backward(dp, part, dout.cview(), d_entering.p, d_leaving.p, ddoc, dq.mview(), dk.mview(), dv.mview(), dg.p,
                 db.p, dE.p, nullptr);
    std::vector<float> dI(D, 0.f), hq(pr.q.size()), hk(pr.k.size()), hv(pr.v.size()), hg(pr.g.size()),
        hb(pr.beta.size()), hE(bh * se);
    DocStates hdoc;
    hdoc.d_initial = dI.data();
    cpu.backward(hp, part, pr.dout_view(), entering.data(), leaving.data(), hdoc, {hq.data(), pr.strides(s.dim_k)},
                 {hk.data(), pr.strides(s.dim_k)}, {hv.data(), pr.strides(s.dim_v)}, hg.data(), hb.data(), hE.data(),
                 nullptr);
    EXPECT_LT(rel_err_f32(gdI.download(), dI), 1e-3) << "d_initial vs CPU (recurrent backward)";
  }
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCudaKdaBackward, ::testing::ValuesIn(kda_cases(true)), kda_case_name);

// The chunk-gradient kernel with its tiles by tensor-map copies
// (LASP2_DELTA_KDA_BWD_KERNEL=tma, kda_bwd_kernel_tma; sm_90), and the default (unset:
// tma where it runs, so on sm_90 the same kernel through the automatic choice), against
// lean (LASP2_DELTA_KDA_BWD_KERNEL=lean: cp.async copies): the same tiles in the same places (rows past the part zero in all), the same
// operations on the same values, and dg and dbeta sum in slots of one lane each (no
// atomics), so dq, dk, dv (and where they are written), dg, dbeta and the entering
// state's gradient must be equal bit for bit. The backward's cases: bf16 / fp16, d = 64
// and 128, rows and packed documents, -inf and strong gates; the fixture's part [37, 280)
// starts and ends inside chunks (243 tokens).
class DeltaCudaKdaBwdKernels : public KdaCaseTest {};

TEST_P(DeltaCudaKdaBwdKernels, TmaEqualsLean) {
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "tensor-map copies run on sm_90 and later";
  const std::vector<std::vector<float>> edge = random_states(11, 2, bh * se);
  const DevBuf<float> d_entering = to_device_f32(edge[0]), d_leaving = to_device_f32(edge[1]);
  auto run = [&](const char* kernel) {
    const EnvGuard scope("LASP2_DELTA_KDA_BWD_KERNEL", kernel);
    return kda_device_backward(pr, dev(), c.type, lay, part, d_entering, d_leaving);
  };
  const KdaGrads want = run("lean");
  // not a comparison of zeros: the part's dq, dk, dg are not all zero
  EXPECT_GT(delta::testing::max_abs(want.dg), 0.0) << "dg";
  int64_t nonzero = 0;
  for (const auto* t : {&want.dq, &want.dk})
    for (size_t e = 0; e < t->v.size(); ++e) nonzero += t->written[e] && t->v[e] != 0.0;
  EXPECT_GT(nonzero, 0) << "dq, dk";
  for (const char* kernel : {"tma", ""}) {
    SCOPED_TRACE(*kernel ? kernel : "(default)");
    const KdaGrads got = run(kernel);
    for (auto [name, a, b] :
         {std::tuple{"dq", &got.dq, &want.dq}, {"dk", &got.dk, &want.dk}, {"dv", &got.dv, &want.dv}}) {
      ASSERT_EQ(a->v.size(), b->v.size()) << name;
      EXPECT_EQ(differing_words(a->v, b->v), 0) << kernel << " vs lean " << name << ": of " << a->v.size();
      EXPECT_EQ(a->written, b->written) << kernel << ": " << name << " written at the same places";
    }
    for (auto [name, a, b] : {std::tuple{"dg", &got.dg, &want.dg}, {"dbeta", &got.db, &want.db},
                              {"d_entering", &got.dE, &want.dE}}) {
      ASSERT_EQ(a->size(), b->size()) << name;
      EXPECT_EQ(differing_words(*a, *b), 0) << kernel << " vs lean " << name << ": of " << a->size();
    }
  }
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCudaKdaBwdKernels, ::testing::ValuesIn(kda_cases(true)), kda_case_name);

// KDA's state passes on tensor-map copies (kda_state_kernel_tma, kda_rev_state_kernel_tma;
// sm_90, d = 128; LASP2_DELTA_KDA_STATE_KERNEL) against the 4-warp tile kernels: "tma"
// runs the tile kernels' products in their order, so o, the forward's kept v_new and
// 16-bit chunk states, A, M, the head maps, entering_dstate and the whole backward (dq,
// dk, dv, dg, dbeta, the entering state's gradient; its state pass and reverse pass with
// dh) must be equal bit for bit (tma's epilogue loads and the state's decay come before
// the token product since the fifteenth round: the same operations on the same values).
// Cases: bf16 and fp16, rows and packed documents, -inf and strong gates, B x H = 2 or
// 4 (the four-buffer rings) and 18 or 17 (144 / 136 blocks: the two-buffer rings on a
// 132-SM H200); the fixture's part [37, 280) starts and ends mid-chunk, with an
// entering state.
class DeltaCudaKdaStateTma : public KdaCaseTest {};

TEST_P(DeltaCudaKdaStateTma, EqualsTileKernel) {
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "the tma state pass runs on sm_90 and later";
  const DeltaParams& dp = dev().p;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const int64_t me = hp.map_elems(), kept_n = gpu.forward_kept_floats(dp, part);
  ASSERT_GT(kept_n, 0) << "the chunked kernels take the part";
  const DevBuf<float> d_entering = to_device_f32(random_states(9, 1, bh * se)[0]);
  const DevBuf<float> d_leaving = to_device_f32(random_states(11, 1, bh * se)[0]);
  // o (its 16-bit values), kept, A, M, head A, head M, the entering state's gradient
  // (entering_dstate), the backward's dq, dk, dv, dg, dbeta and entering-state gradient
  auto run = [&](const char* kernel) {
    const EnvGuard scope("LASP2_DELTA_KDA_STATE_KERNEL", kernel);
    DevTensor og(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay);
    DevBuf<float> kept(kept_n), A(bh * me), M(bh * se), hA(bh * me), hM(bh * se);
    for (auto* b : {&kept, &A, &M, &hA, &hM}) b->poison();
    gpu.forward_keeping(dp, part, d_entering.p, DocStates{}, og.mview(), kept.p, nullptr);
    gpu.part_summary(dp, part, DocStates{}, A.p, M.p, hA.p, hM.p, nullptr);
    std::vector<float> o;  // 0 outside the part (poison, NaN, in the readback)
    for (double x : og.download().v) o.push_back(std::isfinite(x) ? static_cast<float>(x) : 0.f);
    std::vector<std::vector<float>> out = {o, kept.download()};
    for (auto* b : {&A, &M, &hA, &hM}) out.push_back(b->download());
    DevBuf<float> E(bh * se);
    E.poison();
    gpu.entering_dstate(dp, part, dev().dout.cview(), E.p, nullptr);
    out.push_back(E.download());
    const KdaGrads gr = kda_device_backward(pr, dev(), c.type, lay, part, d_entering, d_leaving);
    for (const auto* t : {&gr.dq, &gr.dk, &gr.dv}) {
      std::vector<float> f;  // 0 outside the part
      for (double x : t->v) f.push_back(std::isfinite(x) ? static_cast<float>(x) : 0.f);
      out.push_back(f);
    }
    for (const auto* v : {&gr.dg, &gr.db, &gr.dE}) out.push_back(*v);
    return out;
  };
  constexpr int kOut = 13;
  const char* names[kOut] = {"o",  "kept (v_new, chunk states)", "A",  "M",  "head A", "head M", "entering_dstate",
                             "dq", "dk", "dv", "dg", "dbeta", "backward d_entering"};
  const auto tile = run("tile");
  const auto tma = run("tma");
  ASSERT_EQ(tile.size(), static_cast<size_t>(kOut));
  for (int i = 0; i < kOut; ++i) {
    ASSERT_EQ(tile[i].size(), tma[i].size()) << names[i];
    int64_t differ = 0;
    for (size_t e = 0; e < tile[i].size(); ++e) differ += std::memcmp(&tile[i][e], &tma[i][e], 4) != 0;
    EXPECT_EQ(differ, 0) << "tma vs tile " << names[i] << ": of " << tile[i].size() << " words";
  }
  EXPECT_GT(delta::testing::max_abs(tile[0]), 0.0) << "o is not all zero";
  EXPECT_GT(delta::testing::max_abs(tile[3]), 0.0) << "M is not all zero";
  if (c.packed) {
    EXPECT_EQ(delta::testing::max_abs(tile[2]), 0.0) << "a part with a document start has A = 0 exactly";
  } else if (c.gates == Gates::kMild) {
    EXPECT_GT(delta::testing::max_abs(tile[2]), 0.0) << "A is not all zero";
  }
  EXPECT_GT(delta::testing::max_abs(tile[6]), 0.0) << "entering_dstate is not all zero";
  EXPECT_GT(delta::testing::max_abs(tile[10]), 0.0) << "dg is not all zero";
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCudaKdaStateTma,
                         ::testing::Values(KdaCase{ScalarType::kBFloat16, 128, false, Gates::kMild},
                                           KdaCase{ScalarType::kBFloat16, 128, true, Gates::kNegInf},
                                           KdaCase{ScalarType::kBFloat16, 128, false, Gates::kNegInf, 9},
                                           KdaCase{ScalarType::kFloat16, 128, true, Gates::kMild, 17},
                                           KdaCase{ScalarType::kFloat16, 128, false, Gates::kStrong}),
                         kda_case_name);

}  // namespace
}  // namespace lasp2::testing
