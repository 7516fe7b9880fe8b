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
// with the recurrent kernels alone. Plus a timing case (DeltaCudaKdaTiming).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <string>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/delta_backend.h"
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
};

// The test name of a case, e.g. bf16_d128_packed_neginf.
std::string kda_case_name(const ::testing::TestParamInfo<KdaCase>& info) {
  const KdaCase& c = info.param;
  const char* gates = c.gates == Gates::kMild ? "mild" : c.gates == Gates::kNegInf ? "neginf" : "strong";
  return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + (c.packed ? "_packed_" : "_rows_") + gates;
}

// The problem: q, k, v rounded to `type` (k scaled to about unit norm, as KDA layers
// l2-normalize it), per-key gates per `gates`.
DeltaProblem<float> kda_problem(const KdaCase& c) {
  DeltaSpec s;
  s.gate_kind = GateKind::kPerKey;
  s.seqlen = 300;
  s.heads = 2;
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

struct KdaResult {
  std::vector<double> o;
  std::vector<char> o_written;
  std::vector<float> A, M, hA, hM, E;
};

class DeltaCudaKdaChunked : public ::testing::TestWithParam<KdaCase> {};

TEST_P(DeltaCudaKdaChunked, MatchesRecurrentAndCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const KdaCase c = GetParam();
  const DeltaProblem<float> pr = kda_problem(c);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const Layout lay{false, 0};
  const DeviceProblem dev(pr, c.type, lay);
  const DeltaParams& dp = dev.p;
  const DevTensor& dout = dev.dout;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{37, s.seqlen - 20};
  const int64_t bh = hp.bh(), se = hp.state_elems(), me = hp.map_elems();
  std::vector<float> entering(bh * se);
  {
    std::mt19937 rng(9);
    std::normal_distribution<float> normal(0.f, 0.3f);
    for (auto& x : entering) x = normal(rng);
  }
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
  const KdaResult got = run();
  KdaResult want;
  {
    const EnvGuard off("LASP2_DELTA_KDA_CHUNKED", "0");
    want = run();
  }
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

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaKdaChunked,
    ::testing::Values(KdaCase{ScalarType::kBFloat16, 128, false, Gates::kMild},
                      KdaCase{ScalarType::kBFloat16, 128, true, Gates::kNegInf},
                      KdaCase{ScalarType::kBFloat16, 64, true, Gates::kStrong},
                      KdaCase{ScalarType::kBFloat16, 64, false, Gates::kNegInf},
                      KdaCase{ScalarType::kFloat16, 64, false, Gates::kMild},
                      KdaCase{ScalarType::kFloat16, 64, true, Gates::kNegInf},
                      KdaCase{ScalarType::kFloat16, 128, true, Gates::kMild},
                      KdaCase{ScalarType::kFloat16, 128, false, Gates::kStrong}),
    kda_case_name);

// The chunked backward (kda_chunk_bwd.h) against the recurrent one
// (LASP2_DELTA_KDA_CHUNKED_BWD=0) and, without -inf gates, the CPU backend: dq, dk, dv
// (16-bit; written on the part's rows only), dg per key dim, dbeta and the entering
// state's gradient, with an entering state and a leaving-state gradient, on the cases
// above. Packed documents with document states take the recurrent backward (checked:
// the d_initial call equals the CPU backend's).
class DeltaCudaKdaBackward : public ::testing::TestWithParam<KdaCase> {};

struct KdaGrads {
  DevTensor::Readback dq, dk, dv;
  std::vector<float> dg, db, dE;
};

// The CUDA backend's backward of a case's problem over `part` from the entering state and
// the leaving-state gradient.
KdaGrads kda_device_backward(const DeltaProblem<float>& pr, const DeviceProblem& dev, ScalarType type, Layout lay,
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
  LASP2_SKIP_WITHOUT_CUDA();
  const KdaCase c = GetParam();
  const DeltaProblem<float> pr = kda_problem(c);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const Layout lay{false, 0};
  const DeviceProblem dev(pr, c.type, lay);
  const DeltaParams& dp = dev.p;
  const DevTensor& dout = dev.dout;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{37, s.seqlen - 20};
  const int64_t bh = hp.bh(), se = hp.state_elems();
  std::vector<float> entering(bh * se), leaving(bh * se);
  {
    std::mt19937 rng(11);
    std::normal_distribution<float> normal(0.f, 0.3f);
    for (auto& x : entering) x = normal(rng);
    for (auto& x : leaving) x = normal(rng);
  }
  const DevBuf<float> d_entering = to_device_f32(entering), d_leaving = to_device_f32(leaving);

  auto run = [&]() { return kda_device_backward(pr, dev, c.type, lay, part, d_entering, d_leaving); };
  const KdaGrads got = run();
  KdaGrads want;
  {
    const EnvGuard off("LASP2_DELTA_KDA_CHUNKED_BWD", "0");
    want = run();
  }
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

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaKdaBackward,
    ::testing::Values(KdaCase{ScalarType::kBFloat16, 128, false, Gates::kMild},
                      KdaCase{ScalarType::kBFloat16, 128, true, Gates::kNegInf},
                      KdaCase{ScalarType::kBFloat16, 128, true, Gates::kStrong},
                      KdaCase{ScalarType::kBFloat16, 64, true, Gates::kStrong},
                      KdaCase{ScalarType::kBFloat16, 64, false, Gates::kNegInf},
                      KdaCase{ScalarType::kFloat16, 64, false, Gates::kMild},
                      KdaCase{ScalarType::kFloat16, 64, true, Gates::kNegInf},
                      KdaCase{ScalarType::kFloat16, 128, true, Gates::kMild},
                      KdaCase{ScalarType::kFloat16, 128, false, Gates::kStrong}),
    kda_case_name);

// KDA at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16 on one device:
// part_summary, forward, entering_dstate and the backward with the chunked kernels and
// with the recurrent ones (printed). Inputs: repeated random patterns (fast to set up);
// the assertions check that o and dq are finite and the two forwards and backwards agree
// on the first tokens.
TEST(DeltaCudaKdaTiming, OneDevice) {
  LASP2_SKIP_WITHOUT_CUDA();
  const char* t_env = std::getenv("LASP2_DELTA_TIMING_T");
  const int64_t T = t_env != nullptr && *t_env != '\0' ? std::atoll(t_env) : 65536, H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{}), o(1, T, H, D, type, Layout{}), o_rec(1, T, H, D, type, Layout{}),
      dq(1, T, H, D, type, Layout{}), dk(1, T, H, D, type, Layout{}), dv(1, T, H, D, type, Layout{});
  std::mt19937 rng(3);
  const size_t pattern = size_t{1} << 20;
  {
    std::normal_distribution<double> normal(0.0, 1.0);
    for (DevTensor* t : {&q, &k, &v, &dout}) {
      std::vector<unsigned char> host(2 * pattern);
      for (size_t i = 0; i < pattern; ++i) encode(type, normal(rng) * (t == &k ? 0.09 : 1.0), &host[2 * i]);
      for (size_t at = 0; at < t->elems; at += pattern)
        cuda_ok(cudaMemcpy(t->buf.p + 2 * at, host.data(), 2 * std::min(pattern, t->elems - at), cudaMemcpyHostToDevice),
                "upload");
    }
  }
  // per-key log gates in log [0.9, 1), betas in [0.1, 0.9)
  DevBuf<float> g(T * H * D), beta(T * H);
  {
    std::uniform_real_distribution<float> u(0.f, 1.f);
    std::vector<float> gh(pattern), bh(T * H);
    for (auto& e : gh) e = std::log(0.9f + 0.1f * u(rng));
    for (auto& e : bh) e = 0.1f + 0.8f * u(rng);
    for (size_t at = 0; at < g.n; at += pattern)
      cuda_ok(cudaMemcpy(g.p + at, gh.data(), 4 * std::min(pattern, g.n - at), cudaMemcpyHostToDevice), "upload");
    beta.upload(bh);
  }
  DeltaParams p;
  p.batch = 1;
  p.seqlen = T;
  p.heads = H;
  p.dim_k = p.dim_v = D;
  p.dtype = type;
  p.gate_kind = GateKind::kPerKey;
  p.q = q.cview();
  p.k = k.cview();
  p.v = v.cview();
  p.g = g.p;
  p.g_stride = {T * H * D, H * D, D};
  p.beta = beta.p;
  p.beta_stride = {T * H, H, 1};
  p.scale = 1.0 / std::sqrt(double(D));
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  DevBuf<float> A(H * D * D), M(H * D * D), hA(H * D * D), hM(H * D * D), dg(T * H * D), db(T * H);
  const TokenRange all{0, T};
  cudaEvent_t e0, e1, e2;
  for (auto* e : {&e0, &e1, &e2}) cuda_ok(cudaEventCreate(e), "event");
  float ms[2][3] = {};  // [recurrent][summary, forward, entering_dstate]
  DevBuf<float> dE(H * D * D);
  cudaEvent_t e3;
  cuda_ok(cudaEventCreate(&e3), "event");
  for (int rec = 0; rec < 2; ++rec) {
    std::unique_ptr<EnvGuard> off;
    if (rec) off = std::make_unique<EnvGuard>("LASP2_DELTA_KDA_CHUNKED", "0");
    for (int rep = 0; rep < 2; ++rep) {  // the second is timed
      cuda_ok(cudaEventRecord(e0), "record");
      be.part_summary(p, all, {}, A.p, M.p, hA.p, hM.p, nullptr);
      cuda_ok(cudaEventRecord(e1), "record");
      be.forward(p, all, nullptr, {}, rec ? o_rec.mview() : o.mview(), nullptr);
      cuda_ok(cudaEventRecord(e2), "record");
      be.entering_dstate(p, all, dout.cview(), dE.p, nullptr);
      cuda_ok(cudaEventRecord(e3), "record");
      cuda_ok(cudaEventSynchronize(e3), "sync");
    }
    cuda_ok(cudaEventElapsedTime(&ms[rec][0], e0, e1), "elapsed");
    cuda_ok(cudaEventElapsedTime(&ms[rec][1], e1, e2), "elapsed");
    cuda_ok(cudaEventElapsedTime(&ms[rec][2], e2, e3), "elapsed");
  }
  // the backward: chunked (kda_chunk_bwd.h; timed on its second call) and recurrent
  // (LASP2_DELTA_KDA_CHUNKED_BWD=0); dq of both kept to compare below
  float bwd_ms[2] = {};
  DevTensor dq_rec(1, T, H, D, type, Layout{});
  for (int rec = 0; rec < 2; ++rec) {
    std::unique_ptr<EnvGuard> off;
    if (rec) off = std::make_unique<EnvGuard>("LASP2_DELTA_KDA_CHUNKED_BWD", "0");
    for (int rep = 0; rep < 2 - rec; ++rep) {
      cuda_ok(cudaEventRecord(e0), "record");
      be.backward(p, all, dout.cview(), nullptr, nullptr, {}, rec ? dq_rec.mview() : dq.mview(), dk.mview(),
                  dv.mview(), dg.p, db.p, nullptr, nullptr);
      cuda_ok(cudaEventRecord(e1), "record");
      cuda_ok(cudaEventSynchronize(e1), "sync");
    }
    cuda_ok(cudaEventElapsedTime(&bwd_ms[rec], e0, e1), "elapsed");
  }
  std::printf("[ timing ] KDA T=%lld H=16 D=128 bf16: chunked part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate %.2f ms, backward %.2f ms; recurrent part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate %.2f ms, backward %.2f ms\n",
              static_cast<long long>(T), ms[0][0], ms[0][1], ms[0][2], bwd_ms[0], ms[1][0], ms[1][1], ms[1][2],
              bwd_ms[1]);
  // per launch of the chunked forward (kda_chunk.h): prep, the state pass, the output
  {
    namespace gpu = delta::gpu;
    gpu::Problem kp;
    kp.batch = 1;
    kp.heads = static_cast<int>(H);
    kp.dk = kp.dv = static_cast<int>(D);
    kp.seqlen = kp.n = kp.seg_len = T;
    kp.elem = gpu::Elem::kBF16;
    kp.q = {q.buf.p, T * H * D, H * D, D};
    kp.k = {k.buf.p, T * H * D, H * D, D};
    kp.v = {v.buf.p, T * H * D, H * D, D};
    kp.g = g.p;
    kp.gsb = T * H * D;
    kp.gst = H * D;
    kp.gsh = D;
    kp.per_key = 1;
    kp.beta = beta.p;
    kp.bsb = T * H;
    kp.bst = H;
    kp.bsh = 1;
    kp.scale = static_cast<float>(p.scale);
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(kp);
    DevBuf<float> w(z.rows_half), u(z.rows_half), qg(z.rows_half), kd(z.rows_half), pm(z.p_half), eL(z.eL),
        vn(z.rows_half), st(H * gpu::chunk_count(kp) * D * D / 2);
    const gpu::KdaPrep prep{w.p, u.p, qg.p, kd.p, pm.p, eL.p};
    gpu::ChunkStatesOut so;
    so.v_new = vn.p;
    so.states = st.p;
    gpu::ForwardOut fo;
    fo.o = o.buf.p;
    fo.osb = T * H * D;
    fo.ost = H * D;
    fo.osh = D;
    float t[3] = {};
    for (int rep = 0; rep < 2; ++rep) {  // the second is timed
      cuda_ok(cudaEventRecord(e0), "record");
      gpu::launch_kda_prep(kp, prep, nullptr);
      cuda_ok(cudaEventRecord(e1), "record");
      gpu::launch_kda_states(kp, prep, so, nullptr);
      cuda_ok(cudaEventRecord(e2), "record");
      gpu::launch_kda_output(kp, prep, vn.p, st.p, fo, nullptr);
      cuda_ok(cudaEventRecord(e3), "record");
      cuda_ok(cudaEventSynchronize(e3), "sync");
    }
    cuda_ok(cudaEventElapsedTime(&t[0], e0, e1), "elapsed");
    cuda_ok(cudaEventElapsedTime(&t[1], e1, e2), "elapsed");
    cuda_ok(cudaEventElapsedTime(&t[2], e2, e3), "elapsed");
    std::printf("[ timing ] KDA chunked forward per launch: prep %.2f ms, states %.2f ms, output %.2f ms\n", t[0], t[1],
                t[2]);
    // per launch of the chunked backward (kda_chunk_bwd.h): prep with T, the state pass,
    // rprep + the reverse pass (launch_kda_rstates), the chunk gradients
    DevBuf<float> tt(z.p_half), rr(z.rows_half), dhb(H * gpu::chunk_count(kp) * D * D / 2), dgb(T * H * D),
        dbb(T * H);
    gpu::KdaPrep bp = prep;
    bp.t = tt.p;
    const gpu::View dov{dout.buf.p, T * H * D, H * D, D};
    DevTensor bq(1, T, H, D, type, Layout{}), bk(1, T, H, D, type, Layout{}), bv(1, T, H, D, type, Layout{});
    gpu::KdaBackwardArgs ba;
    ba.dout = dov;
    ba.v_new = vn.p;
    ba.states = st.p;
    ba.dh = dhb.p;
    ba.t = tt.p;
    ba.r = rr.p;
    ba.dq = bq.buf.p;
    ba.dk = bk.buf.p;
    ba.dv = bv.buf.p;
    ba.dqsb = ba.dksb = ba.dvsb = T * H * D;
    ba.dqst = ba.dkst = ba.dvst = H * D;
    ba.dqsh = ba.dksh = ba.dvsh = D;
    ba.dg = dgb.p;
    ba.dbeta = dbb.p;
    cudaEvent_t e4;
    cuda_ok(cudaEventCreate(&e4), "event");
    float tb[4] = {};
    for (int rep = 0; rep < 2; ++rep) {  // the second is timed
      cuda_ok(cudaEventRecord(e0), "record");
      gpu::launch_kda_prep(kp, bp, nullptr);
      cuda_ok(cudaEventRecord(e1), "record");
      gpu::launch_kda_states(kp, bp, so, nullptr);
      cuda_ok(cudaEventRecord(e2), "record");
      gpu::launch_kda_rstates(kp, bp, dov, rr.p, nullptr, dhb.p, nullptr, nullptr);
      cuda_ok(cudaEventRecord(e3), "record");
      gpu::launch_kda_backward(kp, ba, nullptr);
      cuda_ok(cudaEventRecord(e4), "record");
      cuda_ok(cudaEventSynchronize(e4), "sync");
    }
    cuda_ok(cudaEventElapsedTime(&tb[0], e0, e1), "elapsed");
    cuda_ok(cudaEventElapsedTime(&tb[1], e1, e2), "elapsed");
    cuda_ok(cudaEventElapsedTime(&tb[2], e2, e3), "elapsed");
    cuda_ok(cudaEventElapsedTime(&tb[3], e3, e4), "elapsed");
    std::printf("[ timing ] KDA chunked backward per launch: prep (with T) %.2f ms, states %.2f ms, rprep + rstates "
                "%.2f ms, chunk gradients %.2f ms\n",
                tb[0], tb[1], tb[2], tb[3]);
    cudaEventDestroy(e4);
    // the chunk gradients' dq, dk, dv over the first 256 tokens are finite and not all zero
    const int64_t nb = std::min<int64_t>(T, 256);
    for (auto [name, grad] : {std::pair{"dq", &bq}, std::pair{"dk", &bk}, std::pair{"dv", &bv}}) {
      DevTensor h0(1, nb, H, D, type, Layout{});
      cuda_ok(cudaMemcpy(h0.buf.p, grad->buf.p, 2 * nb * H * D, cudaMemcpyDeviceToDevice), "copy");
      const auto r0 = h0.download();
      double peak = 0;
      for (size_t i = 0; i < r0.v.size(); ++i) {
        ASSERT_TRUE(std::isfinite(r0.v[i])) << name << " not finite at " << i;
        peak = std::max(peak, static_cast<double>(std::abs(r0.v[i])));
      }
      EXPECT_GT(peak, 0.0) << name << " is all zero over the first tokens";
    }
  }
  for (auto* e : {&e0, &e1, &e2, &e3}) cudaEventDestroy(*e);
  // the first 256 tokens of both forwards
  const int64_t n = std::min<int64_t>(T, 256);
  DevTensor head(1, n, H, D, type, Layout{}), head_rec(1, n, H, D, type, Layout{});
  cuda_ok(cudaMemcpy(head.buf.p, o.buf.p, 2 * n * H * D, cudaMemcpyDeviceToDevice), "copy");
  cuda_ok(cudaMemcpy(head_rec.buf.p, o_rec.buf.p, 2 * n * H * D, cudaMemcpyDeviceToDevice), "copy");
  const auto a = head.download(), b = head_rec.download();
  double num = 0, den = 0;
  for (size_t i = 0; i < a.v.size(); ++i) {
    ASSERT_TRUE(std::isfinite(a.v[i])) << "o not finite at " << i;
    num = std::max(num, std::abs(a.v[i] - b.v[i]));
    den = std::max(den, std::abs(b.v[i]));
  }
  EXPECT_LT(num / std::max(den, 1e-3), 2e-2) << "chunked vs recurrent o (first tokens)";
  // dq of the two backwards over the first tokens
  DevTensor dqh(1, n, H, D, type, Layout{}), dqh_rec(1, n, H, D, type, Layout{});
  cuda_ok(cudaMemcpy(dqh.buf.p, dq.buf.p, 2 * n * H * D, cudaMemcpyDeviceToDevice), "copy");
  cuda_ok(cudaMemcpy(dqh_rec.buf.p, dq_rec.buf.p, 2 * n * H * D, cudaMemcpyDeviceToDevice), "copy");
  const auto c1 = dqh.download(), c2 = dqh_rec.download();
  num = den = 0;
  for (size_t i = 0; i < c1.v.size(); ++i) {
    ASSERT_TRUE(std::isfinite(c1.v[i])) << "dq not finite at " << i;
    num = std::max(num, std::abs(c1.v[i] - c2.v[i]));
    den = std::max(den, std::abs(c2.v[i]));
  }
  EXPECT_LT(num / std::max(den, 1e-3), 2e-2) << "chunked vs recurrent dq (first tokens)";
}

}  // namespace
}  // namespace lasp2::testing
