// The KDA chunk prep (launch_kda_prep, kda_chunk.h; kernel in kda_prep.cu) on its own:
// every output (qg, kd, eL, P, T, w, u) against a float64 host evaluation of the
// formulas in kda_chunk.h, on a part that starts and ends mid-chunk, 2 batches x 3
// heads, d = 64 and 128, bf16 and fp16: mild, strong (down to -5) and -inf log gates
// (some dims, and every dim of one token), packed documents (starts inside chunks, on a
// chunk's first token, one-token documents) and head maps (head_end inside a chunk and
// on a chunk edge). Its time is printed by DeltaCudaKdaTiming.OneDevice
// (test_kda_timing.cpp, "per launch").
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "cuda_test_util.h"
#include "delta_rule/cuda/kda_chunk.h"

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

std::vector<double> decode16(ScalarType type, const DevBuf<float>& b) {
  const std::vector<float> raw = b.download();
  const auto* bytes = reinterpret_cast<const unsigned char*>(raw.data());
  std::vector<double> out(raw.size() * 2);
  for (size_t j = 0; j < out.size(); ++j) out[j] = decode(type, bytes + 2 * j);
  return out;
}

PrepOut run_prep(const PrepCase& c, const PrepInputs& in) {
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
  gpu::launch_kda_prep(p, prep, nullptr);
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
  // 16-bit outputs of fp32 sums of 16-bit products (of 16-bit scaled q, k tiles): 1e-2
  // for the elementwise scalings and P, 2e-2 for T and what T multiplies
  const PrepOut o = run_prep(c, in);
  for (auto [name, got, want, tol] :
       {std::tuple{"qg", &o.qg, &ref.qg, 1e-2}, {"kd", &o.kd, &ref.kd, 1e-2}, {"eL", &o.eL, &ref.eL, 1e-4},
        {"P", &o.p, &ref.p, 1e-2}, {"T", &o.t, &ref.t, 2e-2}, {"w", &o.w, &ref.w, 2e-2}, {"u", &o.u, &ref.u, 2e-2}}) {
    EXPECT_LT(rel_err(*got, *want), tol) << name << " vs float64";
    EXPECT_EQ(zero_mismatches(*got, *want), 0) << name << " zero pattern vs float64";
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

}  // namespace
}  // namespace lasp2::testing
