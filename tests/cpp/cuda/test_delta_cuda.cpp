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
#include <random>
#include <string>
#include <tuple>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/delta_backend.h"
#include "delta_rule/delta_family.h"
#include "delta_test_util.h"
#include "lasp2/lasp2.h"

namespace lasp2::testing::delta_cuda {
namespace {

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
  DeltaDeviceProblem dev(pr, c.type, lay);
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
    const auto [dq, dk, dv, dg, db, dI, dE] = cpu_backward(pr, part, entering.data(), leaving.data(), true);

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
  int64_t batch = 0;  // rows: 0 is spec_for's 2; 1 with two parts runs them as one pair (delta_pair.h)
};

class DeltaCudaSchedule : public ::testing::TestWithParam<ScheduleCase> {};

TEST_P(DeltaCudaSchedule, MatchesCpuSchedule) {
  LASP2_SKIP_WITHOUT_CUDA();
  const ScheduleCase c = GetParam();
  const SegLenScope seg_scope(c.seg_len);
  DeltaCase dc{c.gate, c.packed, ScalarType::kFloat32, 64, 64, false};
  DeltaSpec spec = spec_for(dc);
  if (c.batch > 0) spec.batch = c.batch;
  DeltaProblem<float> pr(spec, 13);
  prepare_inputs(pr, ScalarType::kFloat32);
  const DeltaSpec& s = pr.spec;
  const DeltaParams hp = pr.params();
  DeltaDeviceProblem dev(pr, ScalarType::kFloat32, Layout{});
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
                      ScheduleCase{GateKind::kPerKey, true, 2, 64}, ScheduleCase{GateKind::kPerKey, false, 1, 128},
                      ScheduleCase{GateKind::kScalar, false, 2, 0, 1}, ScheduleCase{GateKind::kPerKey, false, 2, 0, 1}),
    [](const ::testing::TestParamInfo<ScheduleCase>& info) {
      const auto& c = info.param;
      return std::string(c.gate == GateKind::kScalar ? "gdn" : "kda") +
             (c.packed ? "_packed" : "_rows") + "_parts" + std::to_string(c.parts) +
             (c.seg_len ? "_seg" + std::to_string(c.seg_len) : "") + (c.batch == 1 ? "_B1" : "");
    });

}  // namespace
}  // namespace lasp2::testing::delta_cuda
