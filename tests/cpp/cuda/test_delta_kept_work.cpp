// Work the chunked kernels keep from one call for the next (KeptPartWork: entering_dstate
// for the backward; the forward's kept buffer for the backward and the LASP-2 schedule),
// against the calls that recompute it: the same kernels on the same inputs, so the same
// bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
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

// The problem of the kept-work tests below (DeltaCudaKeptPrep, DeltaCudaForwardKept): bf16,
// d_k = d_v = d, 300 tokens, rows (batch 2) or packed documents (batch 1), on the device;
// the part [37, 280) (starting inside a chunk, four chunks), with random entering states
// and leaving-state gradients.
struct KeptWorkProblem {
  DeltaProblem<float> pr;
  Layout lay{false, 0};
  DeltaDeviceProblem dev;
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
      std::unique_ptr<KeptPartWork> kept;
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
          std::unique_ptr<KeptPartWork> work;
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
// packed documents without states (the one-device form, one part). One row with two parts
// a rank runs them as one pair (delta_pair.h), whose kept slot is the buffer's start: rows
// with states on one device, packed documents without on two ranks.
struct ScheduleOut {
  std::vector<std::vector<double>> oqkv;  // o, dq, dk, dv
  std::vector<float> dg, db, dI;
};

ScheduleOut run_schedule(const DeltaProblem<float>& pr, const PartLayout& layout, Communicator* comm, bool keep) {
  const DeltaSpec& spec = pr.spec;
  const bool packed = spec.packed();
  const Layout lay{false, 0};
  DeltaDeviceProblem dev(pr, ScalarType::kBFloat16, lay);
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
    auto spec_of = [&](bool packed, int64_t seqlen, int64_t batch = 2) {
      DeltaSpec spec = gdn_spec(d, seqlen, packed ? 1 : batch);
      spec.gate_kind = gate;
      if (packed) spec.doc_starts = {5, 64, 65, 130, 201};
      return spec;
    };
    struct Form {
      bool packed;
      int parts;
      int64_t batch;
    };
    for (const Form& f : {Form{false, 1, 2}, Form{false, 2, 2}, Form{true, 1, 1}, Form{false, 2, 1}}) {
      const bool packed = f.packed;
      const int parts = f.parts;
      SCOPED_TRACE(family + " d=" + std::to_string(d) + (packed ? " packed" : " rows") +
                   " parts=" + std::to_string(parts) + " batch=" + std::to_string(f.batch));
      DeltaProblem<float> pr(spec_of(packed, 320, f.batch), 41);
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
    // two ranks of two parts, one row of packed documents without states: each rank's pair
    run_device_ranks(2, [&](int rank, DeviceThreadCommunicator& comm) {
      SCOPED_TRACE(family + " d=" + std::to_string(d) + " packed, two parts, rank " + std::to_string(rank) + " of 2");
      DeltaProblem<float> pr(spec_of(true, 320), 41 + rank);
      prepare_inputs(pr, ScalarType::kBFloat16);
      const PartLayout layout{2, rank, 2};
      const ScheduleOut want = run_schedule(pr, layout, &comm, false);
      expect_schedules_equal(run_schedule(pr, layout, &comm, true), want);
    });
  }
}

}  // namespace
}  // namespace lasp2::testing::delta_cuda
