// The CUDA delta-rule backend against the CPU backend, call by call on the same
// problem (GDN and KDA gates, fp32 and bf16 inputs, d_k = d_v in {64, 128} and odd
// sizes, rows and packed documents with initial / final states, a part that starts
// and ends mid-sequence, Megatron's [T, B, H, D] layout with padded heads), and the
// LASP-2 schedule on one device (one and two parts) against the CPU schedule. The
// CPU backend is itself held to the float64 step-by-step recurrence
// (tests/cpp/delta_rule/).
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <numeric>
#include <sstream>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/delta_backend.h"
#include "delta_rule/delta_family.h"
#include "lasp2/lasp2.h"

namespace lasp2::testing {
namespace {

using delta::DeltaKernelBackend;
using delta::DeltaParams;
using delta::DocStates;
using delta::GateKind;
using delta::testing::DeltaProblem;
using delta::testing::DeltaSpec;

struct DeltaCase {
  GateKind gate;
  bool packed;
  ScalarType type;
  int dk, dv;
  bool strided;  // [T, B, H, D] with padded heads
  int seg_len = 0;  // LASP2_DELTA_SEG_LEN: the walks' segments (0: the backend's choice)
};

// Sets LASP2_DELTA_SEG_LEN for the scope (segments of a few chunks on small problems,
// so that the segment summaries and their composition run).
class SegLenScope {
 public:
  explicit SegLenScope(int seg_len) : set_(seg_len > 0) {
    if (set_) setenv("LASP2_DELTA_SEG_LEN", std::to_string(seg_len).c_str(), 1);
  }
  ~SegLenScope() {
    if (set_) unsetenv("LASP2_DELTA_SEG_LEN");
  }
  SegLenScope(const SegLenScope&) = delete;
  SegLenScope& operator=(const SegLenScope&) = delete;

 private:
  bool set_;
};

std::string case_name(const ::testing::TestParamInfo<DeltaCase>& info) {
  const auto& c = info.param;
  return std::string(c.gate == GateKind::kScalar ? "gdn" : "kda") + (c.packed ? "_packed_" : "_rows_") +
         dtype_name(c.type) + "_dk" + std::to_string(c.dk) + "_dv" + std::to_string(c.dv) +
         (c.strided ? "_strided" : "") + (c.seg_len ? "_seg" + std::to_string(c.seg_len) : "");
}

DeltaSpec spec_for(const DeltaCase& c) {
  DeltaSpec s;
  s.gate_kind = c.gate;
  s.seqlen = 300;
  s.heads = 2;
  s.dim_k = c.dk;
  s.dim_v = c.dv;
  s.chunk_size = 64;
  s.scale = 1.0 / std::sqrt(static_cast<double>(c.dk));
  if (c.packed) {
    s.batch = 1;
    // on and off the 64-token checkpoints and 8-token stretches; one-token documents
    s.doc_starts = {5, 64, 65, 130, 200, 201, 263};
  } else {
    s.batch = 2;
  }
  return s;
}

std::vector<double> as_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// Rounds q, k, v, dO to the element type (so that both backends see the same
// inputs) and scales k to unit-ish norm, as GDN layers l2-normalize k.
void prepare_inputs(DeltaProblem<float>& pr, ScalarType type) {
  const double kscale = 2.0 / std::sqrt(static_cast<double>(pr.spec.dim_k));
  for (auto& x : pr.k) x = static_cast<float>(x * kscale);
  for (auto* vec : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *vec) x = static_cast<float>(round_to(type, x));
}

// GDN with d_k = d_v = d, two heads and 64-token chunks: what the chunked kernels take.
DeltaSpec gdn_spec(int d, int64_t seqlen, int64_t batch) {
  DeltaSpec spec;
  spec.seqlen = seqlen;
  spec.heads = 2;
  spec.batch = batch;
  spec.dim_k = spec.dim_v = d;
  spec.chunk_size = 64;
  spec.scale = 1.0 / std::sqrt(static_cast<double>(d));
  return spec;
}

// max |a - b| / max |b| over tokens [part.begin, part.end) of every batch row of
// [batch][seqlen][row] tensors (row values a token), every value there finite; `what`
// names the tensor in a failure. The chunked-vs-recurrent comparisons (DeltaCudaChunked,
// DeltaCudaDocStates forward and backward) share it.
double rel_in_part(const std::vector<double>& a, const std::vector<double>& b, TokenRange part, int64_t batch,
                   int64_t seqlen, int64_t row, const char* what) {
  double num = 0, den = 0;
  int64_t bad = 0;
  for (int64_t bi = 0; bi < batch; ++bi)
    for (int64_t i = (bi * seqlen + part.begin) * row; i < (bi * seqlen + part.end) * row; ++i) {
      if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
        ++bad;
        continue;
      }
      num = std::max(num, std::abs(a[i] - b[i]));
      den = std::max(den, std::abs(b[i]));
    }
  EXPECT_EQ(bad, 0) << what << ": not finite inside the part";
  return den > 0 ? num / den : num;
}

// -inf log gates (the state forgotten) at `tokens` of every row and head.
void forget_at(DeltaProblem<float>& pr, std::initializer_list<int64_t> tokens) {
  const DeltaSpec& spec = pr.spec;
  for (int64_t b = 0; b < spec.batch; ++b)
    for (int64_t t : tokens)
      for (int64_t h = 0; h < spec.heads; ++h) pr.g[(b * spec.seqlen + t) * spec.heads + h] = -INFINITY;
}

std::vector<float> zeros(size_t n) { return std::vector<float>(n, 0.f); }

DevBuf<float> zeroed(size_t n) {
  DevBuf<float> d(std::max<size_t>(n, 1));
  cuda_ok(cudaMemset(d.p, 0, d.n * sizeof(float)), "memset");
  return d;
}

// Random entering states and leaving-state gradients (normal, sd 0.3), `floats` each,
// on the host and on the device.
struct EdgeStates {
  std::vector<float> entering, leaving;
  DevBuf<float> d_entering, d_leaving;
};
EdgeStates random_edge_states(uint32_t seed, int64_t floats) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<float> entering(floats), leaving(floats);
  for (auto& x : entering) x = normal(rng);
  for (auto& x : leaving) x = normal(rng);
  DevBuf<float> d_entering = to_device_f32(entering), d_leaving = to_device_f32(leaving);
  return {std::move(entering), std::move(leaving), std::move(d_entering), std::move(d_leaving)};
}

// A backward call's results read back: dq, dk, dv (NaN where not written), dg, dbeta,
// the entering-state gradient, and entering_dstate's (dE_head).
struct Grads {
  std::vector<double> dq, dk, dv;
  std::vector<float> dg, db, dE, dE_head;
};

// The outputs of a backward call on pr's problem: dq, dk, dv in `type` (poisoned), dg
// and dbeta zeroed, and the entering-state gradient (`state_floats`).
struct BackwardBuffers {
  DevTensor dq, dk, dv;
  DevBuf<float> dg, db, dE;
  BackwardBuffers(const DeltaProblem<float>& pr, ScalarType type, Layout lay, int64_t state_floats)
      : dq(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        dk(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        dv(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, type, lay),
        dg(zeroed(pr.g.size())),
        db(zeroed(pr.beta.size())),
        dE(state_floats) {}
  // All of Grads but dE_head.
  void download(Grads& r) const {
    r.dq = dq.download().v;
    r.dk = dk.download().v;
    r.dv = dv.download().v;
    r.dg = dg.download();
    r.db = db.download();
    r.dE = dE.download();
  }
};

class DeltaCuda : public ::testing::TestWithParam<DeltaCase> {};

TEST_P(DeltaCuda, MatchesCpuBackend) {
  LASP2_SKIP_WITHOUT_CUDA();
  const DeltaCase c = GetParam();
  const SegLenScope seg_scope(c.seg_len);
  DeltaProblem<float> pr(spec_for(c), 11);
  prepare_inputs(pr, c.type);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  const Layout lay{c.strided, c.strided ? 8 : 0};
  DeviceProblem dev(pr, c.type, lay);
  const DeltaParams& dp = dev.p;
  const DeltaKernelBackend& cpu = delta::delta_cpu_backend();
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  ASSERT_EQ(gpu.device(), Device::kCUDA);

  const bool bf16 = c.type != ScalarType::kFloat32;
  const double tol_io = bf16 ? 1e-2 : 1e-4;  // outputs in the input dtype
  const double tol_f32 = bf16 ? 2e-4 : 1e-4;  // fp32 states and maps from the same inputs
  const TokenRange part{37, s.seqlen - 20};
  const int64_t bh = hp.bh(), se = hp.state_elems(), me = hp.map_elems();
  const int64_t N = s.num_docs(), D = N * s.heads * se;

  const EdgeStates edge = random_edge_states(5, bh * se);
  const std::vector<float>& entering = edge.entering;
  const std::vector<float>& leaving = edge.leaving;
  const float *d_entering = edge.d_entering.p, *d_leaving = edge.d_leaving.p;
  auto d_initial_states = to_device_f32(pr.initial), d_final_dstate = to_device_f32(pr.final_dstate);

  // forward
  {
    std::vector<float> o(pr.v.size(), 0.f);
    DocStates doc;
    doc.initial = pr.initial.data();
    cpu.forward(hp, part, entering.data(), doc, {o.data(), pr.strides(s.dim_v)}, nullptr);
    DevTensor og(s.batch, s.seqlen, s.heads, s.dim_v, c.type, lay);
    DocStates ddoc;
    ddoc.initial = d_initial_states.p;
    gpu.forward(dp, part, d_entering, ddoc, og.mview(), nullptr);
    const auto rb = og.download();
    const Compare cmp = compare_rows(rb.v, rb.written, o, s.batch, s.seqlen, s.heads, s.dim_v,
                                     part.begin, part.end);
    EXPECT_LT(cmp.rel, tol_io) << "o";
    EXPECT_EQ(cmp.missing, 0) << "o";
    EXPECT_EQ(cmp.clobbered, 0) << "o";
    EXPECT_EQ(rb.pad_clobbered, 0) << "o";
  }

  // part summary (with the finals of the documents inside the part)
  {
    std::vector<float> A(bh * me), M(bh * se), hA(bh * me), hM(bh * se), finals = zeros(D);
    DocStates doc;
    doc.initial = pr.initial.data();
    doc.finals = finals.data();
    cpu.part_summary(hp, part, doc, A.data(), M.data(), hA.data(), hM.data(), nullptr);
    // GDN and KDA in 16-bit with d = 64 / 128 run the chunk maps, whose state products take
    // 16-bit operands (delta_chunk.h, kda_chunk.h); GDN's packed documents' M and end states
    // come from the chunked state pass carrying their initial states (delta_chunk_docs.h),
    // KDA's packed documents with states stay on the recurrent walk
    const bool chunked = bf16 && c.dk == c.dv && (c.dk == 64 || c.dk == 128) &&
                         (c.gate == GateKind::kScalar || !c.packed);
    const double tol_map = chunked ? 5e-3 : tol_f32, tol_finals = chunked ? 1e-2 : tol_f32;
    DevBuf<float> gA(A.size()), gM(M.size()), ghA(hA.size()), ghM(hM.size());
    DevBuf<float> gfin = zeroed(D);
    DocStates ddoc;
    ddoc.initial = d_initial_states.p;
    ddoc.finals = gfin.p;
    gpu.part_summary(dp, part, ddoc, gA.p, gM.p, ghA.p, ghM.p, nullptr);
    EXPECT_LT(rel_err_f32(gA.download(), A), tol_map) << "A";
    EXPECT_LT(rel_err_f32(gM.download(), M), c.packed ? tol_finals : tol_map) << "M";
    EXPECT_LT(rel_err_f32(ghA.download(), hA), tol_map) << "head A";
    EXPECT_LT(rel_err_f32(ghM.download(), hM), tol_map) << "head M";
    const std::vector<float> gf = gfin.download();
    EXPECT_LT(rel_err_f32(std::vector<float>(gf.begin(), gf.begin() + D), finals), tol_finals) << "finals";
    if (c.packed) {
      const std::vector<float> a = gA.download();
      EXPECT_EQ(delta::testing::max_abs(a), 0.0) << "a part with a document start has A = 0 exactly";
    }
  }

  // gradient of the entering state from the part's own outputs
  {
    std::vector<float> E(bh * se);
    cpu.entering_dstate(hp, part, pr.dout_view(), E.data(), nullptr);
    DevBuf<float> gE(E.size());
    gE.poison();
    gpu.entering_dstate(dp, part, dev.dout.cview(), gE.p, nullptr);
    // GDN and KDA in 16-bit with d = 64 / 128 run the chunked reverse pass, whose state
    // products take 16-bit operands (delta_chunk.h, kda_chunk.h)
    const bool chunked = bf16 && c.dk == c.dv && (c.dk == 64 || c.dk == 128);
    EXPECT_LT(rel_err_f32(gE.download(), E), chunked ? 5e-3 : tol_f32) << "entering dstate";
  }

  // backward with an entering state, a leaving-state gradient and document states
  {
    const int64_t gk = c.gate == GateKind::kPerKey ? s.dim_k : 1;
    std::vector<float> dq(pr.q.size(), 0.f), dk(pr.k.size(), 0.f), dv(pr.v.size(), 0.f);
    std::vector<float> dg(pr.g.size(), 0.f), db(pr.beta.size(), 0.f), dI = zeros(D), dE(bh * se);
    DocStates doc;
    doc.initial = pr.initial.data();
    doc.final_dstate = pr.final_dstate.data();
    doc.d_initial = dI.data();
    cpu.backward(hp, part, pr.dout_view(), entering.data(), leaving.data(), doc,
                 {dq.data(), pr.strides(s.dim_k)}, {dk.data(), pr.strides(s.dim_k)},
                 {dv.data(), pr.strides(s.dim_v)}, dg.data(), db.data(), dE.data(), nullptr);

    BackwardBuffers g(pr, c.type, lay, bh * se);
    DevBuf<float> gdI = zeroed(D);
    DocStates ddoc;
    ddoc.initial = d_initial_states.p;
    ddoc.final_dstate = d_final_dstate.p;
    ddoc.d_initial = gdI.p;
    gpu.backward(dp, part, dev.dout.cview(), d_entering, d_leaving, ddoc, g.dq.mview(), g.dk.mview(),
                 g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
    for (auto [name, t, want, dim] :
         {std::tuple{"dq", &g.dq, &dq, s.dim_k}, {"dk", &g.dk, &dk, s.dim_k}, {"dv", &g.dv, &dv, s.dim_v}}) {
      const auto rb = t->download();
      const Compare cmp =
          compare_rows(rb.v, rb.written, *want, s.batch, s.seqlen, s.heads, dim, part.begin, part.end);
      EXPECT_LT(cmp.rel, tol_io) << name;
      EXPECT_EQ(cmp.missing, 0) << name;
      EXPECT_EQ(cmp.clobbered, 0) << name;
    }
    // dg, dbeta: the sums of many products; the bf16 outputs above bound their inputs.
    // GDN in 16 bits at d = 64 / 128 takes the chunked backward (packed documents with
    // their states: delta_chunk_docs.h), KDA rows in 16 bits KDA's (kda_chunk_bwd.h): their
    // state products take 16-bit operands (bfloat16: 8 mantissa bits; float16 within 2e-3)
    const bool shape16 = bf16 && c.dk == c.dv && (c.dk == 64 || c.dk == 128);
    const bool chunked16 = shape16 && (c.gate == GateKind::kScalar || !c.packed);
    const double tol_sum = chunked16 ? (c.type == ScalarType::kBFloat16 ? 1e-2 : 2e-3) : bf16 ? 1e-3 : 2e-4;
    EXPECT_LT(rel_err_f32(g.dg.download(), dg), tol_sum) << "dg";
    EXPECT_LT(rel_err_f32(g.db.download(), db), tol_sum) << "dbeta";
    const std::vector<float> gi = gdI.download();
    EXPECT_LT(rel_err_f32(std::vector<float>(gi.begin(), gi.begin() + D), dI), tol_sum) << "d_initial";
    EXPECT_LT(rel_err_f32(g.dE.download(), dE), tol_sum) << "d_entering";
    (void)gk;
  }
}

std::vector<DeltaCase> delta_cases() {
  std::vector<DeltaCase> out;
  for (int seg : {0, 64})
    for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
      for (bool packed : {false, true}) {
        out.push_back({gate, packed, ScalarType::kFloat32, 64, 64, false, seg});
        out.push_back({gate, packed, ScalarType::kBFloat16, 128, 128, !packed, seg});
        out.push_back({gate, packed, ScalarType::kFloat32, 128, 128, false, seg});
        out.push_back({gate, packed, ScalarType::kFloat16, 64, 64, false, seg});
        out.push_back({gate, packed, ScalarType::kFloat32, 40, 24, !packed, seg});
      }
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, DeltaCuda, ::testing::ValuesIn(delta_cases()), case_name);

// ---- the chunked tensor-core kernels (delta_chunk.h) against the token-recurrent ones ----
// GDN in bf16 / fp16, d = 64 and 128, a part that starts and ends mid-chunk: packed
// documents without document states (starts inside chunks, on a chunk's first token and
// one-token documents) and -inf log gates (the state forgotten mid-chunk), with an
// entering state and a leaving-state gradient. The reference is the same backend with
// LASP2_DELTA_CHUNKED=0 (the recurrent kernels, held to the CPU backend above; the CPU
// forward's chunk form has no -inf gates). Without -inf gates the chunked results are
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
  DeviceProblem dev(pr, c.type, lay);
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

// The largest |a - b| over words written in both runs; a word written in one run only
// (NaN in the other, the buffers start as NaN) counts as infinitely far.
double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return INFINITY;  // written in one run only
    if (!std::isnan(a[i])) m = std::max(m, std::abs(a[i] - b[i]));
  }
  return m;
}

// The problem of the kept-work tests below (DeltaCudaKeptPrep, DeltaCudaForwardKept): bf16,
// d_k = d_v = d, 300 tokens, rows (batch 2) or packed documents (batch 1), on the device;
// the part [37, 280) (starting inside a chunk, four chunks), with random entering states
// and leaving-state gradients.
struct KeptWorkProblem {
  DeltaProblem<float> pr;
  Layout lay{false, 0};
  DeviceProblem dev;
  const DeltaParams& dp = dev.p;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  TokenRange part{37, pr.spec.seqlen - 20};
  int64_t se = dp.bh() * dp.state_elems();
  EdgeStates edge;

  KeptWorkProblem(GateKind gate, int d, bool packed, uint32_t seed, uint32_t edge_seed)
      : pr(prepared(gate, d, packed, seed)), dev(pr, ScalarType::kBFloat16, lay),
        edge(random_edge_states(edge_seed, se)) {}

 private:
  static DeltaProblem<float> prepared(GateKind gate, int d, bool packed, uint32_t seed) {
    DeltaSpec spec = gdn_spec(d, 300, packed ? 1 : 2);
    spec.gate_kind = gate;
    if (packed) spec.doc_starts = {5, 64, 65, 130, 201};
    DeltaProblem<float> pr(spec, seed);
    prepare_inputs(pr, ScalarType::kBFloat16);
    return pr;
  }
};

// The words of two equally long arrays whose bits differ.
template <typename V>
int64_t bits_differ(const std::vector<V>& x, const std::vector<V>& y) {
  EXPECT_EQ(x.size(), y.size());
  int64_t n = 0;
  for (size_t e = 0; e < std::min(x.size(), y.size()); ++e) n += std::memcmp(&x[e], &y[e], sizeof(V)) != 0;
  return n;
}

// A backward that read kept work against the one that recomputed it: the same kernels on
// the same inputs, so dq, dk, dv equal bit for bit, and so do dg and dbeta (since session
// 17 the GDN chunk backward sums them in a fixed order, the ordered form; KDA's chunked
// backward sums them in slots without atomics); the entering-state gradients within 1e-5.
void expect_same_backward(const Grads& got, const Grads& want) {
  EXPECT_EQ(max_abs_diff(got.dq, want.dq), 0.0) << "dq";
  EXPECT_EQ(max_abs_diff(got.dk, want.dk), 0.0) << "dk";
  EXPECT_EQ(max_abs_diff(got.dv, want.dv), 0.0) << "dv";
  EXPECT_EQ(bits_differ(got.dg, want.dg), 0) << "dg";
  EXPECT_EQ(bits_differ(got.db, want.db), 0) << "dbeta";
  EXPECT_LT(rel_err_f32(got.dE, want.dE), 1e-5) << "d_entering";
  EXPECT_LT(rel_err_f32(got.dE_head, want.dE_head), 1e-6) << "entering dstate";
}

// ---- entering_dstate_keeping + backward_reusing (what the SP schedules run, through
// DeltaFamily) against entering_dstate + backward: the chunked kernels skip prep and
// rprep in the second call and must give the same results; the CPU backend keeps nothing.
TEST(DeltaCudaKeptPrep, BackwardReusingMatchesBackward) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const bool packed : {false, true}) {
    SCOPED_TRACE(packed ? "packed" : "rows");
    const KeptWorkProblem kp(GateKind::kScalar, 64, packed, 31, 4);
    const DeltaParams& dp = kp.dp;
    const DeltaKernelBackend& gpu = kp.gpu;
    const TokenRange part = kp.part;
    const int64_t se = kp.se;

    auto run = [&](bool keep) {
      Grads r;
      DevBuf<float> gE(se);
      BackwardBuffers g(kp.pr, ScalarType::kBFloat16, kp.lay, se);
      const delta::BackwardPlan plan{g.dq.mview(), g.dk.mview(), g.dv.mview(), false};
      std::unique_ptr<delta::KeptPartWork> kept;
      if (keep) {
        kept = gpu.entering_dstate_keeping(dp, part, kp.dev.dout.cview(), plan, gE.p, nullptr);
        EXPECT_NE(kept, nullptr) << "the chunked kernels keep prep and rprep";
        // a backward that will take the token walks (a misaligned dq view) gets nothing kept
        delta::BackwardPlan walks = plan;
        walks.dq.data = static_cast<char*>(walks.dq.data) + 2;
        DevBuf<float> unused(se);
        EXPECT_EQ(gpu.entering_dstate_keeping(dp, part, kp.dev.dout.cview(), walks, unused.p, nullptr), nullptr)
            << "nothing is kept for a backward the chunked kernels do not take";
      } else {
        gpu.entering_dstate(dp, part, kp.dev.dout.cview(), gE.p, nullptr);
      }
      gpu.backward_reusing(kept.get(), dp, part, kp.dev.dout.cview(), kp.edge.d_entering.p, kp.edge.d_leaving.p,
                           DocStates{}, g.dq.mview(), g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
      kept.reset();
      g.download(r);
      r.dE_head = gE.download();
      return r;
    };
    const Grads want = run(false), got = run(true);
    expect_same_backward(got, want);
  }
  DeltaProblem<float> small(DeltaSpec{}, 1);
  std::vector<float> E(small.params().bh() * small.params().state_elems());
  EXPECT_EQ(delta::delta_cpu_backend().entering_dstate_keeping(small.params(), {0, small.spec.seqlen},
                                                               small.dout_view(), delta::BackwardPlan{}, E.data(),
                                                               nullptr),
            nullptr)
      << "the CPU backend keeps nothing";
}

// ---- forward_keeping + the backward reading what it kept (GDN: prep's w, meta, T; KDA:
// prep's w, qg, kd, P, eL, T; both: the state pass's v_new and chunk states,
// DeltaFamily::with_forward_kept): against forward + entering_dstate + backward, which
// recompute them. The same kernels on the same inputs, so o, dq, dk, dv are equal bit for
// bit (dg, dbeta: up to the order of shared-memory atomics). Both backward forms: the
// one-device one (backward_reusing alone) and the SP schedules' (entering_dstate_keeping,
// then backward_reusing); a part of four chunks with an entering state and a
// leaving-state gradient, rows and packed documents (no per-document states), d = 64 and
// 128. And the kept buffer is read: zeroed between the forward and the backward, the
// gradients (and, KDA's SP form, the entering state's gradient) change.

// Whether the device's shared memory takes the chunked backward of the gate kind at d.
bool chunk_backward_fits_device(GateKind gate, int d) {
  int dev = 0, optin = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "smem");
  return optin >= (gate == GateKind::kPerKey ? delta::gpu::kda_backward_smem_bytes(d)
                                             : delta::gpu::chunk_backward_smem_bytes(d));
}

// The kept floats of a part of `chunks` chunks, counted piece by piece (16-bit pieces are
// half their element count in floats).
int64_t want_kept_floats(GateKind gate, int64_t bh, int64_t chunks, int64_t d) {
  const int64_t c = bh * chunks, rows = c * 64;
  const int64_t shared = rows * d / 2 + c * d * d / 2;  // v_new, chunk states
  if (gate == GateKind::kScalar) return shared + rows * d / 2 + 2 * rows + c * 64 * 64 / 2;  // w, meta, T
  return shared + 3 * rows * d / 2 + 2 * (c * 64 * 64 / 2) + c * d;  // w, qg, kd; P, T; eL
}

TEST(DeltaCudaForwardKept, BackwardFromForwardMatchesRecomputing) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
    for (const int d : {64, 128}) {
      for (const bool packed : {false, true}) {
        const bool kda = gate == GateKind::kPerKey;
        SCOPED_TRACE(std::string(kda ? "kda " : "gdn ") + (packed ? "packed" : "rows") + " d=" + std::to_string(d));
        const KeptWorkProblem kp(gate, d, packed, 37, 5);
        const DeltaSpec& spec = kp.pr.spec;
        const DeltaParams& dp = kp.dp;
        const DeltaKernelBackend& gpu = kp.gpu;
        const TokenRange part = kp.part;
        const int64_t se = kp.se;
        const int64_t chunks = (part.length() + 63) / 64;
        if (!chunk_backward_fits_device(gate, d)) {  // sm_80 at d = 128: the token walks, nothing kept
          EXPECT_EQ(gpu.forward_kept_floats(dp, part), 0);
          continue;
        }
        const int64_t want_floats = want_kept_floats(gate, dp.bh(), chunks, d);
        ASSERT_EQ(gpu.forward_kept_floats(dp, part), want_floats) << "the kept pieces";

        // mode 0: recompute; 1: one-device form; 2: the SP schedules' form; 3 and 4: 1 and
        // 2 with the kept buffer zeroed between the forward and the backward
        auto run = [&](int mode, std::vector<double>& o_out) {
          Grads r;
          DevTensor o(spec.batch, spec.seqlen, spec.heads, d, ScalarType::kBFloat16, kp.lay);
          DevBuf<float> kept(want_floats), gE(se);
          BackwardBuffers g(kp.pr, ScalarType::kBFloat16, kp.lay, se);
          if (mode == 0) {
            gpu.forward(dp, part, kp.edge.d_entering.p, DocStates{}, o.mview(), nullptr);
          } else {
            gpu.forward_keeping(dp, part, kp.edge.d_entering.p, DocStates{}, o.mview(), kept.p, nullptr);
          }
          if (mode >= 3) cuda_ok(cudaMemset(kept.p, 0, want_floats * sizeof(float)), "memset");
          std::unique_ptr<delta::KeptPartWork> work;
          if (mode == 2 || mode == 4) {
            delta::BackwardPlan plan{g.dq.mview(), g.dk.mview(), g.dv.mview(), false};
            plan.forward_kept = kept.p;
            work = gpu.entering_dstate_keeping(dp, part, kp.dev.dout.cview(), plan, gE.p, nullptr);
            // GDN keeps rprep's r for the backward; KDA's rprep runs inside its reverse pass
            EXPECT_EQ(work != nullptr, !kda);
          } else {
            gpu.entering_dstate(dp, part, kp.dev.dout.cview(), gE.p, nullptr);
          }
          gpu.backward_reusing(work.get(), dp, part, kp.dev.dout.cview(), kp.edge.d_entering.p, kp.edge.d_leaving.p,
                               DocStates{}, g.dq.mview(), g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p, g.dE.p,
                               nullptr, mode == 0 ? nullptr : kept.p);
          work.reset();
          g.download(r);
          r.dE_head = gE.download();
          o_out = o.download().v;
          return r;
        };
        std::vector<double> o_want, o_one, o_sp, o_z1, o_z2;
        const Grads want = run(0, o_want), one = run(1, o_one), sp = run(2, o_sp);
        for (const auto& [name, got, o_got] : {std::tuple{"one device", &one, &o_one}, {"sp", &sp, &o_sp}}) {
          SCOPED_TRACE(name);
          EXPECT_EQ(max_abs_diff(*o_got, o_want), 0.0) << "o";
          expect_same_backward(*got, want);
        }
        const Grads z1 = run(3, o_z1), z2 = run(4, o_z2);
        EXPECT_GT(max_abs_diff(z1.dq, want.dq), 0.0) << "the one-device backward reads the kept buffer";
        EXPECT_GT(max_abs_diff(z2.dq, want.dq), 0.0) << "the SP form's backward reads the kept buffer";
        if (kda) EXPECT_GT(rel_err_f32(z2.dE_head, want.dE_head), 1e-3) << "KDA's entering_dstate reads the kept prep";
      }
    }
  // nothing kept where the chunked kernels do not run: fp32, d = 32, the CPU backend,
  // and each knob (LASP2_DELTA_KEEP_FORWARD=0 both families, LASP2_DELTA_KDA_KEEP_FORWARD=0 KDA)
  DeltaProblem<float> small(gdn_spec(64, 100, 1), 1);
  const DeltaParams hp = small.params();
  EXPECT_EQ(delta::delta_cpu_backend().forward_kept_floats(hp, {0, 100}), 0);
  const DeltaKernelBackend& cuda = delta::delta_backend_for(Device::kCUDA);
  DeltaParams f32 = hp;
  f32.dtype = ScalarType::kFloat32;
  f32.gate_dtype = ScalarType::kFloat32;
  EXPECT_EQ(cuda.forward_kept_floats(f32, {0, 100}), 0);
  DeltaParams gdn = f32, kda = f32;
  gdn.dtype = kda.dtype = ScalarType::kBFloat16;
  kda.gate_kind = GateKind::kPerKey;
  EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), want_kept_floats(GateKind::kPerKey, kda.bh(), 2, 64));
  EXPECT_EQ(cuda.forward_kept_floats(gdn, {0, 100}), want_kept_floats(GateKind::kScalar, gdn.bh(), 2, 64));
  DeltaParams d32 = kda;
  d32.dim_k = d32.dim_v = 32;
  EXPECT_EQ(cuda.forward_kept_floats(d32, {0, 100}), 0);
  {
    const EnvGuard off("LASP2_DELTA_KDA_KEEP_FORWARD", "0");
    EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), 0);
    EXPECT_GT(cuda.forward_kept_floats(gdn, {0, 100}), 0);
  }
  {
    const EnvGuard off("LASP2_DELTA_KEEP_FORWARD", "0");
    EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), 0);
    EXPECT_EQ(cuda.forward_kept_floats(gdn, {0, 100}), 0);
  }
  for (const char* knob : {"LASP2_DELTA_KDA_CHUNKED", "LASP2_DELTA_KDA_CHUNKED_BWD"}) {
    const EnvGuard off(knob, "0");  // the KDA chunked kernels off: nothing to keep for them
    EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), 0) << knob;
  }
}

// The LASP-2 schedule through DeltaFamily (bf16), with the forward's kept buffer
// (with_forward_kept) and without: equal outputs and gradients (o, dq, dk, dv bit for
// bit). GDN at d = 64, KDA at d = 64 and 128; rows with initial states and final-state
// gradients (the general schedule: prefix states enter every part) over one and two parts
// a rank, on one device and on two ranks (threads with a device-memory AllGather), and
// packed documents without states (the one-device form, one part).
struct ScheduleOut {
  std::vector<std::vector<double>> oqkv;  // o, dq, dk, dv
  std::vector<float> dg, db, dI;
};

ScheduleOut run_schedule(const DeltaProblem<float>& pr, const PartLayout& layout, Communicator* comm, bool keep) {
  const DeltaSpec& spec = pr.spec;
  const bool packed = spec.packed();
  const Layout lay{false, 0};
  DeviceProblem dev(pr, ScalarType::kBFloat16, lay);
  const DeltaParams& dp = dev.p;
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  const int64_t S = dp.bh() * dp.state_elems();
  const int64_t kept_floats = delta::DeltaFamily::forward_kept_floats(be, dp, layout);
  EXPECT_GT(kept_floats, 0);
  DevBuf<float> initial = to_device_f32(std::vector<float>(pr.initial.begin(), pr.initial.begin() + S));
  DevBuf<float> final_grad = to_device_f32(std::vector<float>(pr.final_dstate.begin(), pr.final_dstate.begin() + S));
  std::vector<DevBuf<float>> bufs;
  bufs.reserve(16);
  auto alloc = [&](int64_t floats) {
    bufs.emplace_back(static_cast<size_t>(std::max<int64_t>(floats, 1)));
    return bufs.back().p;
  };
  DevTensor o(spec.batch, spec.seqlen, spec.heads, spec.dim_v, ScalarType::kBFloat16, lay);
  BackwardBuffers g(pr, ScalarType::kBFloat16, lay, S);
  DevBuf<float> dI(S), kept(kept_floats);
  float* fold = alloc(S);
  delta::DeltaFamily fwd(be, dp, o.mview(), fold);
  if (keep) fwd.with_forward_kept(kept.p, layout);
  const SummaryShape sh = fwd.shape();
  const Lasp2Saved saved{alloc(Lasp2Saved::local_records_floats(sh, layout)),
                         alloc(Lasp2Saved::prefix_states_floats(sh, layout)), alloc(Lasp2Saved::maps_floats(sh, layout)),
                         alloc(Lasp2Saved::head_maps_floats(sh, layout, false) + 1)};
  SequenceStates seq;
  if (!packed) seq.initial = initial.p;
  cuda_ok(cudaDeviceSynchronize(), "uploads");
  lasp2_forward(fwd, comm, layout, saved, seq, alloc(lasp2_forward_workspace_bytes(fwd, layout, seq) / 4 + 2),
                Lasp2Options{}, nullptr);
  const delta::DeltaGrads grads{dev.dout.cview(), g.dq.mview(), g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p};
  delta::DeltaFamily bwd(be, dp, grads, fold);
  if (keep) bwd.with_forward_kept(kept.p, layout);
  if (!packed) {
    seq.final_grad = final_grad.p;
    seq.initial_grad = dI.p;
  }
  lasp2_backward(bwd, comm, layout, saved, seq, alloc(lasp2_backward_workspace_bytes(bwd, layout, seq) / 4 + 2),
                 nullptr);
  cuda_ok(cudaDeviceSynchronize(), "schedule");
  return {{o.download().v, g.dq.download().v, g.dk.download().v, g.dv.download().v},
          g.dg.download(),
          g.db.download(),
          packed ? std::vector<float>{} : dI.download()};
}

void expect_schedules_equal(const ScheduleOut& got, const ScheduleOut& want) {
  const char* names[] = {"o", "dq", "dk", "dv"};
  for (int i = 0; i < 4; ++i) EXPECT_EQ(max_abs_diff(got.oqkv[i], want.oqkv[i]), 0.0) << names[i];
  EXPECT_LT(rel_err_f32(got.dg, want.dg), 1e-5) << "dg";
  EXPECT_LT(rel_err_f32(got.db, want.db), 1e-5) << "dbeta";
  if (!want.dI.empty()) EXPECT_LT(rel_err_f32(got.dI, want.dI), 1e-5) << "d_initial";
}

TEST(DeltaCudaForwardKept, ScheduleMatchesRecomputing) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const auto& gd : {std::pair{GateKind::kScalar, 64}, {GateKind::kPerKey, 64}, {GateKind::kPerKey, 128}}) {
    const GateKind gate = gd.first;  // plain names: the lambdas below capture them
    const int d = gd.second;
    const std::string family = gate == GateKind::kPerKey ? "kda" : "gdn";
    if (!chunk_backward_fits_device(gate, d)) {
      std::printf("[ skipped  ] %s d=%d: the device's shared memory does not take its chunked backward\n",
                  family.c_str(), d);
      continue;
    }
    auto spec_of = [&](bool packed, int64_t seqlen) {
      DeltaSpec spec = gdn_spec(d, seqlen, packed ? 1 : 2);
      spec.gate_kind = gate;
      if (packed) spec.doc_starts = {5, 64, 65, 130, 201};
      return spec;
    };
    for (const auto& [packed, parts] : {std::pair{false, 1}, {false, 2}, {true, 1}}) {
      SCOPED_TRACE(family + " d=" + std::to_string(d) + (packed ? " packed" : " rows") +
                   " parts=" + std::to_string(parts));
      DeltaProblem<float> pr(spec_of(packed, 320), 41);
      prepare_inputs(pr, ScalarType::kBFloat16);
      const PartLayout layout{1, 0, parts};
      expect_schedules_equal(run_schedule(pr, layout, nullptr, true), run_schedule(pr, layout, nullptr, false));
    }
    // two ranks, one part each (LASP-2's AllGather between them): each rank's own slice
    // (seed 41 + rank), the sequences' initial states and final-state gradients rank 0's
    const DeltaProblem<float> first(spec_of(false, 200), 41);
    run_device_ranks(2, [&](int rank, DeviceThreadCommunicator& comm) {
      SCOPED_TRACE(family + " d=" + std::to_string(d) + " rank " + std::to_string(rank) + " of 2");
      DeltaProblem<float> pr(spec_of(false, 200), 41 + rank);
      pr.initial = first.initial;
      pr.final_dstate = first.final_dstate;
      prepare_inputs(pr, ScalarType::kBFloat16);
      const PartLayout layout{2, rank, 1};
      const ScheduleOut want = run_schedule(pr, layout, &comm, false);
      expect_schedules_equal(run_schedule(pr, layout, &comm, true), want);
    });
  }
}

TEST(DeltaCudaCombine, ApplyMapMatchesCpuAndMayAlias) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t bh = 3, dk = 128, dv = 96;
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::vector<float> A(bh * dk * dk), x(bh * dk * dv), y(bh * dk * dv);
  for (auto* v : {&A, &x, &y})
    for (auto& e : *v) e = normal(rng);
  const auto& cpu = delta::delta_cpu_backend();
  const auto& gpu = delta::delta_backend_for(Device::kCUDA);
  std::vector<float> out(x.size()), out_t = y;
  cpu.apply_map(A.data(), x.data(), y.data(), bh, dk, dv, out.data(), nullptr);
  cpu.apply_map_transposed_add(A.data(), x.data(), bh, dk, dv, out_t.data(), nullptr);
  auto gA = to_device_f32(A), gx = to_device_f32(x), gy = to_device_f32(y);
  gpu.apply_map(gA.p, gx.p, gy.p, bh, dk, dv, gx.p, nullptr);  // out aliases x
  EXPECT_LT(rel_err_f32(gx.download(), out), 1e-5);
  auto gx2 = to_device_f32(x);
  gpu.apply_map_transposed_add(gA.p, gx2.p, bh, dk, dv, gy.p, nullptr);
  EXPECT_LT(rel_err_f32(gy.download(), out_t), 1e-5);
  gpu.add(gx2.p, gx2.p, static_cast<int64_t>(x.size()), nullptr);
  std::vector<float> twice(x);
  for (auto& e : twice) e *= 2;
  EXPECT_LT(rel_err_f32(gx2.download(), twice), 1e-7);
}

TEST(DeltaCudaChecks, RejectsWhatTheKernelsDoNotTake) {
  LASP2_SKIP_WITHOUT_CUDA();
  DeltaSpec s;
  s.dim_k = 192;
  s.dim_v = 64;
  DeltaProblem<float> pr(s);
  DeltaParams p = pr.params();
  const auto& gpu = delta::delta_backend_for(Device::kCUDA);
  EXPECT_THROW(gpu.forward(p, {0, s.seqlen}, nullptr, {}, {nullptr, {}}, nullptr), Error);
  p.dim_k = 64;
  p.gate_dtype = ScalarType::kFloat64;
  EXPECT_THROW(gpu.forward(p, {0, s.seqlen}, nullptr, {}, {nullptr, {}}, nullptr), Error);
}

// The LASP-2 schedule on one device (one part, and the balanced split's two parts)
// with the CUDA backend against the same schedule with the CPU backend.
struct ScheduleCase {
  GateKind gate;
  bool packed;
  int parts;
  int seg_len = 0;
};

class DeltaCudaSchedule : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(DeltaCudaSchedule, MatchesCpuSchedule) {
  LASP2_SKIP_WITHOUT_CUDA();
  const ScheduleCase c = GetParam();
  const SegLenScope seg_scope(c.seg_len);
  DeltaCase dc{c.gate, c.packed, ScalarType::kFloat32, 64, 64, false};
  DeltaProblem<float> pr(spec_for(dc), 13);
  prepare_inputs(pr, ScalarType::kFloat32);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  DeviceProblem dev(pr, ScalarType::kFloat32, Layout{});
  const PartLayout layout{1, 0, c.parts};
  SequenceStates seqs;
  if (c.packed) {
    seqs.count = s.num_docs();
    const int64_t n = s.seqlen / c.parts;
    for (int g = 0; g < c.parts; ++g) {
      int64_t head = -1;
      for (int64_t t = g * n; t < (g + 1) * n; ++t)
        if (pr.doc_start[t]) {
          head = pr.doc_id[t] - 1;
          break;
        }
      seqs.head_doc.push_back(head);
    }
  }
  const int64_t D = s.num_docs() * s.heads * hp.state_elems();

  // The generic LASP-2 schedule over DeltaFamily on one device with `parts` parts, forward
  // then backward; buffers come from `alloc` (host vectors or device buffers).
  auto run = [&](const DeltaKernelBackend& be, const DeltaParams& p, MutView o, const delta::DeltaGrads& grads,
                 const float* initial, float* finals, const float* final_grad, float* d_initial,
                 auto&& alloc) {
    float* fold = alloc(p.bh() * p.state_elems());
    const delta::DeltaFamily fwd(be, p, o, fold);
    const SummaryShape sh = fwd.shape();
    const Lasp2Saved saved{alloc(Lasp2Saved::local_records_floats(sh, layout)),
                           alloc(Lasp2Saved::prefix_states_floats(sh, layout)),
                           alloc(Lasp2Saved::maps_floats(sh, layout)),
                           alloc(Lasp2Saved::head_maps_floats(sh, layout, c.packed) + 1)};
    SequenceStates seq = seqs;
    seq.initial = initial;
    seq.final_state = finals;
    lasp2_forward(fwd, nullptr, layout, saved, seq, alloc(lasp2_forward_workspace_bytes(fwd, layout, seq) / 4 + 2),
                  Lasp2Options{}, nullptr);
    const delta::DeltaFamily bwd(be, p, grads, fold);
    seq.final_state = nullptr;
    seq.final_grad = final_grad;
    seq.initial_grad = d_initial;
    lasp2_backward(bwd, nullptr, layout, saved, seq, alloc(lasp2_backward_workspace_bytes(bwd, layout, seq) / 4 + 2),
                   nullptr);
  };

  // CPU schedule
  std::vector<std::vector<float>> host_buffers;
  auto host_alloc = [&](int64_t floats) {
    host_buffers.emplace_back(static_cast<size_t>(floats));
    return host_buffers.back().data();
  };
  std::vector<float> o(pr.v.size()), finals(D);
  std::vector<float> dq(pr.q.size()), dk(pr.k.size()), dv(pr.v.size()), dg(pr.g.size()),
      db(pr.beta.size()), dI(D);
  run(delta::delta_cpu_backend(), hp, {o.data(), pr.strides(s.dim_v)},
      {pr.dout_view(), {dq.data(), pr.strides(s.dim_k)}, {dk.data(), pr.strides(s.dim_k)},
       {dv.data(), pr.strides(s.dim_v)}, dg.data(), db.data()},
      pr.initial.data(), finals.data(), pr.final_dstate.data(), dI.data(), host_alloc);

  // CUDA schedule
  std::vector<DevBuf<float>> device_buffers;
  device_buffers.reserve(16);
  auto device_alloc = [&](int64_t floats) {
    device_buffers.emplace_back(static_cast<size_t>(floats));
    return device_buffers.back().p;
  };
  DevBuf<float> gfin(D), gI = to_device_f32(pr.initial), gF = to_device_f32(pr.final_dstate), gdI(D),
      gdg(dg.size()), gdb(db.size());
  DevTensor go(s.batch, s.seqlen, s.heads, s.dim_v, ScalarType::kFloat32, Layout{});
  DevTensor gdq(s.batch, s.seqlen, s.heads, s.dim_k, ScalarType::kFloat32, Layout{});
  DevTensor gdk(s.batch, s.seqlen, s.heads, s.dim_k, ScalarType::kFloat32, Layout{});
  DevTensor gdv(s.batch, s.seqlen, s.heads, s.dim_v, ScalarType::kFloat32, Layout{});
  run(delta::delta_backend_for(Device::kCUDA), dev.p, go.mview(),
      {dev.dout.cview(), gdq.mview(), gdk.mview(), gdv.mview(), gdg.p, gdb.p}, gI.p, gfin.p, gF.p, gdI.p,
      device_alloc);
  cuda_ok(cudaDeviceSynchronize(), "schedule");
  for (auto [name, t, want, dim] : {std::tuple{"o", &go, &o, s.dim_v}, {"dq", &gdq, &dq, s.dim_k},
                                    {"dk", &gdk, &dk, s.dim_k}, {"dv", &gdv, &dv, s.dim_v}}) {
    const auto rb = t->download();
    const Compare cmp = compare_rows(rb.v, rb.written, *want, s.batch, s.seqlen, s.heads, dim, 0, s.seqlen);
    EXPECT_LT(cmp.rel, 1e-4) << name;
    EXPECT_EQ(cmp.missing, 0) << name;
  }
  EXPECT_LT(rel_err_f32(gfin.download(), finals), 1e-4) << "finals";
  EXPECT_LT(rel_err_f32(gdg.download(), dg), 2e-4) << "dg";
  EXPECT_LT(rel_err_f32(gdb.download(), db), 2e-4) << "dbeta";
  EXPECT_LT(rel_err_f32(gdI.download(), dI), 2e-4) << "d_initial";
}

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaSchedule,
    ::testing::Values(ScheduleCase{GateKind::kScalar, false, 1}, ScheduleCase{GateKind::kScalar, true, 1},
                      ScheduleCase{GateKind::kScalar, true, 2}, ScheduleCase{GateKind::kPerKey, false, 2},
                      ScheduleCase{GateKind::kPerKey, true, 2}, ScheduleCase{GateKind::kScalar, true, 1, 64},
                      ScheduleCase{GateKind::kPerKey, true, 2, 64}, ScheduleCase{GateKind::kPerKey, false, 1, 128}),
    [](const ::testing::TestParamInfo<ScheduleCase>& info) {
      const auto& c = info.param;
      return std::string(c.gate == GateKind::kScalar ? "gdn" : "kda") +
             (c.packed ? "_packed" : "_rows") + "_parts" + std::to_string(c.parts) +
             (c.seg_len ? "_seg" + std::to_string(c.seg_len) : "");
    });

}  // namespace
}  // namespace lasp2::testing

namespace lasp2::testing {
namespace {

int64_t env_or(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s != nullptr && *s != '\0') ? std::atoll(s) : fallback;
}

// ---- the timing tests' GDN layer: [1, T, H, D] bf16 inputs on one device ----
// Normal random values in `tensors` (2-byte elements; k's scaled by 1/sqrt(D)) as a
// repeated 2^20-element pattern (fast to set up at 64K tokens).
void upload_pattern(std::mt19937& rng, std::initializer_list<DevTensor*> tensors, const DevTensor* k) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t pattern = size_t{1} << 20;
  for (DevTensor* t : tensors) {
    std::vector<unsigned char> host(pattern * 2);
    for (size_t i = 0; i < pattern; ++i)
      encode(t->type, normal(rng) * (t == k ? 1.0 / std::sqrt(double(t->D)) : 1.0), &host[2 * i]);
    for (size_t at = 0; at < t->elems; at += pattern)
      cuda_ok(cudaMemcpy(t->buf.p + 2 * at, host.data(), 2 * std::min(pattern, t->elems - at), cudaMemcpyHostToDevice),
              "upload");
  }
}

// Log gates in log [0.9, 1) and betas in [0.1, 0.9), `rows` (token, head) rows of each.
struct GatesBetas {
  DevBuf<float> g, beta;
};
GatesBetas random_gates(std::mt19937& rng, int64_t rows) {
  std::vector<float> gh(rows), bh(rows);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto& e : gh) e = std::log(0.9f + 0.1f * u(rng));
  for (auto& e : bh) e = 0.1f + 0.8f * u(rng);
  return {to_device_f32(gh), to_device_f32(bh)};
}

// The backend's parameters of the layer (gates and betas [1, T, H] contiguous).
DeltaParams gdn_params(const DevTensor& q, const DevTensor& k, const DevTensor& v, const GatesBetas& gb) {
  const int64_t T = q.T, H = q.H, D = q.D;
  DeltaParams p;
  p.batch = 1;
  p.seqlen = T;
  p.heads = H;
  p.dim_k = p.dim_v = D;
  p.dtype = q.type;
  p.q = q.cview();
  p.k = k.cview();
  p.v = v.cview();
  p.g = gb.g.p;
  p.g_stride = {T * H, H, 1};
  p.beta = gb.beta.p;
  p.beta_stride = {T * H, H, 1};
  p.scale = 1.0 / std::sqrt(double(D));
  return p;
}

delta::gpu::View gpu_view(ConstView v) { return delta::gpu::View{v.data, v.stride.batch, v.stride.seq, v.stride.head}; }

// The kernels' problem of gdn_params' layer: all T tokens, one segment.
delta::gpu::Problem gdn_problem(const DeltaParams& p) {
  delta::gpu::Problem g;
  g.batch = 1;
  g.heads = static_cast<int>(p.heads);
  g.dk = g.dv = static_cast<int>(p.dim_k);
  g.seqlen = p.seqlen;
  g.n = p.seqlen;
  g.elem = delta::gpu::Elem::kBF16;
  g.q = gpu_view(p.q);
  g.k = gpu_view(p.k);
  g.v = gpu_view(p.v);
  g.g = static_cast<const float*>(p.g);
  g.gsb = p.g_stride.batch;
  g.gst = p.g_stride.seq;
  g.gsh = p.g_stride.head;
  g.beta = static_cast<const float*>(p.beta);
  g.bsb = p.beta_stride.batch;
  g.bst = p.beta_stride.seq;
  g.bsh = p.beta_stride.head;
  g.scale = static_cast<float>(p.scale);
  g.seg_len = p.seqlen;
  return g;
}

// The forward walk's output argument writing o.
delta::gpu::ForwardOut forward_out(DevTensor& o) {
  const MutView m = o.mview();
  delta::gpu::ForwardOut fo;
  fo.o = m.data;
  fo.osb = m.stride.batch;
  fo.ost = m.stride.seq;
  fo.osh = m.stride.head;
  return fo;
}

// Milliseconds of `launch` on the default stream: the median of runs 2..reps (the
// first warms up; reps = 1: that one).
class LaunchTimer {
 public:
  LaunchTimer() {
    cuda_ok(cudaEventCreate(&e0_), "event");
    cuda_ok(cudaEventCreate(&e1_), "event");
  }
  ~LaunchTimer() {
    cudaEventDestroy(e0_);
    cudaEventDestroy(e1_);
  }
  LaunchTimer(const LaunchTimer&) = delete;
  LaunchTimer& operator=(const LaunchTimer&) = delete;

  float median_ms(const std::function<void()>& launch, int reps) {
    std::vector<float> ms;
    for (int rep = 0; rep < reps; ++rep) {
      cuda_ok(cudaEventRecord(e0_), "record");
      launch();
      cuda_ok(cudaEventRecord(e1_), "record");
      cuda_ok(cudaEventSynchronize(e1_), "sync");
      float t = 0;
      cuda_ok(cudaEventElapsedTime(&t, e0_, e1_), "elapsed");
      if (rep > 0 || reps == 1) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }

 private:
  cudaEvent_t e0_, e1_;
};

// One GDN layer at T = 64K, H = 16, D = 128, bf16 on one device: the time of the
// one-device schedule's calls (printed; the assertions only check that every output
// is finite). LASP2_DELTA_TIMING_T=<tokens> changes T.
TEST(DeltaCudaTiming, GdnOneDevice) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{}), o(1, T, H, D, type, Layout{}), dq(1, T, H, D, type, Layout{}),
      dk(1, T, H, D, type, Layout{}), dv(1, T, H, D, type, Layout{});
  {
    std::mt19937 rng(1);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> x(T * H * D);
    for (DevTensor* t : {&q, &k, &v, &dout}) {
      for (auto& e : x) e = normal(rng) * (t == &k ? 1.0 / std::sqrt(double(D)) : 1.0);
      t->upload(x);
    }
  }
  std::mt19937 gate_rng(2);
  const GatesBetas gb = random_gates(gate_rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  const int64_t S = H * D * D;
  DevBuf<float> A(H * D * D), M(S), hA(H * D * D), hM(S), dE(S), dg(T * H), db(T * H);
  const TokenRange all{0, T};
  cudaEvent_t e0, e1, e2, e3;
  for (auto* e : {&e0, &e1, &e2, &e3}) cuda_ok(cudaEventCreate(e), "event");
  for (int rep = 0; rep < 2; ++rep) {  // the second is timed
    cuda_ok(cudaEventRecord(e0), "record");
    be.part_summary(p, all, {}, A.p, M.p, hA.p, hM.p, nullptr);
    cuda_ok(cudaEventRecord(e1), "record");
    be.forward(p, all, nullptr, {}, o.mview(), nullptr);
    cuda_ok(cudaEventRecord(e2), "record");
    be.entering_dstate(p, all, dout.cview(), dE.p, nullptr);
    be.backward(p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(), dv.mview(), dg.p,
                db.p, nullptr, nullptr);
    cuda_ok(cudaEventRecord(e3), "record");
    cuda_ok(cudaEventSynchronize(e3), "sync");
  }
  float summary_ms = 0, forward_ms = 0, backward_ms = 0;
  cuda_ok(cudaEventElapsedTime(&summary_ms, e0, e1), "elapsed");
  cuda_ok(cudaEventElapsedTime(&forward_ms, e1, e2), "elapsed");
  cuda_ok(cudaEventElapsedTime(&backward_ms, e2, e3), "elapsed");
  std::printf("[ timing ] GDN T=%lld H=16 D=128 bf16: part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate + backward %.2f ms\n",
              static_cast<long long>(T), summary_ms, forward_ms, backward_ms);
  // One device as the schedule runs it (forward, then backward alone), recomputing and
  // with the forward's kept buffer (forward_keeping, backward_reusing reading it).
  {
    DevBuf<float> kept(be.forward_kept_floats(p, all));
    float ms[2][2] = {};
    for (int rep = 0; rep < 3; ++rep) {  // recompute, keep, recompute, keep, ...: the last two timed
      for (int keep = 0; keep < 2; ++keep) {
        cuda_ok(cudaEventRecord(e0), "record");
        if (keep) {
          be.forward_keeping(p, all, nullptr, {}, o.mview(), kept.p, nullptr);
        } else {
          be.forward(p, all, nullptr, {}, o.mview(), nullptr);
        }
        cuda_ok(cudaEventRecord(e1), "record");
        be.backward_reusing(nullptr, p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(), dv.mview(),
                            dg.p, db.p, nullptr, nullptr, keep ? kept.p : nullptr);
        cuda_ok(cudaEventRecord(e2), "record");
        cuda_ok(cudaEventSynchronize(e2), "sync");
        cuda_ok(cudaEventElapsedTime(&ms[keep][0], e0, e1), "elapsed");
        cuda_ok(cudaEventElapsedTime(&ms[keep][1], e1, e2), "elapsed");
      }
    }
    std::printf("[ timing ] GDN T=%lld one device: recomputing forward %.2f + backward %.2f = %.2f ms; "
                "forward kept (%.1f MiB) forward %.2f + backward %.2f = %.2f ms\n",
                static_cast<long long>(T), ms[0][0], ms[0][1], ms[0][0] + ms[0][1],
                be.forward_kept_floats(p, all) * 4.0 / (1 << 20), ms[1][0], ms[1][1], ms[1][0] + ms[1][1]);
  }
  // Where the chunked kernels' time goes (delta_chunk.h): each launch on its own,
  // the second of two runs timed.
  {
    namespace gpu = delta::gpu;
    const gpu::Problem g = gdn_problem(p);
    const int64_t nck = gpu::chunk_count(g), rows = H * nck * 64;
    DevBuf<float> w(rows * D / 2), u(rows * D / 2), meta(2 * rows), vnew(rows * D / 2), st16(H * nck * D * D / 2),
        dh(H * nck * D * D / 2), tm(rows * 64 / 2);
    const gpu::ChunkPrep prep{w.p, u.p, meta.p};
    gpu::ChunkPrep bprep = prep;  // the backward's prep also keeps T
    bprep.t = tm.p;
    const gpu::ForwardOut fo = forward_out(o);
    gpu::ChunkBackwardArgs ba;
    ba.dout = gpu_view(dout.cview());
    ba.meta = meta.p;
    ba.v_new = vnew.p;
    ba.states = st16.p;
    ba.dh = dh.p;
    ba.t = tm.p;
    ba.r = u.p;      // rprep's r (the stage before rstates)
    for (auto [t, ptr, sb, st, sh] : {std::tuple{&dq, &ba.dq, &ba.dqsb, &ba.dqst, &ba.dqsh},
                                      {&dk, &ba.dk, &ba.dksb, &ba.dkst, &ba.dksh},
                                      {&dv, &ba.dv, &ba.dvsb, &ba.dvst, &ba.dvsh}}) {
      const MutView m = t->mview();
      *ptr = m.data;
      *sb = m.stride.batch;
      *st = m.stride.seq;
      *sh = m.stride.head;
    }
    ba.dg = dg.p;
    ba.dbeta = db.p;
    const std::vector<std::pair<const char*, std::function<void()>>> stages = {
        {"prep", [&] { gpu::launch_chunk_prep(g, prep, nullptr); }},
        {"prep with T", [&] { gpu::launch_chunk_prep(g, bprep, nullptr); }},
        {"states", [&] {
           gpu::ChunkStatesOut so;
           so.v_new = vnew.p;
           so.states = st16.p;
           gpu::launch_chunk_states(g, prep, so, nullptr);
         }},
        {"output", [&] { gpu::launch_chunk_output(g, prep, vnew.p, st16.p, fo, nullptr); }},
        {"rprep", [&] { gpu::launch_chunk_rprep(g, ba.dout, prep, nullptr); }},
        {"rstates", [&] {
           gpu::ChunkReverseOut ro;
           ro.dh = dh.p;
           gpu::launch_chunk_rstates(g, ba.dout, prep, ro, nullptr);
         }},
        {"chunk backward", [&] { gpu::launch_chunk_backward(g, ba, nullptr); }},
    };
    LaunchTimer timer;
    std::string line;
    for (const auto& [name, launch] : stages) {
      const float ms = timer.median_ms(launch, 2);  // the second of two runs
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%s%s %.2f", line.empty() ? "" : ", ", name, ms);
      line += buf;
    }
    std::printf("[ timing ] chunked stages (ms): %s\n", line.c_str());
    // The chunk backward's variants side by side (LASP2_DELTA_TIMING_BWD_KERNELS, e.g.
    // "lean early lean early" or "ordered ordered/cp_async ...": LASP2_DELTA_CHUNK_BWD_KERNEL
    // (and LASP2_CUDA_TILE_COPY after a slash) set to each in turn): the chunk
    // backward launch alone (the median of 5 after a warm-up) and the one-device backward
    // with the forward kept (forward_keeping, then backward_reusing timed; the median of 3
    // after a warm-up), so that one process's data serve the A/B.
    if (const char* list = std::getenv("LASP2_DELTA_TIMING_BWD_KERNELS"); list != nullptr && *list != '\0') {
      DevBuf<float> kept(be.forward_kept_floats(p, all));
      std::istringstream names(list);
      std::string name;
      while (names >> name) {
        // "ordered/cp_async": the form with LASP2_CUDA_TILE_COPY=cp_async (the cp.async
        // copies instead of the tensor maps); a plain name leaves the copies at the default
        const size_t slash = name.find('/');
        const EnvGuard scope("LASP2_DELTA_CHUNK_BWD_KERNEL", name.substr(0, slash));
        const EnvGuard copy("LASP2_CUDA_TILE_COPY", slash == std::string::npos ? "" : name.substr(slash + 1));
        const float chunk_ms = timer.median_ms([&] { gpu::launch_chunk_backward(g, ba, nullptr); }, 6);
        std::vector<float> bwd;
        for (int rep = 0; rep < 4; ++rep) {
          be.forward_keeping(p, all, nullptr, {}, o.mview(), kept.p, nullptr);
          cuda_ok(cudaEventRecord(e0), "record");
          be.backward_reusing(nullptr, p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(),
                              dv.mview(), dg.p, db.p, nullptr, nullptr, kept.p);
          cuda_ok(cudaEventRecord(e1), "record");
          cuda_ok(cudaEventSynchronize(e1), "sync");
          float ms = 0;
          cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
          if (rep > 0) bwd.push_back(ms);
        }
        std::sort(bwd.begin(), bwd.end());
        std::printf("[ timing ] chunk backward kernel %s: launch %.3f ms, one-device backward (forward kept) %.3f ms\n",
                    name.c_str(), chunk_ms, bwd[bwd.size() / 2]);
      }
    }
  }
  for (DevTensor* t : {&o, &dq, &dk, &dv}) {
    const auto rb = t->download();
    int64_t bad = 0;
    for (size_t i = 0; i < rb.v.size(); ++i) bad += !std::isfinite(rb.v[i]);
    EXPECT_EQ(bad, 0);
  }
  int64_t bad = 0;
  EXPECT_LT(rel_err_f32(dg.download(), std::vector<float>(T * H, 0.f), &bad), INFINITY);
  EXPECT_EQ(bad, 0);
}

// prep's and rprep's thirteenth-round kernels (the defaults: prep's w and u through
// shared memory in 16-byte stores, the balanced inverse merge, T's copy in pairs; rprep
// with P^T in registers) against the twelfth round's (LASP2_DELTA_PREP_KERNEL=old,
// LASP2_DELTA_RPREP_KERNEL=old): the same products in the same order, so w, u, meta, T
// and r must be equal bit for bit. bf16 and fp16, d = 64 and 128, two batch rows with
// packed documents (one on a chunk's first token) and -inf gates (inside a chunk and on a
// chunk's first token), a part from token 37 to 280 (chunks from 37, 101, 165 and 229;
// the last one partial). The upper triangle of T and the pairs across document starts
// are zero: a tenth of each buffer's words at least must be non-zero.
TEST(DeltaCudaPrep, NewEqualsOld) {
  LASP2_SKIP_WITHOUT_CUDA();
  namespace gpu = delta::gpu;
  for (const ScalarType type : {ScalarType::kBFloat16, ScalarType::kFloat16})
    for (const int d : {64, 128}) {
      SCOPED_TRACE(std::string(dtype_name(type)) + " d=" + std::to_string(d));
      DeltaSpec spec = gdn_spec(d, 300, 2);
      spec.doc_starts = {5, 64, 65, 130, 201, 229};
      DeltaProblem<float> pr(spec, 47);
      forget_at(pr, {120, 165});  // inside chunk 1; chunk 2's first token
      prepare_inputs(pr, type);
      DeviceProblem dev(pr, type, Layout{});
      gpu::Problem gp = gdn_problem(dev.p);
      gp.batch = static_cast<int>(spec.batch);
      gp.elem = type == ScalarType::kFloat16 ? gpu::Elem::kF16 : gpu::Elem::kBF16;
      gp.doc_start = dev.p.doc_start;
      gp.doc_sb = dev.p.doc_batch_stride;
      gp.begin = 37;
      gp.n = 280 - 37;
      ASSERT_NE(gp.doc_start, nullptr);
      const gpu::View dO = gpu_view(dev.dout.cview());
      const int64_t rows = gp.bh() * gpu::chunk_count(gp) * 64;
      auto run = [&](const char* prep_kernel, const char* rprep_kernel) {
        const EnvGuard a("LASP2_DELTA_PREP_KERNEL", prep_kernel), b("LASP2_DELTA_RPREP_KERNEL", rprep_kernel);
        DevBuf<float> w(rows * d / 2), u(rows * d / 2), r(rows * d / 2), meta(2 * rows), t(rows * 64 / 2);
        for (DevBuf<float>* x : {&w, &u, &r, &meta, &t}) x->poison();
        gpu::ChunkPrep prep{w.p, u.p, meta.p};
        prep.t = t.p;
        gpu::launch_chunk_prep(gp, prep, nullptr);
        gpu::launch_chunk_rprep(gp, dO, gpu::ChunkPrep{w.p, r.p, meta.p}, nullptr);
        cuda_ok(cudaDeviceSynchronize(), "prep and rprep");
        std::vector<std::vector<float>> out;
        for (DevBuf<float>* x : {&w, &u, &r, &meta, &t}) out.push_back(x->download());
        return out;
      };
      const auto old = run("old", "old");
      for (const char* kernel : {"", "new"}) {  // the default unset and named
        SCOPED_TRACE(*kernel ? kernel : "(default)");
        const auto got = run(kernel, kernel);
        const char* names[] = {"w", "u", "r", "meta", "T"};
        for (size_t i = 0; i < old.size(); ++i) {
          ASSERT_EQ(old[i].size(), got[i].size());
          int64_t differ = 0, written = 0, nonzero = 0;
          for (size_t e = 0; e < old[i].size(); ++e) {
            uint32_t a = 0, b = 0;
            std::memcpy(&a, &old[i][e], 4);
            std::memcpy(&b, &got[i][e], 4);
            differ += a != b;
            written += b != 0xFFFFFFFFu;
            nonzero += b != 0u;
          }
          EXPECT_EQ(differ, 0) << names[i] << ": of " << old[i].size() << " words";
          EXPECT_EQ(written, static_cast<int64_t>(old[i].size())) << names[i] << ": every word written";
          EXPECT_GT(nonzero, static_cast<int64_t>(old[i].size()) / 10) << names[i];
        }
      }
    }
}

// prep (with and without T) and rprep at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128,
// bf16: the twelfth round's kernels (old) and the defaults (new) alternating, two rounds,
// each the median of 5 launches after a warm-up (printed; the assertion only checks that
// r is finite). LASP2_PREP_TIMING_REPS=1: one launch each (for ncu).
TEST(DeltaCudaPrepTiming, OldVsNew) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);
  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(p);
  const int64_t rows = H * gpu::chunk_count(gp) * 64;
  DevBuf<float> w(rows * D / 2), u(rows * D / 2), r(rows * D / 2), meta(2 * rows), tm(rows * 64 / 2);
  const gpu::ChunkPrep prep{w.p, u.p, meta.p};
  gpu::ChunkPrep tprep = prep;
  tprep.t = tm.p;
  const gpu::View dO = gpu_view(dout.cview());
  LaunchTimer timer;
  const int reps = static_cast<int>(env_or("LASP2_PREP_TIMING_REPS", 6));  // 1 under ncu: one launch each
  for (int round = 0; round < 2; ++round)
    for (const char* kernel : {"old", "new"}) {
      const EnvGuard a("LASP2_DELTA_PREP_KERNEL", kernel), b("LASP2_DELTA_RPREP_KERNEL", kernel);
      const float p_ms = timer.median_ms([&] { gpu::launch_chunk_prep(gp, prep, nullptr); }, reps);
      const float pt_ms = timer.median_ms([&] { gpu::launch_chunk_prep(gp, tprep, nullptr); }, reps);
      const float r_ms =
          timer.median_ms([&] { gpu::launch_chunk_rprep(gp, dO, gpu::ChunkPrep{w.p, r.p, meta.p}, nullptr); }, reps);
      std::printf("[ timing ] round %d %s T=%lld: prep %.3f ms, prep with T %.3f ms, rprep %.3f ms\n", round, kernel,
                  static_cast<long long>(T), p_ms, pt_ms, r_ms);
    }
  int64_t bad = 0;  // r's bf16 pairs: an all-ones exponent is inf or NaN
  for (float x : r.download()) {
    uint32_t bits = 0;
    std::memcpy(&bits, &x, 4);
    bad += (bits & 0x7F80u) == 0x7F80u || (bits & 0x7F800000u) == 0x7F800000u;
  }
  EXPECT_EQ(bad, 0);
}

}  // namespace
}  // namespace lasp2::testing

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
namespace lasp2::testing {
namespace {

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
  DeviceProblem dev(pr, c.type, Layout{});
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

// The chunked forward at T = 64K, H = 16, D = 128, bf16 on one device (printed, the
// median of 5 after a warm-up): each kernel on its own, the backend's forward and
// part_summary. LASP2_DELTA_TIMING_T=<tokens>
// changes T. The inputs repeat a 2^20-element random pattern (fast to set up).
TEST(DeltaCudaForwardTiming, GdnChunkedKernels) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      o(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);

  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(p);
  const int64_t nck = gpu::chunk_count(gp), rows = H * nck * 64;
  DevBuf<float> w(rows * D / 2), uu(rows * D / 2), meta(2 * rows), vnew(rows * D / 2), st16(H * nck * D * D / 2);
  DevBuf<float> A(H * D * D), M(H * D * D), hA(H * D * D), hM(H * D * D);
  const gpu::ChunkPrep prep{w.p, uu.p, meta.p};
  const gpu::ForwardOut fo = forward_out(o);
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  const std::vector<std::pair<const char*, std::function<void()>>> stages = {
      {"prep", [&] { gpu::launch_chunk_prep(gp, prep, nullptr); }},
      {"states", [&] {
         gpu::ChunkStatesOut so;
         so.v_new = vnew.p;
         so.states = st16.p;
         gpu::launch_chunk_states(gp, prep, so, nullptr);
       }},
      {"output", [&] { gpu::launch_chunk_output(gp, prep, vnew.p, st16.p, fo, nullptr); }},
      {"backend forward", [&] { be.forward(p, {0, T}, nullptr, {}, o.mview(), nullptr); }},
      {"backend part_summary", [&] { be.part_summary(p, {0, T}, {}, A.p, M.p, hA.p, hM.p, nullptr); }},
  };
  LaunchTimer timer;
  std::string line;
  for (const auto& [name, launch] : stages) {
    char buf[80];
    std::snprintf(buf, sizeof(buf), "%s%s %.3f", line.empty() ? "" : ", ", name, timer.median_ms(launch, 6));
    line += buf;
  }
  std::printf("[ timing ] GDN forward T=%lld H=16 D=128 bf16 (ms, median of 5): %s\n", static_cast<long long>(T),
              line.c_str());
  EXPECT_LT(rel_err_f32(M.download(), std::vector<float>(H * D * D, 0.f)), INFINITY) << "M finite";
  EXPECT_LT(rel_err_f32(A.download(), std::vector<float>(H * D * D, 0.f)), INFINITY) << "A finite";
}

// ---- the state passes side by side (gdnstates) -------------------------------------------
// The forward pass (v_new and the 16-bit chunk states), the part summary and the reverse
// pass (16-bit dh) at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16, for each
// kernel family of LASP2_DELTA_STATE_KERNEL named in LASP2_STATE_TIMING_VARIANTS
// (default "tile w8"): the median of the timed launches
// (LASP2_STATE_TIMING_REPS, default 3, the first untimed), and the outputs' max
// difference relative to the first family's (head 0 of v_new, the states and dh over all
// chunks; A and M: the small-problem tests above hold each family to the recurrent
// kernels, here the whole 64K chain is compared).
// The first `count` bf16 values of a device buffer.
std::vector<float> decode_bf16(const DevBuf<float>& b, size_t count) {
  std::vector<uint16_t> h(count);
  cuda_ok(cudaMemcpy(h.data(), b.p, 2 * count, cudaMemcpyDeviceToHost), "download");
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
    std::memcpy(&out[i], &bits, 4);
  }
  return out;
}

TEST(DeltaCudaStateTiming, FamiliesSideBySide) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const int reps = static_cast<int>(env_or("LASP2_STATE_TIMING_REPS", 3));
  const char* names_env = std::getenv("LASP2_STATE_TIMING_VARIANTS");
  std::vector<std::string> names;
  {
    std::istringstream in(names_env != nullptr && *names_env ? names_env : "tile w8");
    for (std::string w; in >> w;) names.push_back(w);
  }
  ASSERT_FALSE(names.empty());
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);

  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(gdn_params(q, k, v, gb));
  const gpu::View dO = gpu_view(dout.cview());
  const int64_t nck = gpu::chunk_count(gp), rows = H * nck * 64;
  DevBuf<float> w(rows * D / 2), uu(rows * D / 2), r(rows * D / 2), meta(2 * rows), vnew(rows * D / 2),
      st16(H * nck * D * D / 2), dh(H * nck * D * D / 2), A(H * D * D), M(H * D * D);
  const gpu::ChunkPrep prep{w.p, uu.p, meta.p};
  const gpu::ChunkPrep rprep{w.p, r.p, meta.p};
  gpu::launch_chunk_prep(gp, prep, nullptr);
  gpu::launch_chunk_rprep(gp, dO, rprep, nullptr);
  const std::vector<std::pair<const char*, std::function<void()>>> stages = {
      {"states", [&] {
         gpu::ChunkStatesOut so;
         so.v_new = vnew.p;
         so.states = st16.p;
         gpu::launch_chunk_states(gp, prep, so, nullptr);
       }},
      {"summary", [&] { gpu::launch_chunk_summary(gp, prep, {A.p, M.p, nullptr, nullptr}, nullptr); }},
      {"rstates", [&] {
         gpu::ChunkReverseOut ro;
         ro.dh = dh.p;
         gpu::launch_chunk_rstates(gp, dO, rprep, ro, nullptr);
       }},
  };
  LaunchTimer timer;
  std::vector<std::vector<float>> first;  // the first family's outputs
  for (const std::string& name : names) {
    const EnvGuard family("LASP2_DELTA_STATE_KERNEL", name.c_str());
    std::string line;
    for (const auto& [stage, launch] : stages) {
      char buf[80];
      std::snprintf(buf, sizeof(buf), "%s%s %.3f", line.empty() ? "" : ", ", stage, timer.median_ms(launch, reps));
      line += buf;
    }
    // head 0 of the 16-bit outputs (all chunks), every head of the maps
    const size_t head_rows = static_cast<size_t>(nck) * 64 * D, head_states = static_cast<size_t>(nck) * D * D;
    const std::vector<std::vector<float>> got = {decode_bf16(vnew, head_rows), decode_bf16(st16, head_states),
                                                 decode_bf16(dh, head_states), A.download(), M.download()};
    if (first.empty()) first = got;
    const char* out_names[] = {"v_new", "states", "dh", "A", "M"};
    for (size_t i = 0; i < got.size(); ++i) {
      int64_t bad = 0;
      const double rel = rel_err_f32(got[i], first[i], &bad);
      EXPECT_EQ(bad, 0) << name << " " << out_names[i] << " not finite";
      // 16-bit operands on a 1024-chunk chain, summed in another order: 5e-2 of the max
      EXPECT_LT(rel, 5e-2) << name << " " << out_names[i] << " against " << names[0];
      char buf[64];
      std::snprintf(buf, sizeof(buf), ", %s %.1e", out_names[i], rel);
      line += buf;
    }
    std::printf("[ timing ] state passes T=%lld H=16 D=128 bf16, %s (ms, median; max diff rel. to %s): %s\n",
                static_cast<long long>(T), name.c_str(), names[0].c_str(), line.c_str());
  }
}

// The 8-warp state passes with their copies addressed once a block (w8), every chunk's
// copies addressed anew (w8calc) and the passes on whole-tile tensor-map copies (tma, the
// default on sm_90, its summary in 32-column blocks as w8's, the epilogue's decays and
// loads before the token product, the reverse pass's scaled dO stored after it): the same arithmetic on the same tiles, so every
// output must be equal bit for bit. Two batch rows
// of 9 heads (144 state-pass blocks: the two-buffer rings on a 132-SM H200, the summary's
// 72 the four-buffer one) in Megatron's [T, B, H, D] order with padded heads, and one
// batch row of 5 heads in [B, T, H, D] (40 blocks: the four-buffer rings); a part that
// starts at token 37 and ends 20 tokens early (its last chunk has 47 rows), an entering
// state and a leaving gradient.
TEST(DeltaCudaStatePasses, CopiesAddressedOnceEqualPerChunk) {
  LASP2_SKIP_WITHOUT_CUDA();
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  struct Shape {
    int64_t B, H;
    Layout lay;
  };
  for (const Shape& sh : {Shape{2, 9, Layout{true, 8}}, Shape{1, 5, Layout{false, 0}}}) {
    SCOPED_TRACE("B=" + std::to_string(sh.B) + " H=" + std::to_string(sh.H));
    const int64_t B = sh.B, T = 1000, H = sh.H, D = 128;
    const ScalarType type = ScalarType::kBFloat16;
    DevTensor q(B, T, H, D, type, sh.lay), k(B, T, H, D, type, sh.lay), v(B, T, H, D, type, sh.lay),
        dout(B, T, H, D, type, sh.lay);
    std::mt19937 rng(7);
    upload_pattern(rng, {&q, &k, &v, &dout}, &k);
    const GatesBetas gb = random_gates(rng, B * T * H);
    DeltaParams dp = gdn_params(q, k, v, gb);
    dp.batch = B;
    namespace gpu = delta::gpu;
    gpu::Problem gp = gdn_problem(dp);
    gp.batch = static_cast<int>(B);
    gp.begin = 37;
    gp.n = T - 37 - 20;
    const gpu::View dO = gpu_view(dout.cview());
    const int64_t bh = B * H, nck = gpu::chunk_count(gp), rows = bh * nck * 64, se = D * D;
    ASSERT_EQ(nck, 15);
    std::vector<float> state(bh * se);
    std::normal_distribution<float> normal(0.f, 0.3f);
    for (auto& e : state) e = normal(rng);
    const DevBuf<float> entering = to_device_f32(state), leaving_grad = to_device_f32(state);
    DevBuf<float> w(rows * D / 2), uu(rows * D / 2), r(rows * D / 2), meta(2 * rows);
    const gpu::ChunkPrep prep{w.p, uu.p, meta.p};
    const gpu::ChunkPrep rprep{w.p, r.p, meta.p};
    gpu::launch_chunk_prep(gp, prep, nullptr);
    gpu::launch_chunk_rprep(gp, dO, rprep, nullptr);
    auto run = [&](const char* family) {
      const EnvGuard scope("LASP2_DELTA_STATE_KERNEL", family);
      DevBuf<float> vnew(rows * D / 2), st16(bh * nck * se / 2), leaving(bh * se), dh(bh * nck * se / 2),
          dentering(bh * se), A(bh * se), M(bh * se);
      for (DevBuf<float>* b : {&vnew, &st16, &leaving, &dh, &dentering, &A, &M}) b->poison();
      gpu::ChunkStatesOut so;
      so.entering = entering.p;
      so.v_new = vnew.p;
      so.states = st16.p;
      so.leaving = leaving.p;
      gpu::launch_chunk_states(gp, prep, so, nullptr);
      gpu::launch_chunk_summary(gp, prep, {A.p, M.p, nullptr, nullptr}, nullptr);
      gpu::ChunkReverseOut ro;
      ro.leaving = leaving_grad.p;
      ro.dh = dh.p;
      ro.entering = dentering.p;
      gpu::launch_chunk_rstates(gp, dO, rprep, ro, nullptr);
      cuda_ok(cudaDeviceSynchronize(), "state passes");
      std::vector<float> out;
      for (DevBuf<float>* b : {&vnew, &st16, &leaving, &dh, &dentering, &A, &M}) {
        const std::vector<float> h = b->download();
        out.insert(out.end(), h.begin(), h.end());
      }
      return out;
    };
    const std::vector<float> lean = run("w8");
    std::vector<const char*> others = {"w8calc"};
    if (major >= 9) others.push_back("tma");
    for (const char* family : others) {
      const std::vector<float> got = run(family);
      ASSERT_EQ(lean.size(), got.size()) << family;
      int64_t differ = 0, finite = 0;
      for (size_t i = 0; i < lean.size(); ++i) {
        differ += std::memcmp(&lean[i], &got[i], 4) != 0;
        finite += std::isfinite(got[i]) ? 1 : 0;
      }
      EXPECT_EQ(differ, 0) << family << ": of " << lean.size() << " words";
      // poison (NaN) where nothing was written: most of every buffer must be written
      EXPECT_GT(finite, static_cast<int64_t>(lean.size()) * 9 / 10) << family;
    }
  }
}

// The part summary through the backend (part_summary: A, M and the head maps) on
// tensor-map copies (tma, the default on sm_90, 32-column blocks) against w8's, bit for
// bit, and against the CPU backend: batch rows with -inf gates
// inside the part (A = 0 exactly), packed documents starting inside the part (A = 0;
// the head maps from the second pass), fp16 with both; 18 (b, h) (the two-buffer rings
// on a 132-SM H200) and 5 or 3 (the four-buffer ones); parts starting and ending mid-chunk.
TEST(DeltaCudaStatePasses, SummaryTmaEqualsW8) {
  LASP2_SKIP_WITHOUT_CUDA();
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "the tma summary runs on sm_90 and later";
  struct Case {
    ScalarType type;
    int64_t batch, heads;
    bool packed, neg_inf;
    TokenRange part;
  };
  const std::vector<Case> cases = {{ScalarType::kBFloat16, 2, 9, false, true, {37, 980}},
                                   {ScalarType::kBFloat16, 1, 5, true, false, {37, 980}},
                                   {ScalarType::kFloat16, 1, 3, true, true, {0, 700}}};
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  for (const Case& c : cases) {
    SCOPED_TRACE(std::string(c.packed ? "packed" : "rows") + (c.neg_inf ? " -inf" : "") + " B=" +
                 std::to_string(c.batch) + " H=" + std::to_string(c.heads));
    DeltaSpec spec = gdn_spec(128, 1000, c.batch);
    spec.heads = c.heads;
    if (c.packed) spec.doc_starts = {5, 64, 130, 131, 400, 641};
    DeltaProblem<float> pr(spec, 17);
    prepare_inputs(pr, c.type);
    if (c.neg_inf) forget_at(pr, {100, 300, 301});
    DeviceProblem dev(pr, c.type, Layout{});
    const int64_t bh = dev.p.bh(), se = dev.p.state_elems();
    auto run = [&](const char* family) {
      const EnvGuard scope("LASP2_DELTA_STATE_KERNEL", family);
      DevBuf<float> A(bh * se), M(bh * se), hA(bh * se), hM(bh * se);
      for (DevBuf<float>* b : {&A, &M, &hA, &hM}) b->poison();
      gpu.part_summary(dev.p, c.part, DocStates{}, A.p, M.p, hA.p, hM.p, nullptr);
      return std::vector<std::vector<float>>{A.download(), M.download(), hA.download(), hM.download()};
    };
    const char* names[] = {"A", "M", "head A", "head M"};
    const auto w8 = run("w8");
    for (const char* family : {"", "tma"}) {
      SCOPED_TRACE(*family ? family : "(default)");
      const auto got = run(family);
      for (int i = 0; i < 4; ++i) {
        int64_t differ = 0;
        for (size_t e = 0; e < got[i].size(); ++e) differ += std::memcmp(&got[i][e], &w8[i][e], 4) != 0;
        EXPECT_EQ(differ, 0) << names[i] << ": of " << got[i].size() << " words";
      }
    }
    EXPECT_EQ(delta::testing::max_abs(w8[0]), 0.0) << "A after a -inf gate or a document start";
    if (c.packed) EXPECT_GT(delta::testing::max_abs(w8[2]), 0.0) << "head A: no document start before its end";
    if (!c.neg_inf) {  // the CPU backend (no -inf gates); 16-bit operands over 15 chunks
      std::vector<float> A(bh * se), M(bh * se), hA(bh * se), hM(bh * se);
      delta::delta_cpu_backend().part_summary(pr.params(), c.part, DocStates{}, A.data(), M.data(), hA.data(),
                                              hM.data(), nullptr);
      const std::vector<float>* want[] = {&A, &M, &hA, &hM};
      for (int i = 0; i < 4; ++i) EXPECT_LT(rel_err_f32(w8[i], *want[i]), 1e-2) << names[i] << " vs CPU";
    }
  }
}

// A case of the chunk backward's bit-equality tests below (GDN rows, or packed documents
// with a -inf gate inside chunk 2; a part of a 300-token sequence), set up on the device
// once; run(knob, value) is the CUDA backward under one environment setting (the chunk
// backward's form or its copy mode).
struct ChunkBackwardCase {
  int d;
  bool packed;
  ScalarType type;
  TokenRange part;
};

struct ChunkBackwardRun {
  explicit ChunkBackwardRun(const ChunkBackwardCase& c)
      : c(c), spec(spec_of(c)), pr(spec, 43), dev(prepared(pr, c), c.type, Layout{false, 0}),
        se(dev.p.bh() * dev.p.state_elems()), edge(random_edge_states(5, se)) {}

  std::string name() const {
    return std::string(c.packed ? "packed" : "rows") + " d=" + std::to_string(c.d) +
           (c.type == ScalarType::kFloat16 ? " fp16" : " bf16") + " part " + std::to_string(c.part.begin) + ".." +
           std::to_string(c.part.end);
  }

  Grads run(const char* knob, const char* value) const {
    const EnvGuard scope(knob, value);
    Grads r;
    BackwardBuffers g(pr, c.type, Layout{false, 0}, se);
    delta::delta_backend_for(Device::kCUDA)
        .backward(dev.p, c.part, dev.dout.cview(), edge.d_entering.p, edge.d_leaving.p, DocStates{}, g.dq.mview(),
                  g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
    g.download(r);
    return r;
  }

  // dq, dk and dv hold values in (about) the part's share of their rows: the kernels wrote
  void expect_written(const Grads& r) const {
    for (const auto* x : {&r.dq, &r.dk, &r.dv}) {
      int64_t nonzero = 0;
      for (double e : *x) nonzero += (!std::isnan(e) && e != 0.0) ? 1 : 0;
      EXPECT_GT(nonzero, static_cast<int64_t>(x->size()) * (c.part.end - c.part.begin) / spec.seqlen / 2)
          << "written";
    }
  }

  ChunkBackwardCase c;
  DeltaSpec spec;
  DeltaProblem<float> pr;
  DeviceProblem dev;
  int64_t se;
  EdgeStates edge;

 private:
  static DeltaSpec spec_of(const ChunkBackwardCase& c) {
    DeltaSpec spec = gdn_spec(c.d, 300, c.packed ? 1 : 2);
    if (c.packed) spec.doc_starts = {5, 64, 65, 130, 201};
    return spec;
  }
  static const DeltaProblem<float>& prepared(DeltaProblem<float>& pr, const ChunkBackwardCase& c) {
    if (c.packed) pr.g[(170 * pr.spec.heads + 1)] = -INFINITY;  // a forgetting gate inside chunk 2
    prepare_inputs(pr, c.type);
    return pr;
  }
};

const std::vector<ChunkBackwardCase> kChunkBackwardCases = {
    {128, false, ScalarType::kBFloat16, {37, 280}}, {128, true, ScalarType::kBFloat16, {37, 280}},
    {64, false, ScalarType::kBFloat16, {37, 280}},  {64, true, ScalarType::kBFloat16, {37, 280}},
    {128, true, ScalarType::kFloat16, {0, 300}},    {128, false, ScalarType::kBFloat16, {100, 141}}};

// The early chunk backward (LASP2_DELTA_CHUNK_BWD_KERNEL=early: dB kept in shared memory
// and dk's first terms in registers instead of the hand-over through dq's and dk's rows,
// h loaded as soon as dU is formed) against the lean kernel (=lean): the same
// products in the same order with dk's first terms rounded to 16 bits as the hand-over
// rounds them, so dq, dk and dv must be equal bit for bit; dg and dbeta up to the order
// of their shared-memory atomics and one fp32 rounding (the gate terms of P o (dO U^T)
// multiply in another order). d = 128 and 64, rows and packed documents with a -inf gate
// inside a chunk, a part starting at token 37 and ending mid-chunk, an entering state and
// a leaving gradient; fp16 too, and a part of one partial chunk. The ordered form (the
// production form, unset and named: early with the gate gradients' sums in per-lane slots
// added in a fixed order, no atomics, and h stored into its tile from the registers that
// formed <dh, h> instead of read again; v's pairs, beta and the score epilogues' {G, s}
// pairs read before the stores that followed them, beta copied by cp.async) forms the
// same products in the same order, so it is held to lean the same way. (early and lean
// are kept in the library as these references only.)
TEST(DeltaCudaChunkBackward, EarlyEqualsLean) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const ChunkBackwardCase& c : kChunkBackwardCases) {
    const ChunkBackwardRun cb(c);
    SCOPED_TRACE(cb.name());
    // the default twice (unset and named), so that the default is the ordered kernel
    const Grads lean = cb.run("LASP2_DELTA_CHUNK_BWD_KERNEL", "lean");
    for (const char* kernel : {"", "ordered", "early"}) {
      SCOPED_TRACE(*kernel ? kernel : "(default)");
      const Grads early = cb.run("LASP2_DELTA_CHUNK_BWD_KERNEL", kernel);
      EXPECT_EQ(max_abs_diff(early.dq, lean.dq), 0.0) << "dq";
      EXPECT_EQ(max_abs_diff(early.dk, lean.dk), 0.0) << "dk";
      EXPECT_EQ(max_abs_diff(early.dv, lean.dv), 0.0) << "dv";
      EXPECT_LT(rel_err_f32(early.dg, lean.dg), 1e-5) << "dg";
      EXPECT_LT(rel_err_f32(early.db, lean.db), 1e-5) << "dbeta";
      EXPECT_LT(rel_err_f32(early.dE, lean.dE), 1e-6) << "d_entering";
      cb.expect_written(early);
    }
  }
}

// The chunk backward's tensor-map copies (the sums form's default on sm_90, session 16:
// its k, dh, r, v_new, T, v, dO and q tiles as one thread's boxes on two mbarriers)
// against its cp.async copies (LASP2_CUDA_TILE_COPY=cp_async): the same bytes
// in the places the products read, so dq, dk and dv must be equal bit for bit (and the
// entering-state gradient, which other kernels form), and since session 17 (the ordered
// form, the default: dg and dbeta summed in a fixed order) dg and dbeta too.
// EarlyEqualsLean's cases (rows and packed documents with a -inf gate inside a chunk, a
// part starting at token 37 and ending mid-chunk, one partial chunk, d = 64 and 128,
// bf16 and fp16) and fp16 at d = 64; both held to the CPU backend without -inf gates.
TEST(DeltaCudaChunkBackward, TensorMapEqualsCpAsync) {
  LASP2_SKIP_WITHOUT_CUDA();
  std::vector<ChunkBackwardCase> cases = kChunkBackwardCases;
  cases.push_back({64, false, ScalarType::kFloat16, {37, 280}});
  for (const ChunkBackwardCase& c : cases) {
    const ChunkBackwardRun cb(c);
    SCOPED_TRACE(cb.name());
    const DeltaSpec& spec = cb.spec;
    const DeltaProblem<float>& pr = cb.pr;
    const DeltaParams& dp = cb.dev.p;
    const EdgeStates& edge = cb.edge;
    const Grads ref = cb.run("LASP2_CUDA_TILE_COPY", "cp_async"), got = cb.run("LASP2_CUDA_TILE_COPY", "");
    EXPECT_EQ(bits_differ(got.dq, ref.dq), 0) << "dq";
    EXPECT_EQ(bits_differ(got.dk, ref.dk), 0) << "dk";
    EXPECT_EQ(bits_differ(got.dv, ref.dv), 0) << "dv";
    EXPECT_EQ(bits_differ(got.dE, ref.dE), 0) << "d_entering";
    EXPECT_EQ(bits_differ(got.dg, ref.dg), 0) << "dg";
    EXPECT_EQ(bits_differ(got.db, ref.db), 0) << "dbeta";
    cb.expect_written(got);
    if (!c.packed) {  // the CPU backend (no -inf gates)
      const DeltaParams hp = pr.params();
      const int64_t bh = dp.bh();
      std::vector<float> dq(pr.q.size(), 0.f), dk(pr.k.size(), 0.f), dv(pr.v.size(), 0.f);
      std::vector<float> dg(pr.g.size(), 0.f), db(pr.beta.size(), 0.f), dE(bh * dp.state_elems());
      delta::delta_cpu_backend().backward(hp, c.part, pr.dout_view(), edge.entering.data(), edge.leaving.data(),
                                          DocStates{}, {dq.data(), pr.strides(spec.dim_k)},
                                          {dk.data(), pr.strides(spec.dim_k)}, {dv.data(), pr.strides(spec.dim_v)},
                                          dg.data(), db.data(), dE.data(), nullptr);
      const double tol_io = 1e-2, tol_sum = c.type == ScalarType::kBFloat16 ? 1e-2 : 2e-3;
      for (const Grads* r : {&got, &ref}) {
        SCOPED_TRACE(r == &got ? "tensor maps vs CPU" : "cp.async vs CPU");
        for (auto [name, got_v, want_v, dim] : {std::tuple{"dq", &r->dq, &dq, spec.dim_k},
                                                {"dk", &r->dk, &dk, spec.dim_k}, {"dv", &r->dv, &dv, spec.dim_v}}) {
          std::vector<char> written(got_v->size(), 0);
          for (size_t i = 0; i < written.size(); ++i) written[i] = std::isnan((*got_v)[i]) ? 0 : 1;
          const Compare cmp = compare_rows(*got_v, written, *want_v, spec.batch, spec.seqlen, spec.heads, dim,
                                           c.part.begin, c.part.end);
          EXPECT_LT(cmp.rel, tol_io) << name;
          EXPECT_EQ(cmp.missing, 0) << name;
        }
        EXPECT_LT(rel_err_f32(r->dg, dg), tol_sum) << "dg";
        EXPECT_LT(rel_err_f32(r->db, db), tol_sum) << "dbeta";
      }
    }
  }
}

// Determinism (session 17): the same inputs give the same bits, run after run, from the
// chunked GDN backward (prep, the state pass, rprep, the reverse pass and the chunk
// backward, whose dg and dbeta the ordered form, the default, sums in a fixed order) and
// the chunked KDA backward (its sums in slots without atomics): dq, dk, dv, dg, dbeta and
// the entering state's gradient (dh0). GDN: ChunkBackwardRun's cases (four chunks a head,
// rows and packed documents with a -inf gate, d = 64 and 128, bf16 and fp16, a part of one
// partial chunk), four runs each, and the cp.async copies (the same arithmetic, so the same
// bits); GDN and KDA: 2048 tokens, 2 heads, rows (batch 2) and packed documents (batch 1),
// 32 chunks a head, d = 64 and 128, four runs each. (Packed documents with their own states
// are left out: their document chunks take the token-recurrent backward, whose per-token
// sums meet in global float atomics from several blocks, delta_recurrent.cu.)
struct SameBitsProblem {
  DeltaProblem<float> pr;
  DeviceProblem dev;
  TokenRange part{0, 2048};
  int64_t se;
  EdgeStates edge;
  SameBitsProblem(GateKind gate, int d, bool packed)
      : pr(prepared(gate, d, packed)), dev(pr, ScalarType::kBFloat16, Layout{false, 0}),
        se(dev.p.bh() * dev.p.state_elems()), edge(random_edge_states(12, se)) {}
  Grads run() const {
    Grads r;
    BackwardBuffers g(pr, ScalarType::kBFloat16, Layout{false, 0}, se);
    delta::delta_backend_for(Device::kCUDA)
        .backward(dev.p, part, dev.dout.cview(), edge.d_entering.p, edge.d_leaving.p, DocStates{}, g.dq.mview(),
                  g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
    g.download(r);
    return r;
  }

 private:
  static DeltaProblem<float> prepared(GateKind gate, int d, bool packed) {
    DeltaSpec spec = gdn_spec(d, 2048, packed ? 1 : 2);
    spec.gate_kind = gate;
    if (packed) spec.doc_starts = {5, 64, 65, 130, 201, 777, 1024, 1500, 2047};
    DeltaProblem<float> pr(spec, 53);
    prepare_inputs(pr, ScalarType::kBFloat16);
    return pr;
  }
};

// The words of got whose bits differ from want's, each output on its own.
void expect_same_bits(const Grads& got, const Grads& want) {
  EXPECT_EQ(bits_differ(got.dq, want.dq), 0) << "dq";
  EXPECT_EQ(bits_differ(got.dk, want.dk), 0) << "dk";
  EXPECT_EQ(bits_differ(got.dv, want.dv), 0) << "dv";
  EXPECT_EQ(bits_differ(got.dg, want.dg), 0) << "dg";
  EXPECT_EQ(bits_differ(got.db, want.db), 0) << "dbeta";
  EXPECT_EQ(bits_differ(got.dE, want.dE), 0) << "dh0 (d_entering)";
}

// A backward's dg and dbeta hold non-zero values in most of the part's tokens (so that the
// bit comparisons compare sums, not zeros).
void expect_sums_written(const Grads& r, int64_t tokens) {
  for (const auto* x : {&r.dg, &r.db}) {
    int64_t nonzero = 0;
    for (float e : *x) nonzero += std::isfinite(e) && e != 0.f ? 1 : 0;
    EXPECT_GT(nonzero, tokens / 2) << (x == &r.dg ? "dg" : "dbeta") << " written";
  }
}

TEST(DeltaCudaChunkBackward, SameInputsSameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const ChunkBackwardCase& c : kChunkBackwardCases) {
    const ChunkBackwardRun cb(c);
    SCOPED_TRACE(cb.name());
    const Grads first = cb.run("LASP2_DELTA_CHUNK_BWD_KERNEL", "");
    cb.expect_written(first);
    expect_sums_written(first, (c.part.end - c.part.begin) * cb.spec.heads);
    for (int rep = 0; rep < 3; ++rep) {
      SCOPED_TRACE("rerun " + std::to_string(rep + 1));
      expect_same_bits(cb.run("LASP2_DELTA_CHUNK_BWD_KERNEL", ""), first);
    }
    SCOPED_TRACE("cp.async copies");
    expect_same_bits(cb.run("LASP2_CUDA_TILE_COPY", "cp_async"), first);
  }
  for (const GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
    for (const int d : {64, 128})
      for (const bool packed : {false, true}) {
        const bool kda = gate == GateKind::kPerKey;
        const std::string name = std::string(kda ? "kda " : "gdn ") + (packed ? "packed" : "rows") +
                                 " d=" + std::to_string(d) + " T=2048";
        SCOPED_TRACE(name);
        if (!chunk_backward_fits_device(gate, d)) continue;  // the token walks (global atomics)
        const SameBitsProblem sb(gate, d, packed);
        const Grads first = sb.run();
        expect_sums_written(first, sb.part.length() * sb.pr.spec.heads);
        for (int rep = 0; rep < 3; ++rep) {
          SCOPED_TRACE("rerun " + std::to_string(rep + 1));
          expect_same_bits(sb.run(), first);
        }
      }
}

}  // namespace
}  // namespace lasp2::testing

// ---- packed documents with their own initial / end states on the chunked kernels -------
// GDN in bf16 / fp16, d = 64 and 128: the forward with the documents' initial states
// (DocStates::initial) and an entering state, and part_summary with initial states in and
// the end states of the documents begun and ended inside the part out (DocStates::finals;
// also without initial states), run the chunked kernels with delta_chunk_docs.h's terms.
// Held to the token-recurrent kernels (LASP2_DELTA_CHUNKED=0) and, without -inf gates,
// to the CPU backend, on two parts: one starting and ending mid-chunk (several documents
// inside one chunk, documents shorter than a chunk, one-token documents, one starting on a
// chunk's first token, documents crossing chunk boundaries) and the whole sequence (a
// document on the part's first token). -inf gates: inside a chunk, on a document's first
// token, on a chunk's first token. The backward with document states (the recurrent
// kernels) is held to the CPU backend too.
namespace lasp2::testing {
namespace {

struct DocStatesCase {
  ScalarType type;
  int d;
  bool neg_inf;
};

class DeltaCudaDocStates : public ::testing::TestWithParam<DocStatesCase> {};

TEST_P(DeltaCudaDocStates, ChunkedMatchesRecurrentAndCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const DocStatesCase c = GetParam();
  DeltaSpec spec = gdn_spec(c.d, 330, 1);
  // part {37, 310}: chunks begin at 37, 101, 165, 229, 293
  spec.doc_starts = {5, 40, 50, 52, 64, 101, 130, 200, 201, 202, 263, 270, 300};
  DeltaProblem<float> pr(spec, 41);
  prepare_inputs(pr, c.type);
  if (c.neg_inf) forget_at(pr, {37, 45, 52, 90, 165, 166, 250});
  DeviceProblem dev(pr, c.type, Layout{});
  const DeltaParams& dp = dev.p;
  const DeltaParams hp = pr.params();
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const DeltaKernelBackend& cpu = delta::delta_cpu_backend();
  const int64_t bh = dp.bh(), se = dp.state_elems(), me = dp.map_elems();
  const int64_t D = spec.num_docs() * spec.heads * se;
  const EdgeStates edge = random_edge_states(17, bh * se);
  auto d_initial = to_device_f32(pr.initial);
  // 16-bit operands in the state products (delta_chunk.h): o within 1e-2 as the chunked
  // forward without states; the states (M, finals: the 16-bit chunk state and v_new)
  // within 1e-2 of the fp32 walk
  const double tol_io = 1e-2, tol_state = 1e-2;

  for (const TokenRange part : {TokenRange{37, 310}, TokenRange{0, spec.seqlen}}) {
    SCOPED_TRACE("part " + std::to_string(part.begin) + ".." + std::to_string(part.end));
    struct Result {
      std::vector<double> o;
      std::vector<char> o_written;
      std::vector<float> A, M, hA, hM, finals, M0, finals0;
    };
    auto run = [&]() {
      Result r;
      DevTensor og(spec.batch, spec.seqlen, spec.heads, spec.dim_v, c.type, Layout{});
      DocStates ddoc;
      ddoc.initial = d_initial.p;
      gpu.forward(dp, part, edge.d_entering.p, ddoc, og.mview(), nullptr);
      auto ob = og.download();
      r.o = ob.v;
      r.o_written = ob.written;
      DevBuf<float> gA(bh * me), gM(bh * se), ghA(bh * me), ghM(bh * se), gfin = zeroed(D);
      ddoc.finals = gfin.p;
      gpu.part_summary(dp, part, ddoc, gA.p, gM.p, ghA.p, ghM.p, nullptr);
      r.A = gA.download();
      r.M = gM.download();
      r.hA = ghA.download();
      r.hM = ghM.download();
      r.finals = gfin.download();
      r.finals.resize(D);
      // end states without initial states (zero)
      DevBuf<float> gfin0 = zeroed(D);
      DocStates ends_only;
      ends_only.finals = gfin0.p;
      gpu.part_summary(dp, part, ends_only, gA.p, gM.p, ghA.p, ghM.p, nullptr);
      r.M0 = gM.download();
      r.finals0 = gfin0.download();
      r.finals0.resize(D);
      return r;
    };
    const Result got = run(), want = with_env("LASP2_DELTA_CHUNKED", "0", run);
    EXPECT_EQ(got.o_written, want.o_written) << "o written where the recurrent kernels write";
    EXPECT_LT(rel_in_part(got.o, want.o, part, spec.batch, spec.seqlen, spec.heads * spec.dim_v, "o"), tol_io)
        << "o";
    EXPECT_EQ(delta::testing::max_abs(got.A), 0.0) << "a part with a document start has A = 0 exactly";
    EXPECT_LT(rel_err_f32(got.M, want.M), tol_state) << "M";
    EXPECT_LT(rel_err_f32(got.hA, want.hA), 5e-3) << "head A";
    EXPECT_LT(rel_err_f32(got.hM, want.hM), 5e-3) << "head M";
    EXPECT_LT(rel_err_f32(got.finals, want.finals), tol_state) << "finals";
    EXPECT_LT(rel_err_f32(got.M0, want.M0), tol_state) << "M without initial states";
    EXPECT_LT(rel_err_f32(got.finals0, want.finals0), tol_state) << "finals without initial states";
    // the end states asked for are there: documents begun and ended inside the part
    int64_t written = 0;
    for (int64_t n = 0; n < spec.num_docs(); ++n) {
      double mag = 0;
      for (int64_t e = 0; e < spec.heads * se; ++e) mag = std::max(mag, std::abs(double(want.finals[n * spec.heads * se + e])));
      written += mag > 0 ? 1 : 0;
    }
    EXPECT_GE(written, 9) << "documents with end states in the part";
    // the initial states matter: without them M and the finals differ
    EXPECT_GT(rel_err_f32(want.finals0, want.finals), 0.05) << "initial states change the end states";

    if (!c.neg_inf) {  // and the CPU backend, call by call
      std::vector<float> o(pr.v.size(), 0.f);
      DocStates doc;
      doc.initial = pr.initial.data();
      cpu.forward(hp, part, edge.entering.data(), doc, {o.data(), pr.strides(spec.dim_v)}, nullptr);
      const Compare cmp = compare_rows(got.o, got.o_written, o, spec.batch, spec.seqlen, spec.heads, spec.dim_v,
                                       part.begin, part.end);
      EXPECT_LT(cmp.rel, tol_io) << "o vs CPU";
      EXPECT_EQ(cmp.missing, 0);
      EXPECT_EQ(cmp.clobbered, 0);
      std::vector<float> A(bh * me), M(bh * se), hA(bh * me), hM(bh * se), finals = zeros(D);
      doc.finals = finals.data();
      cpu.part_summary(hp, part, doc, A.data(), M.data(), hA.data(), hM.data(), nullptr);
      EXPECT_LT(rel_err_f32(got.M, M), tol_state) << "M vs CPU";
      EXPECT_LT(rel_err_f32(got.finals, finals), tol_state) << "finals vs CPU";
    }
  }

  // the backward with document states (initial states, end-state gradients, initial-state
  // gradients), an entering state and a leaving-state gradient: chunked against recurrent,
  // and against the CPU backend without -inf gates
  for (const TokenRange part : {TokenRange{37, 310}, TokenRange{0, spec.seqlen}}) {
    SCOPED_TRACE("backward, part " + std::to_string(part.begin) + ".." + std::to_string(part.end));
    auto d_final_dstate = to_device_f32(pr.final_dstate);
    struct BwdResult : Grads {
      std::vector<float> dI;
    };
    auto run = [&]() {
      BwdResult r;
      BackwardBuffers g(pr, c.type, Layout{}, bh * se);
      DevBuf<float> gdI = zeroed(D);
      DocStates ddoc;
      ddoc.initial = d_initial.p;
      ddoc.final_dstate = d_final_dstate.p;
      ddoc.d_initial = gdI.p;
      gpu.backward(dp, part, dev.dout.cview(), edge.d_entering.p, edge.d_leaving.p, ddoc, g.dq.mview(), g.dk.mview(),
                   g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
      g.download(r);
      r.dI = gdI.download();
      r.dI.resize(D);
      return r;
    };
    const BwdResult got = run(), want = with_env("LASP2_DELTA_CHUNKED", "0", run);
    // as DeltaCudaChunked: 16-bit state operands in the chunked passes
    const double tol_sum = c.type == ScalarType::kBFloat16 ? 1e-2 : 2e-3;
    EXPECT_LT(rel_in_part(got.dq, want.dq, part, spec.batch, spec.seqlen, spec.heads * spec.dim_k, "dq"), tol_io)
        << "dq";
    EXPECT_LT(rel_in_part(got.dk, want.dk, part, spec.batch, spec.seqlen, spec.heads * spec.dim_k, "dk"), tol_io)
        << "dk";
    EXPECT_LT(rel_in_part(got.dv, want.dv, part, spec.batch, spec.seqlen, spec.heads * spec.dim_v, "dv"), tol_io)
        << "dv";
    EXPECT_LT(rel_err_f32(got.dg, want.dg), tol_sum) << "dg";
    EXPECT_LT(rel_err_f32(got.db, want.db), tol_sum) << "dbeta";
    EXPECT_LT(rel_err_f32(got.dI, want.dI), tol_sum) << "d_initial";
    EXPECT_LT(rel_err_f32(got.dE, want.dE), tol_sum) << "d_entering";
    EXPECT_GT(delta::testing::max_abs(want.dI), 0.0) << "initial-state gradients asked for";

    if (!c.neg_inf) {
      std::vector<float> dq(pr.q.size(), 0.f), dk(pr.k.size(), 0.f), dv(pr.v.size(), 0.f);
      std::vector<float> dg(pr.g.size(), 0.f), db(pr.beta.size(), 0.f), dI = zeros(D), dE(bh * se);
      DocStates doc;
      doc.initial = pr.initial.data();
      doc.final_dstate = pr.final_dstate.data();
      doc.d_initial = dI.data();
      cpu.backward(hp, part, pr.dout_view(), edge.entering.data(), edge.leaving.data(), doc,
                   {dq.data(), pr.strides(spec.dim_k)}, {dk.data(), pr.strides(spec.dim_k)},
                   {dv.data(), pr.strides(spec.dim_v)}, dg.data(), db.data(), dE.data(), nullptr);
      for (auto [name, got_v, want_v, dim] : {std::tuple{"dq", &got.dq, &dq, spec.dim_k}, {"dk", &got.dk, &dk, spec.dim_k},
                                              {"dv", &got.dv, &dv, spec.dim_v}}) {
        std::vector<char> written(got_v->size(), 0);
        for (size_t i = 0; i < written.size(); ++i) written[i] = std::isnan((*got_v)[i]) ? 0 : 1;
        const Compare cmp =
            compare_rows(*got_v, written, *want_v, spec.batch, spec.seqlen, spec.heads, dim, part.begin, part.end);
        EXPECT_LT(cmp.rel, tol_io) << name << " vs CPU";
        EXPECT_EQ(cmp.missing, 0) << name << " vs CPU";
      }
      EXPECT_LT(rel_err_f32(got.dg, dg), tol_sum) << "dg vs CPU";
      EXPECT_LT(rel_err_f32(got.db, db), tol_sum) << "dbeta vs CPU";
      EXPECT_LT(rel_err_f32(got.dI, dI), tol_sum) << "d_initial vs CPU";
      EXPECT_LT(rel_err_f32(got.dE, dE), tol_sum) << "d_entering vs CPU";
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    All, DeltaCudaDocStates,
    ::testing::Values(DocStatesCase{ScalarType::kBFloat16, 128, false}, DocStatesCase{ScalarType::kBFloat16, 64, true},
                      DocStatesCase{ScalarType::kFloat16, 64, false}, DocStatesCase{ScalarType::kFloat16, 128, true}),
    [](const ::testing::TestParamInfo<DocStatesCase>& info) {
      const auto& c = info.param;
      return std::string(dtype_name(c.type)) + "_d" + std::to_string(c.d) + (c.neg_inf ? "_neginf" : "");
    });

// The tma state passes (LASP2_DELTA_STATE_KERNEL=tma, the default on sm_90: their
// epilogue's decays and loads before the token product, docs/history/delta-rule-log.md "State passes,
// fifteenth round") through the backend against w8's: forward, part_summary and backward
// with document states (initial states, finals, end-state and initial-state gradients,
// the passes' S += f H and F-in-X's-place chunks), -inf gates, an entering state and a
// leaving gradient. The same arithmetic, so o, the maps, the finals, dq, dk and dv must be
// equal bit for bit; dg, dbeta and the state gradients sum through atomics (last bits may
// move from run to run).
TEST(DeltaCudaStatePasses, TmaEqualsW8ThroughBackend) {
  LASP2_SKIP_WITHOUT_CUDA();
  int major = 0;
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0), "compute capability");
  if (major < 9) GTEST_SKIP() << "the tma passes run on sm_90 and later";
  for (const bool docs : {true, false}) {
    SCOPED_TRACE(docs ? "documents with states" : "rows");
    DeltaSpec spec = gdn_spec(128, 330, docs ? 1 : 2);
    spec.heads = 5;
    if (docs) spec.doc_starts = {5, 40, 50, 52, 64, 101, 130, 200, 201, 202, 263, 270, 300};
    DeltaProblem<float> pr(spec, 43);
    prepare_inputs(pr, ScalarType::kBFloat16);
    // -inf gates inside chunks, two in a row, on a chunk's first token (the part's chunks
    // begin at 37, 101, 165, 229, 293); not on the part's first token (d_entering would be 0)
    forget_at(pr, {45, 90, 165, 166, 250});
    DeviceProblem dev(pr, ScalarType::kBFloat16, Layout{});
    const DeltaParams& dp = dev.p;
    const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
    const int64_t bh = dp.bh(), se = dp.state_elems(), me = dp.map_elems();
    const int64_t D = docs ? spec.num_docs() * spec.heads * se : 0;
    const EdgeStates edge = random_edge_states(19, bh * se);
    DevBuf<float> d_initial = docs ? to_device_f32(pr.initial) : zeroed(1);
    DevBuf<float> d_final_dstate = docs ? to_device_f32(pr.final_dstate) : zeroed(1);
    const TokenRange part{37, 310};
    struct Out : Grads {
      std::vector<double> o;
      std::vector<float> A, M, finals, dI;
    };
    auto run = [&](const char* family) {
      const EnvGuard scope("LASP2_DELTA_STATE_KERNEL", family);
      Out r;
      DocStates ddoc;
      DevBuf<float> gfin = zeroed(std::max<int64_t>(D, 1)), gdI = zeroed(std::max<int64_t>(D, 1));
      if (docs) ddoc.initial = d_initial.p;
      DevTensor og(spec.batch, spec.seqlen, spec.heads, spec.dim_v, ScalarType::kBFloat16, Layout{});
      gpu.forward(dp, part, edge.d_entering.p, ddoc, og.mview(), nullptr);
      r.o = og.download().v;
      DevBuf<float> gA(bh * me), gM(bh * se), ghA(bh * me), ghM(bh * se);
      if (docs) ddoc.finals = gfin.p;
      gpu.part_summary(dp, part, ddoc, gA.p, gM.p, ghA.p, ghM.p, nullptr);
      r.A = gA.download();
      r.M = gM.download();
      r.finals = gfin.download();
      DocStates bdoc;
      if (docs) {
        bdoc.initial = d_initial.p;
        bdoc.final_dstate = d_final_dstate.p;
        bdoc.d_initial = gdI.p;
      }
      BackwardBuffers g(pr, ScalarType::kBFloat16, Layout{}, bh * se);
      gpu.backward(dp, part, dev.dout.cview(), edge.d_entering.p, edge.d_leaving.p, bdoc, g.dq.mview(), g.dk.mview(),
                   g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
      g.download(r);
      r.dI = gdI.download();
      cuda_ok(cudaDeviceSynchronize(), "passes");
      return r;
    };
    const Out w8 = run("w8");
    auto same = [](const auto& a, const auto& b) {
      int64_t differ = a.size() == b.size() ? 0 : -1;
      for (size_t i = 0; differ >= 0 && i < a.size(); ++i)
        differ += std::memcmp(&a[i], &b[i], sizeof(a[i])) != 0 && !(std::isnan(a[i]) && std::isnan(b[i]));
      return differ;
    };
    const Out tma = run("tma");
    EXPECT_EQ(same(w8.o, tma.o), 0) << "o";
    EXPECT_EQ(same(w8.A, tma.A), 0) << "A";
    EXPECT_EQ(same(w8.M, tma.M), 0) << "M";
    EXPECT_EQ(same(w8.finals, tma.finals), 0) << "finals";
    if (docs) {  // the chunks with a document start take dq, dk from the recurrent backward's atomics
      const int64_t row = spec.heads * spec.dim_k;
      EXPECT_LT(rel_in_part(tma.dq, w8.dq, part, spec.batch, spec.seqlen, row, "dq"), 1e-2) << "dq";
      EXPECT_LT(rel_in_part(tma.dk, w8.dk, part, spec.batch, spec.seqlen, row, "dk"), 1e-2) << "dk";
    } else {
      EXPECT_EQ(same(w8.dq, tma.dq), 0) << "dq";
      EXPECT_EQ(same(w8.dk, tma.dk), 0) << "dk";
    }
    EXPECT_EQ(same(w8.dv, tma.dv), 0) << "dv";
    EXPECT_LT(rel_err_f32(tma.dg, w8.dg), 1e-5) << "dg";
    EXPECT_LT(rel_err_f32(tma.db, w8.db), 1e-5) << "dbeta";
    EXPECT_LT(rel_err_f32(tma.dE, w8.dE), 1e-5) << "d_entering";
    if (docs) EXPECT_LT(rel_err_f32(tma.dI, w8.dI), 1e-5) << "d_initial";
    // the comparison has something to compare: gradients and outputs were written
    EXPECT_GT(delta::testing::max_abs(w8.dE), 0.0) << "d_entering";
    EXPECT_GT(delta::testing::max_abs(w8.M), 0.0) << "M";
  }
}

}  // namespace
}  // namespace lasp2::testing

// ---- timing: packed documents with their own states, chunked against recurrent --------
// One GDN layer at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16, documents of
// 1000 tokens (starting inside chunks) with initial states: the forward with them and
// part_summary with them and the end states asked for, on the chunked kernels with
// delta_chunk_docs.h's terms and on the recurrent ones (LASP2_DELTA_CHUNKED=0), the
// backward with initial states, end-state and initial-state gradients likewise, and the
// forward and backward without document states for reference (printed; asserts finite
// outputs).
namespace lasp2::testing {
namespace {

TEST(DeltaCudaDocStatesTiming, GdnPackedOneDevice) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128, L = 1000;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      o(1, T, H, D, type, Layout{}), dout(1, T, H, D, type, Layout{}), dq(1, T, H, D, type, Layout{}),
      dk(1, T, H, D, type, Layout{}), dv(1, T, H, D, type, Layout{});
  std::mt19937 rng(3);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const int64_t docs = (T + L - 1) / L;
  std::vector<uint8_t> start(T, 0);
  std::vector<int32_t> id(T, 0);
  for (int64_t t = 0; t < T; ++t) {
    start[t] = t % L == 0 ? 1 : 0;
    id[t] = static_cast<int32_t>(t / L);
  }
  DevBuf<uint8_t> d_start(T);
  DevBuf<int32_t> d_id(T);
  d_start.upload(start);
  d_id.upload(id);
  std::vector<float> init(docs * H * D * D);
  std::normal_distribution<float> normal(0.f, 0.3f);
  for (auto& e : init) e = normal(rng);
  DevBuf<float> d_init = to_device_f32(init), finals = zeroed(docs * H * D * D), d_final = to_device_f32(init),
                d_dinit = zeroed(docs * H * D * D), dg = zeroed(T * H), dbeta = zeroed(T * H);
  DevBuf<float> A(H * D * D), M(H * D * D), hA(H * D * D), hM(H * D * D);
  DeltaParams p = gdn_params(q, k, v, gb);
  p.doc_start = d_start.p;
  p.doc_id = d_id.p;
  p.doc_batch_stride = T;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{0, T};
  DocStates doc;
  doc.initial = d_init.p;
  DocStates sum_doc = doc;
  sum_doc.finals = finals.p;
  LaunchTimer timer;
  auto time_calls = [&](const char* what) {
    const float fwd = timer.median_ms([&] { gpu.forward(p, part, nullptr, doc, o.mview(), nullptr); }, 4);
    const auto ob = o.download();
    int64_t bad = 0;
    for (double x : ob.v) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": o";
    const float sum = timer.median_ms(
        [&] { gpu.part_summary(p, part, sum_doc, A.p, M.p, hA.p, hM.p, nullptr); }, 4);
    const std::vector<float> m = M.download();
    for (float x : m) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": M";
    DocStates bwd_doc = doc;
    bwd_doc.final_dstate = d_final.p;
    bwd_doc.d_initial = d_dinit.p;
    const float bwd = timer.median_ms(
        [&] {
          gpu.backward(p, part, dout.cview(), nullptr, nullptr, bwd_doc, dq.mview(), dk.mview(), dv.mview(), dg.p,
                       dbeta.p, nullptr, nullptr);
        },
        3);
    for (const DevTensor* t : {&dq})
      for (double x : t->download().v) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": dq";
    std::printf("[doc states T=%lld H=%lld D=%lld, %lld documents] %s: forward %.3f ms, part_summary %.3f ms, "
                "backward %.3f ms\n",
                static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(D),
                static_cast<long long>(docs), what, fwd, sum, bwd);
  };
  time_calls("chunked");
  {
    const EnvGuard off("LASP2_DELTA_CHUNKED", "0");
    time_calls("recurrent");
  }
  const float plain = timer.median_ms([&] { gpu.forward(p, part, nullptr, DocStates{}, o.mview(), nullptr); }, 4);
  const float plain_bwd = timer.median_ms(
      [&] {
        gpu.backward(p, part, dout.cview(), nullptr, nullptr, DocStates{}, dq.mview(), dk.mview(), dv.mview(), dg.p,
                     dbeta.p, nullptr, nullptr);
      },
      3);
  std::printf("[doc states T=%lld] chunked without document states: forward %.3f ms, backward %.3f ms\n",
              static_cast<long long>(T), plain, plain_bwd);
}

}  // namespace
}  // namespace lasp2::testing
