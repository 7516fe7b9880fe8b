// The KDA chunk prep (launch_kda_prep, kda_chunk.h) on its own: every output (qg, kd,
// eL, P, T, w, u) of the 8-warp "levels" prep (kda_prep.cu, the default) and of the
// 4-warp one (LASP2_DELTA_KDA_PREP=old) against a float64 host evaluation of the
// formulas in kda_chunk.h, on a part that starts and ends mid-chunk, 2 batches x 3
// heads, d = 64 and 128, bf16 and fp16: mild, strong (down to -5) and -inf log gates
// (some dims, and every dim of one token), packed documents (starts inside chunks, on a
// chunk's first token, one-token documents) and head maps (head_end inside a chunk and
// on a chunk edge). Plus DeltaCudaKdaPrepTiming: the two preps and the chunked forward
// at T = 64K, H = 16, D = 128, bf16.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/delta_backend.h"
#include "lasp2/lasp2.h"

namespace lasp2::testing {
namespace {

namespace gpu = delta::gpu;

enum class PrepGates { kMild, kNegInf, kStrong };

struct PrepCase {
  ScalarType type;
  int d;
  PrepGates gates;
  bool docs;  // packed documents and head maps
};

std::string prep_case_name(const ::testing::TestParamInfo<PrepCase>& info) {
  const PrepCase& c = info.param;
  const char* g = c.gates == PrepGates::kMild ? "mild" : c.gates == PrepGates::kNegInf ? "neginf" : "strong";
  return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + "_" + g + (c.docs ? "_docs" : "");
}

constexpr int kB = 2, kH = 3, kT = 300, kBegin = 37, kN = 243, CH = 64;

// Host inputs ([B, T, H, D] rows; q, k, v already rounded to the case's dtype).
struct PrepInputs {
  std::vector<double> q, k, v, g, beta;
  std::vector<uint8_t> start;  // [B][T]
  std::vector<int> head_end;   // [B], part-relative; -1: none
};

PrepInputs prep_inputs(const PrepCase& c) {
  const int D = c.d;
  PrepInputs in;
  std::mt19937 rng(17 + D);
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t rows = static_cast<size_t>(kB) * kT * kH;
  in.q.resize(rows * D);
  in.k.resize(rows * D);
  in.v.resize(rows * D);
  in.g.resize(rows * D);
  in.beta.resize(rows);
  const double kscale = 2.0 / std::sqrt(static_cast<double>(D));
  for (auto& x : in.q) x = round_to(c.type, normal(rng));
  for (auto& x : in.k) x = round_to(c.type, normal(rng) * kscale);
  for (auto& x : in.v) x = round_to(c.type, normal(rng));
  std::uniform_real_distribution<double> u01(0.0, 1.0);
  for (auto& x : in.beta) x = 0.1 + 0.8 * u01(rng);
  const double lo = c.gates == PrepGates::kStrong ? -5.0 : -0.15;
  for (auto& x : in.g) x = static_cast<float>(lo * u01(rng));
  if (c.gates == PrepGates::kNegInf)
    for (size_t r = 0; r < rows; ++r) {
      const int t = static_cast<int>((r / kH) % kT);
      for (int i = 0; i < D; ++i) {
        const bool some = (t == 37 || t == 90 || t == 165 || t == 166 || t == 250) && i % 3 == 0;
        if (some || t == 120) in.g[r * D + i] = -INFINITY;
      }
    }
  in.start.assign(static_cast<size_t>(kB) * kT, 0);
  in.head_end.assign(kB, -1);
  if (c.docs) {  // chunks begin at 37, 101, 165, 229
    for (int t : {64, 65, 101, 130, 200, 201, 263}) in.start[t] = 1;
    for (int t : {40, 150, 229, 279}) in.start[kT + t] = 1;
    in.head_end = {130 - kBegin, 64};
  }
  return in;
}

// The float64 prep of kda_chunk.h, per (b, h, chunk); arrays as the kernels lay them out.
struct PrepRef {
  std::vector<double> w, u, qg, kd, p, t, eL;
};

PrepRef prep_reference(const PrepInputs& in, int D, double scale) {
  const int nck = (kN + CH - 1) / CH;
  const int64_t chunks = static_cast<int64_t>(kB) * kH * nck;
  PrepRef r;
  for (auto* v : {&r.w, &r.u, &r.qg, &r.kd}) v->assign(chunks * CH * D, 0.0);
  r.p.assign(chunks * CH * CH, 0.0);
  r.t.assign(chunks * CH * CH, 0.0);
  r.eL.assign(chunks * D, 0.0);
  std::vector<double> G(CH * D), L(CH * CH), Tm(CH * CH);
  std::vector<int> s(CH);
  std::vector<double> bt(CH);
  for (int b = 0; b < kB; ++b)
    for (int h = 0; h < kH; ++h)
      for (int c = 0; c < nck; ++c) {
        const int64_t ch = (static_cast<int64_t>(b) * kH + h) * nck + c;
        const int nvalid = std::min(CH, kN - c * CH);
        auto row = [&](int x) { return (static_cast<int64_t>(b) * kT + kBegin + c * CH + x) * kH + h; };
        auto at = [&](const std::vector<double>& v, int x, int i) { return x < nvalid ? v[row(x) * D + i] : 0.0; };
        int seg = 0;
        for (int x = 0; x < CH; ++x) {
          const bool live = x < nvalid && (in.head_end[b] < 0 || c * CH + x < in.head_end[b]);
          const bool st = live && in.start[b * kT + kBegin + c * CH + x] != 0;
          seg += st ? 1 : 0;
          s[x] = seg;
          bt[x] = live ? in.beta[row(x)] : 0.0;
          for (int i = 0; i < D; ++i) {
            const double prev = x > 0 ? G[(x - 1) * D + i] : 0.0;
            G[x * D + i] = prev + (live && !st ? std::max(in.g[row(x) * D + i], -40.0) : 0.0);
          }
        }
        const int sL = s[CH - 1];
        for (int x = 0; x < CH; ++x)
          for (int i = 0; i < D; ++i) {
            const int64_t o = (ch * CH + x) * D + i;
            r.qg[o] = s[x] == 0 ? scale * at(in.q, x, i) * std::exp(G[x * D + i]) : 0.0;
            r.kd[o] = s[x] == sL ? at(in.k, x, i) * std::exp(G[(CH - 1) * D + i] - G[x * D + i]) : 0.0;
          }
        for (int i = 0; i < D; ++i) r.eL[ch * D + i] = sL == 0 ? std::exp(G[(CH - 1) * D + i]) : 0.0;
        for (int x = 0; x < CH; ++x)
          for (int y = 0; y < CH; ++y) {
            double pk = 0, kk = 0;
            if (y <= x && s[x] == s[y])
              for (int i = 0; i < D; ++i) {
                const double e = std::exp(G[x * D + i] - G[y * D + i]);
                pk += at(in.q, x, i) * at(in.k, y, i) * e;
                kk += at(in.k, x, i) * at(in.k, y, i) * e;
              }
            r.p[(ch * CH + x) * CH + y] = scale * pk;
            L[x * CH + y] = y < x ? bt[x] * kk : 0.0;
          }
        for (int col = 0; col < CH; ++col)  // T = (I + L)^-1, by forward substitution
          for (int x = 0; x < CH; ++x) {
            double acc = x == col ? 1.0 : 0.0;
            for (int y = col; y < x; ++y) acc -= L[x * CH + y] * Tm[y * CH + col];
            Tm[x * CH + col] = x >= col ? acc : 0.0;
          }
        for (int x = 0; x < CH; ++x) {
          for (int y = 0; y < CH; ++y) r.t[(ch * CH + x) * CH + y] = Tm[x * CH + y];
          for (int i = 0; i < D; ++i) {
            double w = 0, u = 0;
            for (int y = 0; y <= x; ++y) {
              const double tb = Tm[x * CH + y] * bt[y];
              w += tb * (s[y] == 0 ? at(in.k, y, i) * std::exp(G[y * D + i]) : 0.0);
              u += tb * at(in.v, y, i);
            }
            r.w[(ch * CH + x) * D + i] = w;
            r.u[(ch * CH + x) * D + i] = u;
          }
        }
      }
  return r;
}

// One prep run on the device; outputs decoded to double (poisoned first: an unwritten
// element reads NaN).
struct PrepOut {
  std::vector<double> w, u, qg, kd, p, t, eL;
};

std::vector<double> decode16(ScalarType type, const DevBuf<float>& b, size_t limit = SIZE_MAX) {
  const std::vector<float> raw = b.download();
  const auto* bytes = reinterpret_cast<const unsigned char*>(raw.data());
  std::vector<double> out(std::min(raw.size() * 2, limit));
  for (size_t j = 0; j < out.size(); ++j) out[j] = decode(type, bytes + 2 * j);
  return out;
}

PrepOut run_prep(const PrepCase& c, const PrepInputs& in, const char* which) {
  const int D = c.d;
  DevTensor q(kB, kT, kH, D, c.type, Layout{}), k(kB, kT, kH, D, c.type, Layout{}), v(kB, kT, kH, D, c.type, Layout{});
  q.upload(in.q);
  k.upload(in.k);
  v.upload(in.v);
  DevBuf<float> g = to_device_f32(in.g), beta = to_device_f32(in.beta);
  DevBuf<uint8_t> start(in.start.size());
  start.upload(in.start);
  DevBuf<int> head_end(kB);
  head_end.upload(in.head_end);
  gpu::Problem p;
  p.batch = kB;
  p.heads = kH;
  p.dk = p.dv = D;
  p.seqlen = kT;
  p.begin = kBegin;
  p.n = p.seg_len = kN;
  p.elem = c.type == ScalarType::kBFloat16 ? gpu::Elem::kBF16 : gpu::Elem::kF16;
  const int64_t sb = static_cast<int64_t>(kT) * kH * D, st = static_cast<int64_t>(kH) * D;
  p.q = {q.buf.p, sb, st, D};
  p.k = {k.buf.p, sb, st, D};
  p.v = {v.buf.p, sb, st, D};
  p.g = g.p;
  p.gsb = sb;
  p.gst = st;
  p.gsh = D;
  p.per_key = 1;
  p.beta = beta.p;
  p.bsb = static_cast<int64_t>(kT) * kH;
  p.bst = kH;
  p.bsh = 1;
  p.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
  if (c.docs) {
    p.doc_start = start.p;
    p.doc_sb = kT;
  }
  const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(p);
  DevBuf<float> w(z.rows_half), u(z.rows_half), qg(z.rows_half), kd(z.rows_half), pm(z.p_half), t(z.p_half), eL(z.eL);
  for (auto* b : {&w, &u, &qg, &kd, &pm, &t, &eL}) b->poison();
  gpu::KdaPrep prep{w.p, u.p, qg.p, kd.p, pm.p, eL.p, c.docs ? head_end.p : nullptr, t.p};
  {
    const EnvGuard knob("LASP2_DELTA_KDA_PREP", which);
    gpu::launch_kda_prep(p, prep, nullptr);
  }
  cuda_ok(cudaGetLastError(), "prep launch");
  PrepOut o;
  o.w = decode16(c.type, w);
  o.u = decode16(c.type, u);
  o.qg = decode16(c.type, qg);
  o.kd = decode16(c.type, kd);
  o.p = decode16(c.type, pm);
  o.t = decode16(c.type, t);
  const std::vector<float> e = eL.download();
  o.eL.assign(e.begin(), e.end());
  return o;
}

// max |got - want| / max |want|; NaN (an unwritten element) counts as infinite.
double rel_err(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double e = std::abs(got[i] - want[i]);
    num = std::isfinite(e) ? std::max(num, e) : INFINITY;
    den = std::max(den, std::abs(want[i]));
  }
  return num / std::max(den, 1e-30);
}

// Elements that are exactly zero in one and not the other while either is above
// 1e-3 of want's largest and 1e-20 (masks: other segments, above the diagonal, past the
// part; below those, fp32 and 16-bit underflow to zero where float64 does not).
int64_t zero_mismatches(const std::vector<double>& got, const std::vector<double>& want) {
  double den = 0;
  for (double x : want) den = std::max(den, std::abs(x));
  const double floor = std::max(1e-3 * den, 1e-20);
  int64_t bad = 0;
  for (size_t i = 0; i < want.size(); ++i)
    if ((got[i] == 0) != (want[i] == 0) && std::max(std::abs(got[i]), std::abs(want[i])) > floor) ++bad;
  return bad;
}

class DeltaCudaKdaPrep : public ::testing::TestWithParam<PrepCase> {};

TEST_P(DeltaCudaKdaPrep, MatchesFloat64) {
  LASP2_SKIP_WITHOUT_CUDA();
  const PrepCase c = GetParam();
  const PrepInputs in = prep_inputs(c);
  const PrepRef ref = prep_reference(in, c.d, 1.0 / std::sqrt(static_cast<double>(c.d)));
  // 16-bit outputs of fp32 sums of 16-bit products (the levels prep also rounds its
  // scaled q, k tiles, as the old one does between sub-chunks): 1e-2 for the
  // elementwise scalings and P, 2e-2 for T and what T multiplies
  for (const char* which : {"levels", "old"}) {
    const PrepOut o = run_prep(c, in, which);
    const std::string tag = std::string(which) + " prep: ";
    for (auto [name, got, want, tol] :
         {std::tuple{"qg", &o.qg, &ref.qg, 1e-2}, {"kd", &o.kd, &ref.kd, 1e-2}, {"eL", &o.eL, &ref.eL, 1e-4},
          {"P", &o.p, &ref.p, 1e-2}, {"T", &o.t, &ref.t, 2e-2}, {"w", &o.w, &ref.w, 2e-2}, {"u", &o.u, &ref.u, 2e-2}}) {
      EXPECT_LT(rel_err(*got, *want), tol) << tag << name << " vs float64";
      EXPECT_EQ(zero_mismatches(*got, *want), 0) << tag << name << " zero pattern vs float64";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaKdaPrep,
    ::testing::Values(PrepCase{ScalarType::kBFloat16, 128, PrepGates::kMild, false},
                      PrepCase{ScalarType::kBFloat16, 128, PrepGates::kNegInf, true},
                      PrepCase{ScalarType::kBFloat16, 128, PrepGates::kStrong, true},
                      PrepCase{ScalarType::kBFloat16, 64, PrepGates::kMild, true},
                      PrepCase{ScalarType::kBFloat16, 64, PrepGates::kNegInf, false},
                      PrepCase{ScalarType::kFloat16, 128, PrepGates::kMild, true},
                      PrepCase{ScalarType::kFloat16, 128, PrepGates::kNegInf, false},
                      PrepCase{ScalarType::kFloat16, 64, PrepGates::kStrong, false}),
    prep_case_name);

// The levels prep against the old one at T = 64K (LASP2_DELTA_TIMING_T), H = 16,
// D = 128, bf16, alternating, 5 timed launches each after a warm-up (median printed),
// then the whole chunked forward (backend forward: prep, state pass, output) with each;
// asserts that the two preps' P and w agree.
TEST(DeltaCudaKdaPrepTiming, LevelsVsOld) {
  LASP2_SKIP_WITHOUT_CUDA();
  const char* t_env = std::getenv("LASP2_DELTA_TIMING_T");
  const int64_t T = t_env != nullptr && *t_env != '\0' ? std::atoll(t_env) : 65536, H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      o(1, T, H, D, type, Layout{});
  std::mt19937 rng(3);
  const size_t pattern = size_t{1} << 20;
  {
    std::normal_distribution<double> normal(0.0, 1.0);
    for (DevTensor* t : {&q, &k, &v}) {
      std::vector<unsigned char> host(2 * pattern);
      for (size_t i = 0; i < pattern; ++i) encode(type, normal(rng) * (t == &k ? 0.09 : 1.0), &host[2 * i]);
      for (size_t at = 0; at < t->elems; at += pattern)
        cuda_ok(cudaMemcpy(t->buf.p + 2 * at, host.data(), 2 * std::min(pattern, t->elems - at),
                           cudaMemcpyHostToDevice),
                "upload");
    }
  }
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
  const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(kp);
  DevBuf<float> outs[2][6];
  gpu::KdaPrep prep[2];
  for (int n = 0; n < 2; ++n) {
    for (int j = 0; j < 4; ++j) outs[n][j] = DevBuf<float>(z.rows_half);
    outs[n][4] = DevBuf<float>(z.p_half);
    outs[n][5] = DevBuf<float>(z.eL);
    prep[n] = gpu::KdaPrep{outs[n][0].p, outs[n][1].p, outs[n][2].p, outs[n][3].p, outs[n][4].p, outs[n][5].p};
  }
  const char* names[2] = {"levels", "old"};
  cudaEvent_t e0, e1;
  cuda_ok(cudaEventCreate(&e0), "event");
  cuda_ok(cudaEventCreate(&e1), "event");
  auto time_it = [&](auto&& f) {
    cuda_ok(cudaEventRecord(e0), "record");
    f();
    cuda_ok(cudaEventRecord(e1), "record");
    cuda_ok(cudaEventSynchronize(e1), "sync");
    float ms = 0;
    cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
    return ms;
  };
  constexpr int kReps = 5;
  std::vector<float> prep_ms[2], fwd_ms[2];
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  delta::DeltaParams dp;
  dp.batch = 1;
  dp.seqlen = T;
  dp.heads = H;
  dp.dim_k = dp.dim_v = D;
  dp.dtype = type;
  dp.gate_kind = delta::GateKind::kPerKey;
  dp.q = q.cview();
  dp.k = k.cview();
  dp.v = v.cview();
  dp.g = g.p;
  dp.g_stride = {T * H * D, H * D, D};
  dp.beta = beta.p;
  dp.beta_stride = {T * H, H, 1};
  dp.scale = kp.scale;
  for (int rep = 0; rep <= kReps; ++rep)
    for (int n = 0; n < 2; ++n) {
      const EnvGuard knob("LASP2_DELTA_KDA_PREP", names[n]);
      const float a = time_it([&] { gpu::launch_kda_prep(kp, prep[n], nullptr); });
      const float b = time_it([&] { be.forward(dp, TokenRange{0, T}, nullptr, {}, o.mview(), nullptr); });
      if (rep > 0) {  // the first is a warm-up
        prep_ms[n].push_back(a);
        fwd_ms[n].push_back(b);
      }
    }
  auto median = [](std::vector<float> x) {
    std::sort(x.begin(), x.end());
    return x[x.size() / 2];
  };
  std::printf("[ timing ] KDA prep T=%lld H=16 D=128 bf16, median of %d: levels %.3f ms, old %.3f ms; "
              "chunked forward with levels %.3f ms, with old %.3f ms\n",
              static_cast<long long>(T), kReps, median(prep_ms[0]), median(prep_ms[1]), median(fwd_ms[0]),
              median(fwd_ms[1]));
  for (int n = 0; n < 2; ++n) {
    std::printf("[ timing ] %s prep:", names[n]);
    for (float x : prep_ms[n]) std::printf(" %.3f", x);
    std::printf(" ms; forward:");
    for (float x : fwd_ms[n]) std::printf(" %.3f", x);
    std::printf(" ms\n");
  }
  cudaEventDestroy(e0);
  cudaEventDestroy(e1);
  // the two preps' P and w (bf16), their first 2^22 elements
  for (int j : {4, 0}) {
    const size_t n = size_t{1} << 22;
    const std::vector<double> a = decode16(type, outs[0][j], n), b = decode16(type, outs[1][j], n);
    EXPECT_LT(rel_err(a, b), 2e-2) << (j == 4 ? "P" : "w") << ": levels vs old prep";
  }
}

}  // namespace
}  // namespace lasp2::testing
