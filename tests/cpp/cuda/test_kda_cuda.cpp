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
// with the recurrent kernels alone. Plus a timing case (DeltaCudaKdaTiming), the state
// pass on tensor-map copies against the tile kernel (DeltaCudaKdaStateTma, its A/B
// DeltaCudaKdaStateTiming) and the chunk-gradient kernel's tensor-map form (tma, the
// default on sm_90) against the cp.async one (lean; DeltaCudaKdaBwdKernels, their A/B
// DeltaCudaKdaTiming.BwdKernels).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <memory>
#include <random>
#include <sstream>
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
    dev_ = std::make_unique<DeviceProblem>(pr, c.type, lay);
  }
  const DeviceProblem& dev() const { return *dev_; }

  const KdaCase c = GetParam();
  const DeltaProblem<float> pr = kda_problem(c);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const Layout lay{false, 0};
  const TokenRange part{37, s.seqlen - 20};
  const int64_t bh = hp.bh(), se = hp.state_elems();

 private:
  std::unique_ptr<DeviceProblem> dev_;
};

// `count` vectors of `floats` normal values (sd 0.3) from one generator seeded `seed`,
// one after another: entering states and leaving-state gradients.
std::vector<std::vector<float>> random_states(uint32_t seed, int count, int64_t floats) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<std::vector<float>> out(count, std::vector<float>(floats));
  for (auto& vec : out)
    for (auto& x : vec) x = normal(rng);
  return out;
}

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

// The number of elements of a and b (same size) whose bits differ.
template <typename E>
int64_t differing_words(const std::vector<E>& a, const std::vector<E>& b) {
  int64_t differ = 0;
  for (size_t e = 0; e < a.size(); ++e) differ += std::memcmp(&a[e], &b[e], sizeof(E)) != 0;
  return differ;
}

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

// Runs `steps` in order `reps` times on the default stream and returns each step's
// milliseconds in the last run (events recorded between the steps).
std::vector<float> time_steps(const std::vector<std::function<void()>>& steps, int reps = 2) {
  std::vector<cudaEvent_t> ev(steps.size() + 1);
  for (auto& e : ev) cuda_ok(cudaEventCreate(&e), "event");
  for (int rep = 0; rep < reps; ++rep) {
    cuda_ok(cudaEventRecord(ev[0]), "record");
    for (size_t i = 0; i < steps.size(); ++i) {
      steps[i]();
      cuda_ok(cudaEventRecord(ev[i + 1]), "record");
    }
    cuda_ok(cudaEventSynchronize(ev.back()), "sync");
  }
  std::vector<float> ms(steps.size());
  for (size_t i = 0; i < steps.size(); ++i) cuda_ok(cudaEventElapsedTime(&ms[i], ev[i], ev[i + 1]), "elapsed");
  for (auto& e : ev) cudaEventDestroy(e);
  return ms;
}

// The first n tokens of a [1, T, H, D] 16-bit tensor, read back.
DevTensor::Readback first_tokens(const DevTensor& t, int64_t n) {
  DevTensor head(1, n, t.H, t.D, t.type, Layout{});
  cuda_ok(cudaMemcpy(head.buf.p, t.buf.p, 2 * n * t.H * t.D, cudaMemcpyDeviceToDevice), "copy");
  return head.download();
}

int64_t count_nonfinite(const std::vector<double>& a) {
  return std::count_if(a.begin(), a.end(), [](double x) { return !std::isfinite(x); });
}

// max |a - b| / max(max |b|, 1e-3) (NaNs passed over)
double rel_max_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num = std::max(num, std::abs(a[i] - b[i]));
    den = std::max(den, std::abs(b[i]));
  }
  return num / std::max(den, 1e-3);
}

// Random [1, T, H, D] 16-bit token tensors from one generator: a 2^20-value normal
// pattern repeated (fast to set up at T = 64K), `small`'s scaled by 0.09.
void upload_timing_tokens(std::mt19937& rng, ScalarType type, std::initializer_list<DevTensor*> tensors,
                          const DevTensor* small) {
  const size_t pattern = size_t{1} << 20;
  std::normal_distribution<double> normal(0.0, 1.0);
  for (DevTensor* t : tensors) {
    std::vector<unsigned char> host(2 * pattern);
    for (size_t i = 0; i < pattern; ++i) encode(type, normal(rng) * (t == small ? 0.09 : 1.0), &host[2 * i]);
    for (size_t at = 0; at < t->elems; at += pattern)
      cuda_ok(cudaMemcpy(t->buf.p + 2 * at, host.data(), 2 * std::min(pattern, t->elems - at), cudaMemcpyHostToDevice),
              "upload");
  }
}
// Per-key log gates in log [0.9, 1) (a repeated pattern), betas in [0.1, 0.9).
void upload_timing_gates(std::mt19937& rng, DevBuf<float>& g, DevBuf<float>& beta) {
  const size_t pattern = size_t{1} << 20;
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> gh(pattern), bh(beta.n);
  for (auto& e : gh) e = std::log(0.9f + 0.1f * u(rng));
  for (auto& e : bh) e = 0.1f + 0.8f * u(rng);
  for (size_t at = 0; at < g.n; at += pattern)
    cuda_ok(cudaMemcpy(g.p + at, gh.data(), 4 * std::min(pattern, g.n - at), cudaMemcpyHostToDevice), "upload");
  beta.upload(bh);
}
// The sm_90 timing tests' set-up (BwdKernels, TmaAgainstTile): a knob's value or dflt
// when unset or empty, and the [1, T, 16, 128] bf16 inputs with T from LASP2_DELTA_TIMING_T
// (64K unless set): q, k, v, dout (upload_timing_tokens, k scaled) and per-key log gates g
// and betas (upload_timing_gates), from generator seed 3.
std::string env_or(const char* name, const char* dflt) {
  const char* e = std::getenv(name);
  return std::string(e != nullptr && *e != '\0' ? e : dflt);
}
struct TimingInputs {
  static constexpr int64_t H = 16, D = 128;
  static constexpr ScalarType type = ScalarType::kBFloat16;
  int64_t T;
  DevTensor q, k, v, dout;
  DevBuf<float> g, beta;
  TimingInputs()
      : T(std::atoll(env_or("LASP2_DELTA_TIMING_T", "65536").c_str())), q(1, T, H, D, type, Layout{}),
        k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}), dout(1, T, H, D, type, Layout{}),
        g(T * H * D), beta(T * H) {
    std::mt19937 rng(3);
    upload_timing_tokens(rng, type, {&q, &k, &v, &dout}, &k);
    upload_timing_gates(rng, g, beta);
  }
};

// The chunk kernels' problem over the whole of [1, T, H, D] bf16 q, k, v with per-key
// gates g [1, T, H, D] and betas [1, T, H], scale 1 / sqrt(D).
delta::gpu::Problem timing_problem(const DevTensor& q, const DevTensor& k, const DevTensor& v, const DevBuf<float>& g,
                                   const DevBuf<float>& beta) {
  namespace gpu = delta::gpu;
  const int64_t T = q.T, H = q.H, D = q.D;
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
  kp.scale = static_cast<float>(1.0 / std::sqrt(double(D)));
  return kp;
}

// The chunked backward's launches one by one on the timing problem (kda_chunk_bwd.h):
// prep with T, the state pass (v_new, the 16-bit states entering each chunk), rprep + the
// reverse pass (r, dh), then the chunk-gradient kernel into dq, dk, dv, dg, dbeta.
struct KdaBwdLaunches {
  KdaBwdLaunches(const DevTensor& q, const DevTensor& k, const DevTensor& v, const DevTensor& dout,
                 const DevBuf<float>& g, const DevBuf<float>& beta)
      : T(q.T), H(q.H), D(q.D), kp(timing_problem(q, k, v, g, beta)), z(delta::gpu::kda_prep_sizes(kp)),
        nck(delta::gpu::chunk_count(kp)), w(z.rows_half), u(z.rows_half), qg(z.rows_half), kd(z.rows_half),
        pm(z.p_half), eL(z.eL), tt(z.p_half), vn(z.rows_half), st(H * nck * D * D / 2), rr(z.rows_half),
        dh(H * nck * D * D / 2), dg(T * H * D), db(T * H), dq(1, T, H, D, q.type, Layout{}),
        dk(1, T, H, D, q.type, Layout{}), dv(1, T, H, D, q.type, Layout{}) {
    prep = {w.p, u.p, qg.p, kd.p, pm.p, eL.p};
    prep.t = tt.p;
    so.v_new = vn.p;
    so.states = st.p;
    dov = {dout.buf.p, T * H * D, H * D, D};
    ba.dout = dov;
    ba.v_new = vn.p;
    ba.states = st.p;
    ba.dh = dh.p;
    ba.t = tt.p;
    ba.r = rr.p;
    ba.dq = dq.buf.p;
    ba.dk = dk.buf.p;
    ba.dv = dv.buf.p;
    ba.dqsb = ba.dksb = ba.dvsb = T * H * D;
    ba.dqst = ba.dkst = ba.dvst = H * D;
    ba.dqsh = ba.dksh = ba.dvsh = D;
    ba.dg = dg.p;
    ba.dbeta = db.p;
  }
  void run_prep() const { delta::gpu::launch_kda_prep(kp, prep, nullptr); }
  void run_states() const { delta::gpu::launch_kda_states(kp, prep, so, nullptr); }
  void run_rstates() const { delta::gpu::launch_kda_rstates(kp, prep, dov, rr.p, nullptr, dh.p, nullptr, nullptr); }
  void run_grads() const { delta::gpu::launch_kda_backward(kp, ba, nullptr); }

  int64_t T, H, D;
  delta::gpu::Problem kp;
  delta::gpu::KdaPrepSizes z;
  int64_t nck;
  DevBuf<float> w, u, qg, kd, pm, eL, tt, vn, st, rr, dh, dg, db;
  DevTensor dq, dk, dv;
  delta::gpu::KdaPrep prep;
  delta::gpu::ChunkStatesOut so;
  delta::gpu::View dov;
  delta::gpu::KdaBackwardArgs ba;
};

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
  auto tensor = [&] { return DevTensor(1, T, H, D, type, Layout{}); };  // [1, T, H, D]
  DevTensor q = tensor(), k = tensor(), v = tensor(), dout = tensor(), o = tensor(), o_rec = tensor(), dq = tensor(),
            dk = tensor(), dv = tensor();
  std::mt19937 rng(3);
  upload_timing_tokens(rng, type, {&q, &k, &v, &dout}, &k);
  DevBuf<float> g(T * H * D), beta(T * H);
  upload_timing_gates(rng, g, beta);
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
  std::vector<float> ms[2];  // [recurrent][summary, forward, entering_dstate]
  DevBuf<float> dE(H * D * D);
  for (int rec = 0; rec < 2; ++rec) {
    std::unique_ptr<EnvGuard> off;
    if (rec) off = std::make_unique<EnvGuard>("LASP2_DELTA_KDA_CHUNKED", "0");
    ms[rec] = time_steps({[&] { be.part_summary(p, all, {}, A.p, M.p, hA.p, hM.p, nullptr); },
                          [&] { be.forward(p, all, nullptr, {}, rec ? o_rec.mview() : o.mview(), nullptr); },
                          [&] { be.entering_dstate(p, all, dout.cview(), dE.p, nullptr); }});
  }
  // the backward: chunked (kda_chunk_bwd.h; timed on its second call) and recurrent
  // (LASP2_DELTA_KDA_CHUNKED_BWD=0); dq of both kept to compare below
  float bwd_ms[2] = {};
  DevTensor dq_rec = tensor();
  for (int rec = 0; rec < 2; ++rec) {
    std::unique_ptr<EnvGuard> off;
    if (rec) off = std::make_unique<EnvGuard>("LASP2_DELTA_KDA_CHUNKED_BWD", "0");
    bwd_ms[rec] = time_steps({[&] {
                               be.backward(p, all, dout.cview(), nullptr, nullptr, {},
                                           rec ? dq_rec.mview() : dq.mview(), dk.mview(), dv.mview(), dg.p, db.p,
                                           nullptr, nullptr);
                             }},
                             2 - rec)[0];
  }
  std::printf("[ timing ] KDA T=%lld H=16 D=128 bf16: chunked part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate %.2f ms, backward %.2f ms; recurrent part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate %.2f ms, backward %.2f ms\n",
              static_cast<long long>(T), ms[0][0], ms[0][1], ms[0][2], bwd_ms[0], ms[1][0], ms[1][1], ms[1][2],
              bwd_ms[1]);
  // per launch of the chunked forward (kda_chunk.h): prep, the state pass, the output
  {
    namespace gpu = delta::gpu;
    const gpu::Problem kp = timing_problem(q, k, v, g, beta);
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
    const std::vector<float> t = time_steps({[&] { gpu::launch_kda_prep(kp, prep, nullptr); },
                                             [&] { gpu::launch_kda_states(kp, prep, so, nullptr); },
                                             [&] { gpu::launch_kda_output(kp, prep, vn.p, st.p, fo, nullptr); }});
    std::printf("[ timing ] KDA chunked forward per launch: prep %.2f ms, states %.2f ms, output %.2f ms\n", t[0], t[1],
                t[2]);
    // per launch of the chunked backward (kda_chunk_bwd.h): prep with T, the state pass,
    // rprep + the reverse pass (launch_kda_rstates), the chunk gradients
    const KdaBwdLaunches bl(q, k, v, dout, g, beta);
    const std::vector<float> tb = time_steps({[&] { bl.run_prep(); }, [&] { bl.run_states(); },
                                              [&] { bl.run_rstates(); }, [&] { bl.run_grads(); }});
    std::printf("[ timing ] KDA chunked backward per launch: prep (with T) %.2f ms, states %.2f ms, rprep + rstates "
                "%.2f ms, chunk gradients %.2f ms\n",
                tb[0], tb[1], tb[2], tb[3]);
    // the chunk gradients' dq, dk, dv over the first 256 tokens are finite and not all zero
    for (auto [name, grad] : {std::pair{"dq", &bl.dq}, std::pair{"dk", &bl.dk}, std::pair{"dv", &bl.dv}}) {
      const std::vector<double> head = first_tokens(*grad, std::min<int64_t>(T, 256)).v;
      ASSERT_EQ(count_nonfinite(head), 0) << name << " not finite";
      EXPECT_GT(delta::testing::max_abs(head), 0.0) << name << " is all zero over the first tokens";
    }
  }
  // the first 256 tokens of both forwards and both backwards' dq
  const int64_t n = std::min<int64_t>(T, 256);
  for (auto [name, got, rec] : {std::tuple{"o", &o, &o_rec}, std::tuple{"dq", &dq, &dq_rec}}) {
    const std::vector<double> a = first_tokens(*got, n).v, b = first_tokens(*rec, n).v;
    ASSERT_EQ(count_nonfinite(a), 0) << name << " not finite";
    EXPECT_LT(rel_max_diff(a, b), 2e-2) << "chunked vs recurrent " << name << " (first tokens)";
  }
}

// A/B of the chunk-gradient kernels (LASP2_DELTA_KDA_BWD_KERNEL: lean, tma) at
// T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16: the values named in
// LASP2_KDA_BWD_TIMING_VARIANTS (default three rounds of "lean tma", alternating),
// each the median of LASP2_KDA_BWD_TIMING_REPS (5) launches after one warm-up, on the
// inputs of one prep / state pass / reverse pass. Then every later variant's dq, dk, dv,
// dg, dbeta against the first's, bit for bit over the whole problem. Under ncu the two
// kernels' names tell them apart (kda_bwd_kernel, kda_bwd_kernel_tma).
TEST(DeltaCudaKdaTiming, BwdKernels) {
  LASP2_SKIP_WITHOUT_CUDA();
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "tensor-map copies run on sm_90 and later";
  TimingInputs in;
  const int64_t T = in.T;
  const int reps = std::max(1, std::atoi(env_or("LASP2_KDA_BWD_TIMING_REPS", "5").c_str()));
  DevTensor &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  DevBuf<float> &g = in.g, &beta = in.beta;
  KdaBwdLaunches bl(q, k, v, dout, g, beta);
  bl.run_prep();
  bl.run_states();
  bl.run_rstates();
  cudaEvent_t e0, e1;
  cuda_ok(cudaEventCreate(&e0), "event");
  cuda_ok(cudaEventCreate(&e1), "event");
  // every output, host side (16-bit dq, dk, dv as their bytes)
  auto outputs = [&] {
    std::vector<std::vector<float>> out;
    for (DevTensor* t : {&bl.dq, &bl.dk, &bl.dv}) {
      std::vector<float> words(t->elems / 2);
      cuda_ok(cudaMemcpy(words.data(), t->buf.p, 2 * t->elems, cudaMemcpyDeviceToHost), "download");
      out.push_back(std::move(words));
    }
    out.push_back(bl.dg.download());
    out.push_back(bl.db.download());
    return out;
  };
  std::vector<std::string> names;
  std::vector<std::vector<std::vector<float>>> outs;
  std::istringstream list(
      env_or("LASP2_KDA_BWD_TIMING_VARIANTS", "lean tma lean tma lean tma"));
  for (std::string name; list >> name;) {
    const EnvGuard scope("LASP2_DELTA_KDA_BWD_KERNEL", name);
    for (DevTensor* t : {&bl.dq, &bl.dk, &bl.dv}) t->buf.poison();
    for (DevBuf<float>* b : {&bl.dg, &bl.db}) b->poison();
    bl.run_grads();  // warm-up
    std::vector<float> ms(reps);
    for (float& m : ms) {
      cuda_ok(cudaEventRecord(e0), "record");
      bl.run_grads();
      cuda_ok(cudaEventRecord(e1), "record");
      cuda_ok(cudaEventSynchronize(e1), "sync");
      cuda_ok(cudaEventElapsedTime(&m, e0, e1), "elapsed");
    }
    std::sort(ms.begin(), ms.end());
    std::printf("[ timing ] KDA T=%lld H=16 D=128 bf16 chunk gradients, kernel %-8s: %.3f ms (median of %d)\n",
                static_cast<long long>(T), name.c_str(), ms[ms.size() / 2], reps);
    if (std::find(names.begin(), names.end(), name) == names.end()) {
      names.push_back(name);
      outs.push_back(outputs());
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  const char* what[5] = {"dq", "dk", "dv", "dg", "dbeta"};
  ASSERT_FALSE(outs.empty());
  int64_t finite = 0;
  for (float x : outs[0][3]) finite += std::isfinite(x) ? 1 : 0;
  EXPECT_EQ(finite, static_cast<int64_t>(outs[0][3].size())) << names[0] << " dg written and finite";
  for (size_t n = 1; n < outs.size(); ++n)
    for (int i = 0; i < 5; ++i)
      EXPECT_EQ(differing_words(outs[n][i], outs[0][i]), 0)
          << names[n] << " vs " << names[0] << " " << what[i] << ": of " << outs[0][i].size() << " words";
}

// A/B of KDA's state passes per launch (kda_chunk_tma.h: the forward pass, the part
// summary, rprep + the reverse pass) at T = 64K
// (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16: the kernels named in
// LASP2_KDA_STATE_TIMING_VARIANTS (LASP2_DELTA_KDA_STATE_KERNEL values; default two
// rounds of "tile tma", alternating), each launch timed alone, the median of
// LASP2_STATE_TIMING_REPS (5) after one warm-up. Then tma's outputs against the tile
// kernels': v_new, 16-bit states, leaving state, A, M, dh and entering gradient bit for
// bit.
TEST(DeltaCudaKdaStateTiming, TmaAgainstTile) {
  LASP2_SKIP_WITHOUT_CUDA();
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "the tma state pass runs on sm_90 and later";
  namespace gpu = delta::gpu;
  TimingInputs in;
  const int64_t T = in.T, H = in.H, D = in.D;
  const int reps = std::max(1, std::atoi(env_or("LASP2_STATE_TIMING_REPS", "5").c_str()));
  DevTensor &q = in.q, &k = in.k, &v = in.v, &dout = in.dout;
  DevBuf<float> &g = in.g, &beta = in.beta;
  const gpu::Problem kp = timing_problem(q, k, v, g, beta);
  const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(kp);
  const int64_t nck = gpu::chunk_count(kp), se = D * D;
  DevBuf<float> w(z.rows_half), u(z.rows_half), qg(z.rows_half), kd(z.rows_half), pm(z.p_half), eL(z.eL);
  const gpu::KdaPrep prep{w.p, u.p, qg.p, kd.p, pm.p, eL.p};
  gpu::launch_kda_prep(kp, prep, nullptr);
  const std::vector<std::vector<float>> edge = random_states(4, 2, H * se);
  const DevBuf<float> entering = to_device_f32(edge[0]), leaving_grad = to_device_f32(edge[1]);
  const gpu::View dov{dout.buf.p, T * H * D, H * D, D};
  struct Outs {
    DevBuf<float> vn, st, leaving, A, M, r, dh, dE;
  };
  auto make_outs = [&] {
    return Outs{DevBuf<float>(z.rows_half), DevBuf<float>(H * nck * se / 2), DevBuf<float>(H * se),
                DevBuf<float>(H * se),      DevBuf<float>(H * se),           DevBuf<float>(z.rows_half),
                DevBuf<float>(H * nck * se / 2), DevBuf<float>(H * se)};
  };
  // 0 the state pass, 1 the summary, 2 rprep + the reverse pass (launch_kda_rstates)
  auto launch = [&](Outs& o, int pass) {
    if (pass == 1) return gpu::launch_kda_summary(kp, prep, {o.A.p, o.M.p, nullptr, nullptr}, nullptr);
    if (pass == 2) return gpu::launch_kda_rstates(kp, prep, dov, o.r.p, leaving_grad.p, o.dh.p, o.dE.p, nullptr);
    gpu::ChunkStatesOut so;
    so.entering = entering.p;
    so.v_new = o.vn.p;
    so.states = o.st.p;
    so.leaving = o.leaving.p;
    gpu::launch_kda_states(kp, prep, so, nullptr);
  };
  cudaEvent_t e0, e1;
  cuda_ok(cudaEventCreate(&e0), "event");
  cuda_ok(cudaEventCreate(&e1), "event");
  auto median_ms = [&](const std::function<void()>& f) {
    f();  // warm-up
    std::vector<float> ms(reps);
    for (float& m : ms) {
      cuda_ok(cudaEventRecord(e0), "record");
      f();
      cuda_ok(cudaEventRecord(e1), "record");
      cuda_ok(cudaEventSynchronize(e1), "sync");
      cuda_ok(cudaEventElapsedTime(&m, e0, e1), "elapsed");
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  };
  {
    Outs o = make_outs();
    std::istringstream names(env_or("LASP2_KDA_STATE_TIMING_VARIANTS", "tile tma tile tma"));
    for (std::string name; names >> name;) {
      const EnvGuard scope("LASP2_DELTA_KDA_STATE_KERNEL", name);
      const float st_ms = median_ms([&] { launch(o, 0); });
      const float sum_ms = median_ms([&] { launch(o, 1); });
      const float rev_ms = median_ms([&] { launch(o, 2); });
      std::printf("[ timing ] KDA T=%lld H=16 D=128 bf16 state kernel %-8s: states %.3f ms, summary %.3f ms, "
                  "rprep + rstates %.3f ms (median of %d)\n",
                  static_cast<long long>(T), name.c_str(), st_ms, sum_ms, rev_ms, reps);
    }
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  // every output of a kernel, host side: v_new, states, leaving, A, M, dh, the entering
  // state's gradient
  auto outputs = [&](const char* name) {
    const EnvGuard scope("LASP2_DELTA_KDA_STATE_KERNEL", name);
    Outs o = make_outs();
    for (DevBuf<float>* b : {&o.vn, &o.st, &o.leaving, &o.A, &o.M, &o.dh, &o.dE}) b->poison();
    for (int pass = 0; pass < 3; ++pass) launch(o, pass);
    std::vector<std::vector<float>> out;
    for (DevBuf<float>* b : {&o.vn, &o.st, &o.leaving, &o.A, &o.M, &o.dh, &o.dE}) out.push_back(b->download());
    return out;
  };
  constexpr int kOut = 7;
  const char* what[kOut] = {"v_new", "16-bit states", "leaving", "A", "M", "dh", "entering gradient"};
  const auto tile = outputs("tile");
  for (int i : {2, 3, 4, 6}) {
    int64_t finite = 0;
    for (float x : tile[i]) finite += std::isfinite(x) ? 1 : 0;
    EXPECT_EQ(finite, static_cast<int64_t>(tile[i].size())) << "tile " << what[i] << " written and finite";
  }
  const auto tma = outputs("tma");
  for (int i = 0; i < kOut; ++i) {
    int64_t differ = 0;
    for (size_t e = 0; e < tile[i].size(); ++e) differ += std::memcmp(&tile[i][e], &tma[i][e], 4) != 0;
    EXPECT_EQ(differ, 0) << "tma vs tile " << what[i] << ": of " << tile[i].size() << " words";
  }
}

}  // namespace
}  // namespace lasp2::testing
