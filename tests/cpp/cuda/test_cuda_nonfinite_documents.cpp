// An inf or NaN in one packed document stays in that document on the CUDA backend (session
// 23; the CPU kernels since session 22): where a document start or reset lies between a
// carried state and its reader, the kernels skip the state (a select) instead of
// multiplying it by its weight 0 (0 * inf = NaN). Before, the scan, the part combines,
// state_dot and the walking passes' entry / through / exit weights multiplied, and every
// document after the bad one (before it, for the state gradients) came out NaN.
//
// The bad values lie in 64-token chunks that hold no other document's start: inside one
// chunk the tensor-core products sum over all of its tokens (a masked pair still enters as
// 0 * inf), which the change does not cover (docs/reliability.md).
//
// 1. Every backend function against the CPU backend run in float64 on the same poisoned
//    inputs, on the rows of the clean documents (the CPU kernels keep them finite).
// 2. The combines and state_dot with a NaN state before a part of log decay -inf, and the
//    delta rule's map products with a zero map.
// 3. lasp2 forward + backward on 1, 2 and 3 ranks (threads on one GPU) against the float64
//    recurrence of the same problem without the bad values, on the clean documents' rows.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <limits>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "delta_rule/delta_backend.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "lasp2_device_run.h"
#include "../problem.h"
#include "../recurrent_reference.h"

namespace lasp2::testing {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
const double kNaN = std::nan("");

// Token ranges [begin, end) of the rows a check looks at.
using Rows = std::vector<std::pair<int64_t, int64_t>>;

bool in_rows(const Rows& rows, int64_t t) {
  for (const auto& r : rows)
    if (t >= r.first && t < r.second) return true;
  return false;
}

// max |got - want| / max |want| over the rows of [B, T, H, D] values, and how many of them
// are not finite on the device (want is finite there: the CPU / the clean recurrence).
struct RowsError {
  double rel = 0;
  int64_t nonfinite = 0, want_nonfinite = 0;
};
template <typename G, typename W>
RowsError rows_error(const std::vector<G>& got, const std::vector<W>& want, int64_t B, int64_t T, int64_t H,
                     int64_t D, const Rows& rows) {
  RowsError e;
  double num = 0, den = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      if (!in_rows(rows, t)) continue;
      for (int64_t i = 0; i < H * D; ++i) {
        const int64_t idx = (b * T + t) * H * D + i;
        const double g = static_cast<double>(got[idx]), w = static_cast<double>(want[idx]);
        if (!std::isfinite(w)) ++e.want_nonfinite;
        if (!std::isfinite(g)) {
          ++e.nonfinite;
          continue;
        }
        num = std::max(num, std::abs(g - w));
        den = std::max(den, std::abs(w));
      }
    }
  e.rel = e.nonfinite ? INFINITY : num / std::max(den, 1e-3);
  return e;
}

void expect_rows_close(const std::string& what, const RowsError& e, double tol) {
  std::printf("[cuda-nonfinite] %-46s rel_err=%.3e nonfinite=%lld %s\n", what.c_str(), e.rel,
              static_cast<long long>(e.nonfinite), e.nonfinite == 0 && e.rel < tol ? "ok" : "FAIL");
  EXPECT_EQ(e.want_nonfinite, 0) << what << ": the reference is not finite on these rows";
  EXPECT_EQ(e.nonfinite, 0) << what << ": a clean document's rows are not finite";
  EXPECT_LT(e.rel, tol) << what;
}

// Sets x[b][t][h][d] of a [B, T, H, D] host array.
void set_at(std::vector<double>& x, const ProblemSpec& s, int64_t D, int64_t b, int64_t t, int64_t h, int64_t d,
            double value) {
  x[((b * s.seqlen + t) * s.heads + h) * D + d] = value;
}

// ---- 1. the backend functions -------------------------------------------------------------
// Part [0, 700): documents A = [0, 130), B = [130, 300), C = [300, 700). Chunk 2 (tokens
// 128-191) holds B's start, chunk 4 (256-319) C's; the bad values lie in chunk 3 (B only):
// k = inf (200), v = NaN (210), q = inf (220), dO = NaN (230). Forward passes and dq must keep
// A and C clean, the reverse walks (dk, dv, the state gradients) A and C too; dg is a reverse
// sum over the part (q.dq - k.dk, on the CPU as well), so only C's is checked.
struct NfCase {
  OpCase op;
  bool fold = false;  // LASP2_CUDA_SCAN_FOLD=1: the output / dq passes run the scan themselves
};

void PrintTo(const NfCase& x, std::ostream* os) { *os << x.op.name << (x.fold ? "_fold" : ""); }

OpCase nf_op(const char* name, ScalarType t, DecayMode m, int64_t d, int seg_chunks, bool generic = false) {
  OpCase c;
  c.name = name;
  c.dtype = t;
  c.mode = m;
  c.dk = c.dv = d;
  c.T = 700;
  c.begin = 0;
  c.end = 700;
  c.docs = {130, 300};
  c.seg_chunks = seg_chunks;
  c.force_generic = generic;
  return c;
}

void poison_document_b(Problem<double>& pr) {
  const ProblemSpec& s = pr.spec;
  set_at(pr.k, s, s.dim_k, 0, 200, 0, 1, kInf);
  set_at(pr.v, s, s.dim_v, 1, 210, 1, 0, kNaN);
  set_at(pr.q, s, s.dim_k, 1, 220, 0, 3, kInf);
  set_at(pr.dout, s, s.dim_v, 0, 230, 1, 2, kNaN);
}

void run_backend_case(const NfCase& x) {
  const OpCase& c = x.op;
  EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
  EnvGuard gen("LASP2_CUDA_FORCE_GENERIC", c.force_generic ? "1" : "");
  EnvGuard fold("LASP2_CUDA_SCAN_FOLD", x.fold ? "1" : "");
  Problem<double> pr = make_problem(c, 2300);
  poison_document_b(pr);
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const KernelBackend& gpu = cuda_backend();
  const KernelBackend& cpu = cpu_backend();
  const int64_t bh = pc.bh(), se = pc.state_elems();
  const double tol = tol_of(c.dtype);
  const auto sv = pr.strides(c.dv), sk = pr.strides(c.dk);
  const Rows a_and_c = {{0, 130}, {300, 700}}, only_a = {{0, 130}}, only_c = {{300, 700}};
  const std::string n = c.name + (x.fold ? "_fold" : "");
  auto rows_of = [&](const DevTensor& t, const std::vector<double>& want, const Rows& rows) {
    return rows_error(t.download().v, want, c.B, c.T, c.H, t.D, rows);
  };
  auto f32 = [](const std::vector<double>& v) { return std::vector<float>(v.begin(), v.end()); };
  const std::vector<float> S0 = f32(random_vec(bh * se, 21, 2.0));
  const std::vector<float> D0 = f32(random_vec(bh * se, 23, 0.5));
  const std::vector<float> dgoff = f32(random_vec(bh, 24, 1.0));
  std::vector<float> S0_nan = S0, D0_nan = D0;
  S0_nan[5] = NAN;  // an earlier part's bad document entering this part
  D0_nan[7] = INFINITY;
  DevBuf<float> S0d = to_device_f32(S0), S0nd = to_device_f32(S0_nan), D0d = to_device_f32(D0),
                D0nd = to_device_f32(D0_nan), dgoffd = to_device_f32(dgoff);

  // the part's state (C's, from zero) and its gradient at the entry (A's tokens only)
  {
    std::vector<float> want(bh * se), wantL(bh);
    cpu.part_state(pc, part, want.data(), wantL.data(), nullptr);
    DevBuf<float> st(bh * se), L(bh);
    gpu.part_state(pg, part, st.p, L.p, nullptr);
    expect_state(c, (n + " part_state").c_str(), st, want, tol);
    std::vector<float> wantd(bh * se);
    cpu.part_dstate(pc, part, pr.dout_view(), wantd.data(), nullptr);
    DevBuf<float> d(bh * se);
    gpu.part_dstate(pg, part, dp.dout.cview(), d.p, nullptr);
    expect_state(c, (n + " part_dstate").c_str(), d, wantd, tol);
  }
  // outputs: a finite entering state (A and C clean), a NaN one (C clean)
  for (const bool nan_in : {false, true}) {
    std::vector<double> want = pr.zeros_like_v();
    cpu.chunk_forward(pc, part, (nan_in ? S0_nan : S0).data(), {want.data(), sv}, nullptr);
    DevTensor o = dp.like_v();
    gpu.chunk_forward(pg, part, (nan_in ? S0nd : S0d).p, o.mview(), nullptr);
    expect_rows_close(n + (nan_in ? " o (NaN entering state)" : " o"), rows_of(o, want, nan_in ? only_c : a_and_c),
                      tol);
  }
  // the LASP-2 prefix term of a NaN prefix state: only A's rows read it (B before its bad
  // chunk, and C, clean)
  {
    std::vector<double> want = pr.zeros_like_v();
    cpu.chunk_forward(pc, part, nullptr, {want.data(), sv}, nullptr);
    cpu.add_prefix_output(pc, part, S0_nan.data(), {want.data(), sv}, nullptr);
    DevTensor o = dp.like_v();
    gpu.chunk_forward(pg, part, nullptr, o.mview(), nullptr);
    gpu.add_prefix_output(pg, part, S0nd.p, o.mview(), nullptr);
    expect_rows_close(n + " o + NaN prefix", rows_of(o, want, {{130, 192}, {300, 700}}), tol);
  }
  // dq (+ q.dq), dk, dv, dg: a finite state gradient at the part's end (A and C clean, dg of
  // C), an infinite one (A clean)
  std::vector<double> want_dq = pr.zeros_like_k(), want_qdq(c.B * c.T * c.H, 0.0);
  cpu.chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), sk}, want_qdq.data(), nullptr);
  DevTensor dq = dp.like_k();
  DevBuf<float> qdq(c.B * c.T * c.H);
  gpu.chunk_backward_dq(pg, part, dp.dout.cview(), S0d.p, dq.mview(), qdq.p, nullptr);
  expect_rows_close(n + " dq", rows_of(dq, want_dq, a_and_c), tol);
  expect_rows_close(n + " q.dq", rows_error(qdq.download(), want_qdq, c.B, c.T, c.H, 1, a_and_c), tol);
  for (const bool inf_in : {false, true}) {
    std::vector<double> want_dk = pr.zeros_like_k(), want_dv = pr.zeros_like_v(), want_dg(c.B * c.T * c.H, 0.0);
    cpu.chunk_backward_dkdv(pc, part, pr.dout_view(), (inf_in ? D0_nan : D0).data(), {want_dk.data(), sk},
                            {want_dv.data(), sv}, want_qdq.data(), dgoff.data(), want_dg.data(), nullptr);
    DevTensor dk = dp.like_k(), dv = dp.like_v();
    DevBuf<float> dg(c.B * c.T * c.H);
    gpu.chunk_backward_dkdv(pg, part, dp.dout.cview(), (inf_in ? D0nd : D0d).p, dk.mview(), dv.mview(), qdq.p,
                            dgoffd.p, dg.p, nullptr);
    const Rows& rows = inf_in ? only_a : a_and_c;
    const std::string tag = inf_in ? " (inf state gradient)" : "";
    expect_rows_close(n + " dk" + tag, rows_of(dk, want_dk, rows), tol);
    expect_rows_close(n + " dv" + tag, rows_of(dv, want_dv, rows), tol);
    if (!inf_in)
      expect_rows_close(n + " dg", rows_error(dg.download(), want_dg, c.B, c.T, c.H, 1, only_c),
                        tol_dg(c.dtype, 400));
  }
}

std::vector<NfCase> nf_cases() {
  constexpr ScalarType bf = ScalarType::kBFloat16, hf = ScalarType::kFloat16, f32 = ScalarType::kFloat32;
  std::vector<NfCase> cases;
  // one-chunk segments (the scan carries every state), two-chunk ones, the backend's own
  cases.push_back({nf_op("bf16_gate_D64_seg1", bf, DecayMode::kGate, 64, 1)});
  cases.push_back({nf_op("bf16_gate_D128_seg2", bf, DecayMode::kGate, 128, 2)});
  cases.push_back({nf_op("fp16_none_D128_seg2", hf, DecayMode::kNone, 128, 2)});
  cases.push_back({nf_op("bf16_gate_D128_auto", bf, DecayMode::kGate, 128, 0)});
  cases.push_back({nf_op("bf16_gate_D64_seg1", bf, DecayMode::kGate, 64, 1), true});
  cases.push_back({nf_op("bf16_gate_D128_seg2", bf, DecayMode::kGate, 128, 2), true});
  // the generic kernels (fp32; bf16 forced)
  cases.push_back({nf_op("fp32_gate_D64_seg1", f32, DecayMode::kGate, 64, 1)});
  cases.push_back({nf_op("fp32_none_D64_seg2", f32, DecayMode::kNone, 64, 2)});
  cases.push_back({nf_op("bf16_gate_D64_seg1_generic", bf, DecayMode::kGate, 64, 1, true)});
  return cases;
}

class CudaNonFiniteDocuments : public ::testing::TestWithParam<NfCase> {};

TEST_P(CudaNonFiniteDocuments, KernelsMatchCpuOutsideTheDocument) {
  LASP2_SKIP_WITHOUT_CUDA();
  run_backend_case(GetParam());
}

INSTANTIATE_TEST_SUITE_P(All, CudaNonFiniteDocuments, ::testing::ValuesIn(nf_cases()),
                         [](const ::testing::TestParamInfo<NfCase>& i) {
                           return i.param.op.name + (i.param.fold ? "_fold" : "");
                         });

// ---- 2. the combines ----------------------------------------------------------------------
// Part 2 starts a document (log decay -inf) after parts holding NaN and inf: every combine
// that crosses it equals the CPU's, which drops what came before (and so is finite).
TEST(CudaNonFiniteCombine, BlockedPartDropsNonFiniteStates) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int parts = 5;
  const int64_t bh = 2, elems = 300;
  std::vector<std::vector<float>> finite(parts);
  for (int i = 0; i < parts; ++i) {
    const auto v = random_vec(bh * elems, 200 + i);
    finite[i].assign(v.begin(), v.end());
  }
  std::vector<float> L(parts * bh, -0.5f);
  L[2 * bh + 0] = -INFINITY;  // part 2 starts a document in both (b, h)
  L[2 * bh + 1] = -INFINITY;
  DevBuf<float> Ld = to_device_f32(L);
  // the CPU's and the device's combine of `states` over `target` (prefix or suffix)
  auto check = [&](const std::vector<std::vector<float>>& states, int target, bool suffix) {
    std::vector<DevBuf<float>> dstates;
    std::vector<const float*> hp, dp;
    for (int i = 0; i < parts; ++i) {
      dstates.push_back(to_device_f32(states[i]));
      hp.push_back(states[i].data());
      dp.push_back(dstates.back().p);
    }
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
    int64_t bad = 0;
    const double err = rel_err_f32(got.download(), want, &bad);
    EXPECT_EQ(bad, 0) << (suffix ? "suffix" : "prefix") << " target " << target << ": not finite";
    EXPECT_LT(err, 1e-6) << (suffix ? "suffix" : "prefix") << " target " << target;
  };
  // prefix: parts 0 and 1 hold a NaN and an inf; targets 3 and 4 cross part 2
  std::vector<std::vector<float>> before = finite;
  before[0][3] = NAN;
  before[1][elems + 4] = INFINITY;
  for (int target : {3, 4}) check(before, target, false);
  // suffix (the state gradients, carried backward): parts 3 and 4 hold them; targets 0, 1
  std::vector<std::vector<float>> after = finite;
  after[3][6] = NAN;
  after[4][elems + 7] = -INFINITY;
  for (int target : {0, 1}) check(after, target, true);
  // <exp(L) P + M, D> with a NaN / inf prefix P and L = -inf: <M, D>
  std::vector<float> P = finite[0];
  P[3] = NAN;
  P[elems + 9] = INFINITY;
  DevBuf<float> Pd = to_device_f32(P), Md = to_device_f32(finite[1]), Dd = to_device_f32(finite[2]);
  std::vector<float> want(bh);
  cpu_backend().state_dot(P.data(), finite[1].data(), L.data() + 2 * bh, finite[2].data(), bh, elems, want.data(),
                          nullptr);
  DevBuf<float> got(bh);
  got.poison();
  cuda_backend().state_dot(Pd.p, Md.p, Ld.p + 2 * bh, Dd.p, bh, elems, got.p, nullptr);
  int64_t bad = 0;
  const double err = rel_err_f32(got.download(), want, &bad);
  EXPECT_EQ(bad, 0) << "state_dot: not finite";
  EXPECT_LT(err, 1e-6) << "state_dot";
}

// The delta rule's part combine (DeltaFamily: acc = A_m acc + M_m, and A^T for the
// gradients): a part holding a document start has a zero map, which drops a NaN / inf
// entering state as the CPU's map_product does (the CUDA kernel multiplied: 0 * NaN).
TEST(CudaNonFiniteCombine, DeltaZeroMapDropsNonFiniteStates) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t bh = 3, dk = 64, dv = 48;
  std::mt19937 rng(9);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> A(bh * dk * dk), x(bh * dk * dv), y(bh * dk * dv);
  for (auto* v : {&A, &x, &y})
    for (auto& e : *v) e = normal(rng);
  // (b, h) rows 0 and 1: zero maps with a NaN / inf state; row 2: a map with a few zero
  // entries (only those skip) and a finite state
  std::fill(A.begin(), A.begin() + 2 * dk * dk, 0.f);
  x[5] = NAN;
  x[dk * dv + 7] = INFINITY;
  x[dk * dv + 8] = -INFINITY;
  for (int64_t i = 0; i < dk; i += 3) A[2 * dk * dk + i * dk + (i * 7) % dk] = 0.f;
  const auto& cpu = delta::delta_cpu_backend();
  const auto& gpu = delta::delta_backend_for(Device::kCUDA);
  std::vector<float> out(x.size()), out_t = y;
  cpu.apply_map(A.data(), x.data(), y.data(), bh, dk, dv, out.data(), nullptr);
  cpu.apply_map_transposed_add(A.data(), x.data(), bh, dk, dv, out_t.data(), nullptr);
  auto gA = to_device_f32(A), gx = to_device_f32(x), gy = to_device_f32(y);
  DevBuf<float> gout(x.size());
  gout.poison();
  gpu.apply_map(gA.p, gx.p, gy.p, bh, dk, dv, gout.p, nullptr);
  int64_t bad = 0;
  EXPECT_LT(rel_err_f32(gout.download(), out, &bad), 1e-5) << "apply_map";
  EXPECT_EQ(bad, 0) << "apply_map: not finite";
  gpu.apply_map_transposed_add(gA.p, gx.p, bh, dk, dv, gy.p, nullptr);
  EXPECT_LT(rel_err_f32(gy.download(), out_t, &bad), 1e-5) << "apply_map_transposed_add";
  EXPECT_EQ(bad, 0) << "apply_map_transposed_add: not finite";
}

// ---- 3. lasp2 on ranks ----------------------------------------------------------------------
// T = 384 (parts of 96 tokens on 2 ranks, 64 on 3), documents [0, 150) and [150, 384). The bad
// values lie in the first document's first chunk (the second document must stay clean: its
// outputs, dq, dk, dv, dg) or in the second's chunk 300-351 (the first must stay clean: o, dq,
// dk, dv; dg is a reverse sum over the sequence, as on the CPU).
struct RankCase {
  ScalarType dtype;
  DecayMode mode;
  bool bad_first;
};

void run_rank_case(const RankCase& rc, int world) {
  ProblemSpec s;
  s.batch = 2;
  s.heads = 2;
  s.dim_k = s.dim_v = 64;
  s.mode = rc.mode;
  s.seqlen = 384;
  s.scale = 0.125f;
  s.doc_starts = {150};
  const Problem<double> clean = rounded(s, rc.dtype, 2301);
  Problem<double> bad = clean;
  const int64_t t0 = rc.bad_first ? 10 : 300;
  set_at(bad.k, s, s.dim_k, 0, t0, 0, 1, kInf);
  set_at(bad.v, s, s.dim_v, 1, t0 + 10, 1, 0, kNaN);
  set_at(bad.q, s, s.dim_k, 1, t0 + 20, 0, 3, kInf);
  set_at(bad.dout, s, s.dim_v, 0, t0 + 30, 1, 2, kNaN);
  const Grads g = run_world(bad, rc.dtype, world);
  const ReferenceGrads ref = recurrent_reference(clean);
  const Rows rows = rc.bad_first ? Rows{{150, 384}} : Rows{{0, 150}};
  const std::string name = std::string(dtype_name(rc.dtype)) + (rc.mode == DecayMode::kNone ? "_none" : "_gate") +
                           (rc.bad_first ? "_bad_first" : "_bad_second") + "_P" + std::to_string(world);
  const double tol = tol_of(rc.dtype);
  const int64_t B = s.batch, T = s.seqlen, H = s.heads;
  expect_rows_close(name + " o", rows_error(g.o, ref.o, B, T, H, s.dim_v, rows), tol);
  expect_rows_close(name + " dq", rows_error(g.dq, ref.dq, B, T, H, s.dim_k, rows), tol);
  expect_rows_close(name + " dk", rows_error(g.dk, ref.dk, B, T, H, s.dim_k, rows), tol);
  expect_rows_close(name + " dv", rows_error(g.dv, ref.dv, B, T, H, s.dim_v, rows), tol);
  if (rc.bad_first && rc.mode != DecayMode::kNone)
    expect_rows_close(name + " dg", rows_error(g.dg, ref.dg, B, T, H, 1, rows), tol_dg(rc.dtype, T));
}

TEST(CudaNonFiniteLasp2, OtherDocumentsMatchTheCleanRecurrence) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const RankCase rc : {RankCase{ScalarType::kBFloat16, DecayMode::kGate, true},
                            RankCase{ScalarType::kBFloat16, DecayMode::kGate, false},
                            RankCase{ScalarType::kBFloat16, DecayMode::kNone, true},
                            RankCase{ScalarType::kFloat32, DecayMode::kGate, true},
                            RankCase{ScalarType::kFloat32, DecayMode::kGate, false}})
    for (int world : {1, 2, 3}) run_rank_case(rc, world);
}

}  // namespace
}  // namespace lasp2::testing
