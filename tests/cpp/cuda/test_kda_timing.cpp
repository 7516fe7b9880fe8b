// KDA timings on one device at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16:
// the backend's calls with the chunked and the recurrent kernels (DeltaCudaKdaTiming), the
// chunk-gradient kernel's forms side by side (DeltaCudaKdaTiming.BwdKernels) and the state
// pass on tensor-map copies against the tile kernel (DeltaCudaKdaStateTiming); printed, the
// assertions check finite outputs and agreement between the forms.
#include <cuda_runtime.h>
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
#include <tuple>
#include <utility>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/delta_backend.h"
#include "kda_test_util.h"

namespace lasp2::testing {
namespace {

using delta::DeltaParams;
using delta::GateKind;

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
