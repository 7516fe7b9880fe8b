// GDN's chunked tensor-core kernels (delta_chunk.h, delta_chunk_bwd.h) against the
// token-recurrent ones and the CPU backend: forward, entering-state gradient and backward
// (DeltaCudaChunked), and the chunked part summary (DeltaCudaChunkedSummary).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/delta_backend.h"
#include "delta_test_util.h"

namespace lasp2::testing::delta_cuda {
namespace {

// ---- the chunked tensor-core kernels (delta_chunk.h) against the token-recurrent ones ----
// GDN in bf16 / fp16, d = 64 and 128, a part that starts and ends mid-chunk: packed
// documents without document states (starts inside chunks, on a chunk's first token and
// one-token documents) and -inf log gates (the state forgotten mid-chunk), with an
// entering state and a leaving-state gradient. The reference is the same backend with
// LASP2_DELTA_CHUNKED=0 (the recurrent kernels, held to the CPU backend by DeltaCuda;
// the CPU forward's chunk form has no -inf gates). Without -inf gates the chunked results are
// also held to the CPU backend.
struct ChunkedCase {
  ScalarType type;
  int d;
  bool packed;
  bool neg_inf;
};

struct ChunkedResult : Grads {
  std::vector<double> o;
  std::vector<char> o_written;
  std::vector<float> dI;
};

class DeltaCudaChunked : public ::testing::TestWithParam<ChunkedCase> {};

TEST_P(DeltaCudaChunked, MatchesRecurrentKernels) {
  LASP2_SKIP_WITHOUT_CUDA();
  const ChunkedCase c = GetParam();
  DeltaSpec spec = gdn_spec(c.d, 300, c.packed ? 1 : 2);
  // part chunks begin at 37, 101, 165, 229: starts inside chunks, on one, one-token docs
  if (c.packed) spec.doc_starts = {5, 64, 65, 101, 130, 200, 201, 263};
  DeltaProblem<float> pr(spec, 23);
  prepare_inputs(pr, c.type);
  // the state forgotten inside a chunk, at a chunk's first token, at the part's first
  if (c.neg_inf) forget_at(pr, {37, 90, 165, 166, 250});
  const Layout lay{false, 0};
  DeltaDeviceProblem dev(pr, c.type, lay);
  const DeltaParams& dp = dev.p;
  const DeltaParams hp = pr.params();
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{37, spec.seqlen - 20};
  const int64_t bh = dp.bh(), se = dp.state_elems(), D = spec.num_docs() * spec.heads * se;

  const EdgeStates edge = random_edge_states(9, bh * se);
  const std::vector<float>& entering = edge.entering;
  const float *d_entering = edge.d_entering.p, *d_leaving = edge.d_leaving.p;

  auto run = [&]() {
    ChunkedResult r;
    DevTensor og(spec.batch, spec.seqlen, spec.heads, spec.dim_v, c.type, lay);
    gpu.forward(dp, part, d_entering, DocStates{}, og.mview(), nullptr);
    auto ob = og.download();
    r.o = ob.v;
    r.o_written = ob.written;
    DevBuf<float> gE(bh * se);
    gpu.entering_dstate(dp, part, dev.dout.cview(), gE.p, nullptr);
    r.dE_head = gE.download();
    BackwardBuffers g(pr, c.type, lay, bh * se);
    DevBuf<float> gdI = zeroed(D);
    // without document states: the chunked backward (delta_chunk_bwd.h) takes packed documents too
    gpu.backward(dp, part, dev.dout.cview(), d_entering, d_leaving, DocStates{}, g.dq.mview(), g.dk.mview(),
                 g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
    g.download(r);
    if (c.packed) {  // the gradients of the documents' (zero) initial states: the recurrent walk
      DocStates ddoc;
      ddoc.d_initial = gdI.p;
      gpu.backward(dp, part, dev.dout.cview(), d_entering, d_leaving, ddoc, g.dq.mview(), g.dk.mview(),
                   g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
      r.dI = gdI.download();
      r.dI.resize(D);
    }
    return r;
  };
  const ChunkedResult got = run(), want = with_env("LASP2_DELTA_CHUNKED", "0", run);
  // the chunked kernels' state products take 16-bit operands (the state entering each
  // chunk, its leaving gradient, T, v_new, dU and dB are rounded to the input dtype, as
  // in fla's chunk kernels), so dg, dbeta and the entering-state gradient are sums of
  // rounded products: within 6e-3 in bfloat16 (8 mantissa bits), 2e-3 in float16
  const double tol_io = 1e-2, tol_sum = c.type == ScalarType::kBFloat16 ? 1e-2 : 2e-3, tol_state = 5e-3;
  // max |got - want| / max |want| over the part's rows (the 16-bit outputs are
  // poisoned outside it); elements inside it must be finite
  auto rel = [&](const std::vector<double>& a, const std::vector<double>& b, const char* name) {
    return rel_in_part(a, b, part, spec.batch, spec.seqlen, spec.heads * spec.dim_v, name);
  };
  EXPECT_EQ(got.o_written, want.o_written) << "o written where the recurrent kernels write";
  EXPECT_LT(rel(got.o, want.o, "o"), tol_io) << "o";
  EXPECT_LT(rel(got.dq, want.dq, "dq"), tol_io) << "dq";
  EXPECT_LT(rel(got.dk, want.dk, "dk"), tol_io) << "dk";
  EXPECT_LT(rel(got.dv, want.dv, "dv"), tol_io) << "dv";
  EXPECT_LT(rel_err_f32(got.dg, want.dg), tol_sum) << "dg";
  EXPECT_LT(rel_err_f32(got.db, want.db), tol_sum) << "dbeta";
  EXPECT_LT(rel_err_f32(got.dE, want.dE), tol_sum) << "d_entering";
  EXPECT_LT(rel_err_f32(got.dE_head, want.dE_head), tol_state) << "entering dstate";
  if (c.packed) EXPECT_LT(rel_err_f32(got.dI, want.dI), tol_sum) << "d_initial";

  if (!c.neg_inf) {  // and the CPU backend, call by call
    std::vector<float> o(pr.v.size(), 0.f);
    delta::delta_cpu_backend().forward(hp, part, entering.data(), DocStates{}, {o.data(), pr.strides(spec.dim_v)},
                                       nullptr);
    const Compare cmp = compare_rows(got.o, got.o_written, o, spec.batch, spec.seqlen, spec.heads, spec.dim_v,
                                     part.begin, part.end);
    EXPECT_LT(cmp.rel, tol_io) << "o vs CPU";
    EXPECT_EQ(cmp.missing, 0);
    EXPECT_EQ(cmp.clobbered, 0);
    std::vector<float> E(bh * se);
    delta::delta_cpu_backend().entering_dstate(hp, part, pr.dout_view(), E.data(), nullptr);
    EXPECT_LT(rel_err_f32(got.dE_head, E), tol_state) << "entering dstate vs CPU";
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaChunked,
    ::testing::Values(ChunkedCase{ScalarType::kBFloat16, 128, false, false},
                      ChunkedCase{ScalarType::kBFloat16, 128, true, false},
                      ChunkedCase{ScalarType::kBFloat16, 64, true, true},
                      ChunkedCase{ScalarType::kFloat16, 64, false, false},
                      ChunkedCase{ScalarType::kFloat16, 128, true, true},
                      ChunkedCase{ScalarType::kFloat16, 64, false, true}),
    [](const ::testing::TestParamInfo<ChunkedCase>& info) {
      const auto& c = info.param;
      return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + (c.packed ? "_packed" : "_rows") +
             (c.neg_inf ? "_neginf" : "");
    });

// ---- the chunked part summary (gdnfwd) -------------------------------------------------
// part_summary of GDN in 16-bit (documents without initial states, no end states asked
// for) is the product of the chunk maps A_c = e I - (diag(d) K)^T w and the chunked state
// pass from zero; with packed documents the head maps come from a second pass that ends
// at each row's first document start (delta_chunk.h). Held to the token-recurrent walk
// (LASP2_DELTA_CHUNKED=0) with and without -inf log gates (inside a chunk, on a chunk's
// first token, on the part's first token), rows and packed documents (starting inside
// the part, and on its first token: an empty head), to the CPU backend without -inf
// gates, and to the forward: A E + M is the state the part leaves with E entering, so
// the next part's outputs from it equal those of one forward over both.
struct SummaryCase {
  ScalarType type;
  int d;
  bool neg_inf;
  int batch;
  int docs = 0;  // 0: rows; 1: documents starting inside the part; 2: one on its first token
};

class DeltaCudaChunkedSummary : public ::testing::TestWithParam<SummaryCase> {};

TEST_P(DeltaCudaChunkedSummary, MatchesRecurrentCpuAndForward) {
  LASP2_SKIP_WITHOUT_CUDA();
  const SummaryCase c = GetParam();
  DeltaSpec spec = gdn_spec(c.d, 333, c.batch);
  if (c.docs == 1) spec.doc_starts = {5, 64, 65, 101, 130, 200, 201, 263};
  if (c.docs == 2) spec.doc_starts = {37, 100, 101, 250, 300};
  DeltaProblem<float> pr(spec, 31);
  prepare_inputs(pr, c.type);
  if (c.neg_inf) forget_at(pr, {37, 90, 165, 166, 250});
  DeltaDeviceProblem dev(pr, c.type, Layout{});
  const DeltaParams& dp = dev.p;
  const DeltaParams hp = pr.params();
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{37, 290};  // starts and ends mid-chunk, 253 tokens: a partial last chunk
  const int64_t bh = dp.bh(), se = dp.state_elems(), me = dp.map_elems();

  struct Maps {
    std::vector<float> A, M, hA, hM;
  };
  auto summary = [&]() {
    DevBuf<float> gA(bh * me), gM(bh * se), ghA(bh * me), ghM(bh * se);
    for (auto* b : {&gA, &gM, &ghA, &ghM}) b->poison();
    gpu.part_summary(dp, part, DocStates{}, gA.p, gM.p, ghA.p, ghM.p, nullptr);
    return Maps{gA.download(), gM.download(), ghA.download(), ghM.download()};
  };
  const Maps got = summary(), want = with_env("LASP2_DELTA_CHUNKED", "0", summary);
  const double tol = 5e-3;
  EXPECT_LT(rel_err_f32(got.A, want.A), tol) << "A";
  EXPECT_LT(rel_err_f32(got.M, want.M), tol) << "M";
  if (c.docs != 0) {
    EXPECT_LT(rel_err_f32(got.hA, want.hA), tol) << "head A";
    EXPECT_LT(rel_err_f32(got.hM, want.hM), tol) << "head M";
  } else {
    EXPECT_EQ(got.hA, got.A) << "a part without document starts is its own head";
    EXPECT_EQ(got.hM, got.M) << "a part without document starts is its own head";
  }
  if (c.neg_inf || c.docs != 0) {  // the entering state forgotten: A = 0 exactly
    EXPECT_EQ(delta::testing::max_abs(got.A), 0.0) << "A after a -inf gate or a document start";
  }
  if (!c.neg_inf) {
    std::vector<float> A(bh * me), M(bh * se), hA(bh * me), hM(bh * se);
    delta::delta_cpu_backend().part_summary(hp, part, DocStates{}, A.data(), M.data(), hA.data(), hM.data(),
                                            nullptr);
    EXPECT_LT(rel_err_f32(got.A, A), tol) << "A vs CPU";
    EXPECT_LT(rel_err_f32(got.M, M), tol) << "M vs CPU";
    EXPECT_LT(rel_err_f32(got.hA, hA), tol) << "head A vs CPU";
    EXPECT_LT(rel_err_f32(got.hM, hM), tol) << "head M vs CPU";
  }

  // A E + M entering [290, T) gives the outputs of one forward over [37, T) from E
  std::mt19937 rng(4);
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<float> entering(bh * se);
  for (auto& x : entering) x = normal(rng);
  auto dE = to_device_f32(entering);
  DevBuf<float> gA = to_device_f32(got.A), gM = to_device_f32(got.M), leaving(bh * se);
  gpu.apply_map(gA.p, dE.p, gM.p, bh, spec.dim_k, spec.dim_v, leaving.p, nullptr);
  const TokenRange next{part.end, spec.seqlen}, both{part.begin, spec.seqlen};
  DevTensor o_two(spec.batch, spec.seqlen, spec.heads, spec.dim_v, c.type, Layout{});
  DevTensor o_one(spec.batch, spec.seqlen, spec.heads, spec.dim_v, c.type, Layout{});
  gpu.forward(dp, next, leaving.p, DocStates{}, o_two.mview(), nullptr);
  gpu.forward(dp, both, dE.p, DocStates{}, o_one.mview(), nullptr);
  const auto a = o_two.download(), b = o_one.download();
  double num = 0, den = 0;
  int64_t bad = 0;
  for (int64_t b_ = 0; b_ < spec.batch; ++b_)
    for (int64_t i = 0; i < (next.end - next.begin) * spec.heads * spec.dim_v; ++i) {
      const size_t e = static_cast<size_t>((b_ * spec.seqlen + next.begin) * spec.heads * spec.dim_v + i);
      bad += !std::isfinite(a.v[e]) || !std::isfinite(b.v[e]);
      num = std::max(num, std::abs(a.v[e] - b.v[e]));
      den = std::max(den, std::abs(b.v[e]));
    }
  EXPECT_EQ(bad, 0);
  EXPECT_LT(num / den, 1e-2) << "outputs after the part from A E + M vs one forward";
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCudaChunkedSummary,
                         ::testing::Values(SummaryCase{ScalarType::kBFloat16, 128, false, 2},
                                           SummaryCase{ScalarType::kBFloat16, 128, true, 1},
                                           SummaryCase{ScalarType::kBFloat16, 64, false, 1},
                                           SummaryCase{ScalarType::kFloat16, 64, true, 2},
                                           SummaryCase{ScalarType::kFloat16, 128, false, 1},
                                           SummaryCase{ScalarType::kBFloat16, 128, false, 1, 1},
                                           SummaryCase{ScalarType::kBFloat16, 64, true, 1, 1},
                                           SummaryCase{ScalarType::kFloat16, 128, false, 1, 2}),
                         [](const ::testing::TestParamInfo<SummaryCase>& info) {
                           const auto& c = info.param;
                           return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + "_b" +
                                  std::to_string(c.batch) + (c.neg_inf ? "_neginf" : "") +
                                  (c.docs == 1 ? "_packed" : c.docs == 2 ? "_packed_first" : "");
                         });

}  // namespace
}  // namespace lasp2::testing::delta_cuda
