// The chunked KDA forward kernels (kda_chunk.h) against the token-recurrent kernels
// (the same backend with LASP2_DELTA_KDA_CHUNKED=0) and the CPU backend, call by call:
// forward (o over a part that starts and ends mid-chunk, with an entering state),
// part_summary (A, M and the head maps; A and M give the state leaving the part from
// any entering state, the final state) and entering_dstate (the entering state's
// gradient from the part's own outputs). bf16 / fp16, d = 64 and 128, rows and packed
// documents (starts inside chunks, on a chunk's first token, one-token documents),
// -inf log gates on some key dims and on all of them, and strong gates (down to -5 a
// dim and token). The recurrent kernels are held to the CPU backend by
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
#include "delta_rule/cuda/kda_chunk.h"
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

// Sets an environment variable for the scope.
class KdaEnv {
 public:
  KdaEnv(const char* name, const char* value) : name_(name) { setenv(name, value, 1); }
  ~KdaEnv() { unsetenv(name_); }
  KdaEnv(const KdaEnv&) = delete;
  KdaEnv& operator=(const KdaEnv&) = delete;

 private:
  const char* name_;
};

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
  DevTensor q(s.batch, s.seqlen, s.heads, s.dim_k, c.type, lay), k(s.batch, s.seqlen, s.heads, s.dim_k, c.type, lay),
      v(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay), dout(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay);
  dout.upload({pr.dout.begin(), pr.dout.end()});
  q.upload({pr.q.begin(), pr.q.end()});
  k.upload({pr.k.begin(), pr.k.end()});
  v.upload({pr.v.begin(), pr.v.end()});
  DevBuf<float> g = to_device_f32(pr.g), beta = to_device_f32(pr.beta);
  DevBuf<uint8_t> doc_start(pr.doc_start.size());
  DevBuf<int32_t> doc_id(pr.doc_id.size());
  doc_start.upload(pr.doc_start);
  doc_id.upload(pr.doc_id);
  DeltaParams dp = hp;
  dp.dtype = c.type;
  dp.gate_dtype = ScalarType::kFloat32;
  dp.q = q.cview();
  dp.k = k.cview();
  dp.v = v.cview();
  dp.g = g.p;
  dp.beta = beta.p;
  if (s.packed()) {
    dp.doc_start = doc_start.p;
    dp.doc_id = doc_id.p;
  }
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
    const KdaEnv off("LASP2_DELTA_KDA_CHUNKED", "0");
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
    [](const ::testing::TestParamInfo<KdaCase>& info) {
      const auto& c = info.param;
      const char* gates = c.gates == Gates::kMild ? "mild" : c.gates == Gates::kNegInf ? "neginf" : "strong";
      return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + (c.packed ? "_packed_" : "_rows_") + gates;
    });

// KDA at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16 on one device:
// part_summary, forward and entering_dstate with the chunked kernels and with the
// recurrent ones (printed), and the backward (the recurrent kernels either way). Inputs:
// repeated random patterns (fast to set up); the assertions check that o is finite and
// the two forwards agree.
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
    std::unique_ptr<KdaEnv> off;
    if (rec) off = std::make_unique<KdaEnv>("LASP2_DELTA_KDA_CHUNKED", "0");
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
  float bwd_ms = 0;
  cuda_ok(cudaEventRecord(e0), "record");
  be.backward(p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(), dv.mview(), dg.p, db.p, nullptr,
              nullptr);
  cuda_ok(cudaEventRecord(e1), "record");
  cuda_ok(cudaEventSynchronize(e1), "sync");
  cuda_ok(cudaEventElapsedTime(&bwd_ms, e0, e1), "elapsed");
  std::printf("[ timing ] KDA T=%lld H=16 D=128 bf16: chunked part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate %.2f ms; recurrent part_summary %.2f ms, forward %.2f ms, entering_dstate %.2f ms; "
              "backward (recurrent) %.2f ms\n",
              static_cast<long long>(T), ms[0][0], ms[0][1], ms[0][2], ms[1][0], ms[1][1], ms[1][2], bwd_ms);
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
}

}  // namespace
}  // namespace lasp2::testing
