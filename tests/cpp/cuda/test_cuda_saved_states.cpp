// The dq pass reading the segment states chunk_forward_kept kept, against the pass that
// computes them again; the forward reading what part_state_keeping kept, the dq and dk/dv
// passes what part_dstate_keeping and chunk_backward_dq_keeping kept.
#include <gtest/gtest.h>

#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "../problem.h"

namespace lasp2::testing {
namespace {

// ---- segment states kept from forward for the dq pass -----------------------------------
// chunk_forward_kept keeps the exit-weighted segment states of (k, v), scanned from zero;
// chunk_backward_dq_keeping reads them instead of running the state pass. They do not
// depend on the entering state (forward from zero, dq with S0: what LASP-2's
// overlapped forward and its backward do), so dq and q.dq equal the recomputing pass
// bit for bit, also when read twice (the pass adds S0 into its own scratch and leaves
// them intact); altered states change dq, so the pass reads them; and a dq on the generic
// route (padded views) reading states of the tensor-core forward still matches the CPU.

// part_state_keeping (LASP-2's part summary) keeps what chunk_forward_kept keeps, bit for
// bit, in every slot but the last segment's (whose state the output pass does not walk and
// the summary does: any finite value there), with part_state's state and log decay, and
// chunk_forward_kept reading them (and the kept meta) gives chunk_forward's o bit for bit
// (with an entering state); altered states change o, so the pass reads them.
void expect_summary_keeps(const OpCase& c, const DeviceProblem& dp, TokenRange part,
                          const std::vector<float>& kept_by_forward, const float* S0) {
  const KernelBackend& gpu = cuda_backend();
  const AttentionParams& pg = dp.p;
  const int64_t bh = pg.bh(), se = pg.state_elems(), n = static_cast<int64_t>(kept_by_forward.size());
  const int64_t nseg = n / (bh * se);
  DevBuf<float> kept(n), state(bh * se), state_re(bh * se), L(bh), L_re(bh);
  kept.poison();
  const std::unique_ptr<KeptPartWork> work = gpu.part_state_keeping(pg, part, state.p, L.p, kept.p, nullptr);
  ASSERT_NE(work, nullptr) << c.name;
  gpu.part_state(pg, part, state_re.p, L_re.p, nullptr);
  EXPECT_EQ(float_bits(state.download()), float_bits(state_re.download())) << c.name << ": summary state";
  EXPECT_EQ(float_bits(L.download()), float_bits(L_re.download())) << c.name << ": summary log decay";
  const std::vector<float> got = kept.download();
  const std::vector<uint32_t> got_bits = float_bits(got), want_bits = float_bits(kept_by_forward);
  for (int64_t i = 0; i < n; ++i) {
    const bool last = (i / se) % nseg == nseg - 1;
    if (last) ASSERT_TRUE(std::isfinite(got[i])) << c.name << ": last segment's slot value " << i;
    else ASSERT_EQ(got_bits[i], want_bits[i]) << c.name << ": kept value " << i;
  }
  DevTensor o = dp.like_v(), o_re = dp.like_v(), o_bad = dp.like_v();
  gpu.chunk_forward_kept(pg, part, S0, o.mview(), kept.p, work.get(), nullptr);
  gpu.chunk_forward(pg, part, S0, o_re.mview(), nullptr);
  EXPECT_EQ(o.buf.download(), o_re.buf.download()) << c.name << ": o from the summary's states";
  std::vector<float> altered = got;
  for (float& x : altered) x = 0.5f * x + 1.f;
  kept.upload(altered);
  gpu.chunk_forward_kept(pg, part, S0, o_bad.mview(), kept.p, work.get(), nullptr);
  EXPECT_NE(o_bad.buf.download(), o_re.buf.download()) << c.name << ": altered states left o unchanged";
}

// part_dstate_keeping (LASP-2's entering-state gradient of a part) gives part_dstate's
// gradient bit for bit and keeps what the dq and dk/dv passes then read, and
// chunk_backward_dq_keeping keeps what the dk/dv pass reads where nothing was kept before
// (one device): dq, q.dq, dk, dv and dg equal the plain passes' bit for bit, with a
// gradient leaving the part, through either chain.
void expect_dstate_keeps(const OpCase& c, const DeviceProblem& dp, TokenRange part) {
  const KernelBackend& gpu = cuda_backend();
  const AttentionParams& pg = dp.p;
  const int64_t bh = pg.bh(), se = pg.state_elems(), scalars = c.B * c.T * c.H;
  const bool with_dg = c.mode != DecayMode::kNone;
  DevBuf<float> dstate(bh * se), dstate_re(bh * se);
  std::unique_ptr<KeptPartWork> summary = gpu.part_dstate_keeping(pg, part, dp.dout.cview(), dstate.p, nullptr);
  ASSERT_NE(summary, nullptr) << c.name << ": nothing kept";
  gpu.part_dstate(pg, part, dp.dout.cview(), dstate_re.p, nullptr);
  EXPECT_EQ(float_bits(dstate.download()), float_bits(dstate_re.download())) << c.name << ": entering gradient";
  const std::vector<double> s0 = random_vec(bh * se, 22, 2.0), s1 = random_vec(bh * se, 23, 2.0);
  DevBuf<float> S0 = to_device_f32(std::vector<float>(s0.begin(), s0.end()));
  DevBuf<float> S1 = to_device_f32(std::vector<float>(s1.begin(), s1.end()));
  struct Grads {
    DevTensor dq, dk, dv;
    DevBuf<float> qdq, dg;
  };
  const auto fresh = [&] {
    Grads g{dp.like_k(), dp.like_k(), dp.like_v(), DevBuf<float>(scalars), DevBuf<float>(scalars)};
    g.qdq.poison();
    g.dg.poison();
    return g;
  };
  const auto dkdv = [&](Grads& g, KeptPartWork* kept) {
    gpu.chunk_backward_dkdv_kept(pg, part, dp.dout.cview(), S1.p, g.dk.mview(), g.dv.mview(),
                                 with_dg ? g.qdq.p : nullptr, nullptr, with_dg ? g.dg.p : nullptr, kept, nullptr);
  };
  Grads want = fresh();
  gpu.chunk_backward_dq(pg, part, dp.dout.cview(), S0.p, want.dq.mview(), with_dg ? want.qdq.p : nullptr, nullptr);
  dkdv(want, nullptr);
  const auto expect_equal = [&](Grads& got, const char* chain) {
    EXPECT_EQ(got.dq.buf.download(), want.dq.buf.download()) << c.name << " " << chain << ": dq";
    EXPECT_EQ(float_bits(got.qdq.download()), float_bits(want.qdq.download())) << c.name << " " << chain << ": q.dq";
    EXPECT_EQ(got.dk.buf.download(), want.dk.buf.download()) << c.name << " " << chain << ": dk";
    EXPECT_EQ(got.dv.buf.download(), want.dv.buf.download()) << c.name << " " << chain << ": dv";
    EXPECT_EQ(float_bits(got.dg.download()), float_bits(want.dg.download())) << c.name << " " << chain << ": dg";
  };
  for (const bool after_summary : {true, false}) {
    Grads got = fresh();
    std::unique_ptr<KeptPartWork> kept =
        gpu.chunk_backward_dq_keeping(pg, part, dp.dout.cview(), S0.p, got.dq.mview(), with_dg ? got.qdq.p : nullptr,
                                      nullptr, after_summary ? std::move(summary) : nullptr, nullptr);
    ASSERT_NE(kept, nullptr) << c.name << ": the dq pass kept nothing for the dk/dv pass";
    dkdv(got, kept.get());
    expect_equal(got, after_summary ? "summary, dq, dk/dv" : "dq, dk/dv");
  }
}

void run_saved_states_case(const OpCase& c) {
  const CaseKnobs knobs(c);
  const Problem<double> pr = make_problem(c, 2000 + static_cast<uint32_t>(c.T));
  const AttentionParams pc = pr.params();
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const KernelBackend& gpu = cuda_backend();
  const int64_t bh = pc.bh(), se = pc.state_elems(), scalars = c.B * c.T * c.H;
  const std::vector<double> s0 = random_vec(bh * se, 21, 2.0);
  const std::vector<float> S0(s0.begin(), s0.end());
  DevBuf<float> S0d = to_device_f32(S0);

  const int64_t n = gpu.saved_states_floats(pg, part);
  ASSERT_GT(n, 0) << "one segment: nothing to keep, the case tests nothing";
  ASSERT_EQ(n % (bh * se), 0);
  DevBuf<float> kept(n);
  kept.poison();
  DevTensor o = dp.like_v(), o_plain = dp.like_v();
  gpu.chunk_forward_kept(pg, part, nullptr, o.mview(), kept.p, nullptr, nullptr);
  gpu.chunk_forward(pg, part, nullptr, o_plain.mview(), nullptr);
  EXPECT_EQ(o.buf.download(), o_plain.buf.download()) << c.name << ": keeping changed o";
  const std::vector<float> kept_host = kept.download();
  for (float x : kept_host) ASSERT_TRUE(std::isfinite(x)) << c.name << ": kept states not all written";

  expect_summary_keeps(c, dp, part, kept_host, S0d.p);
  expect_dstate_keeps(c, dp, part);

  auto dq_of = [&](const float* saved, const KernelBackend& be, DevTensor& dq, DevBuf<float>& qdq) {
    qdq.poison();
    be.chunk_backward_dq_keeping(pg, part, dp.dout.cview(), S0d.p, dq.mview(), qdq.p, saved, nullptr, nullptr);
  };
  DevTensor dq_re = dp.like_k(), dq_a = dp.like_k(), dq_b = dp.like_k(), dq_bad = dp.like_k();
  DevBuf<float> qdq_re(scalars), qdq_a(scalars), qdq_b(scalars), qdq_bad(scalars);
  dq_of(nullptr, gpu, dq_re, qdq_re);
  dq_of(kept.p, gpu, dq_a, qdq_a);
  dq_of(kept.p, gpu, dq_b, qdq_b);
  EXPECT_EQ(dq_a.buf.download(), dq_re.buf.download()) << c.name << ": dq from kept states";
  // bit patterns: q.dq is written only where dg needs it (gates), elsewhere both keep
  // their NaN poison, which == would call unequal
  EXPECT_EQ(float_bits(qdq_a.download()), float_bits(qdq_re.download())) << c.name << ": q.dq from kept states";
  EXPECT_EQ(dq_b.buf.download(), dq_re.buf.download()) << c.name << ": second read";
  EXPECT_EQ(kept.download(), kept_host) << c.name << ": the dq pass changed the kept states";

  std::vector<float> altered = kept_host;
  for (float& x : altered) x = 0.5f * x + 1.f;
  kept.upload(altered);
  dq_of(kept.p, gpu, dq_bad, qdq_bad);
  EXPECT_NE(dq_bad.buf.download(), dq_re.buf.download()) << c.name << ": altered kept states left dq unchanged";
  kept.upload(kept_host);

  // the CPU reference, then dq on padded views (generic route) with the kept states
  std::vector<double> want_dq = pr.zeros_like_k(), want_qdq(scalars, 0.0);
  cpu_backend().chunk_backward_dq(pc, part, pr.dout_view(), S0.data(), {want_dq.data(), pr.strides(c.dk)},
                                  want_qdq.data(), nullptr);
  expect_rows(c, "dq_saved", dq_a, want_dq, tol_of(c.dtype));
  DeviceProblem padded(pr, c.dtype, Layout{true, 3});
  DevTensor dq_pad = padded.like_k();
  DevBuf<float> qdq_pad(scalars);
  qdq_pad.poison();
  gpu.chunk_backward_dq_keeping(padded.p, part, padded.dout.cview(), S0d.p, dq_pad.mview(), qdq_pad.p, kept.p,
                                nullptr, nullptr);
  expect_rows(c, "dq_saved_pad3", dq_pad, want_dq, tol_of(c.dtype));
  expect_scalars(c, "q.dq_saved_pad3", qdq_pad, want_qdq, tol_of(c.dtype));
  EXPECT_EQ(cpu_backend().saved_states_floats(pc, part), 0) << "the CPU backend keeps nothing";
}

TEST(CudaSavedStates, DqFromForwardStatesEqualsRecompute) {
  LASP2_SKIP_WITHOUT_CUDA();
  OpCase c;  // part [37, 1000), 2-chunk segments, documents at chunk and segment edges
  c.docs = {101, 293, 294, 600, 999};
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat16, ScalarType::kFloat32})
    for (DecayMode m : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate}) {
      c.dtype = t;
      c.mode = m;
      c.dk = c.dv = t == ScalarType::kFloat16 ? 64 : 128;
      c.name = std::string("saved_") + dtype_name(t) + "_" + std::to_string(static_cast<int>(m)) + "_D" +
               std::to_string(c.dk);
      run_saved_states_case(c);
    }
  // the backend's own segments at T = 4109
  run_saved_states_case(whole_sequence_case("saved_bf16_gate_D128_T4109_auto", DecayMode::kGate, 128, 128, 4109, 0));
  c = whole_sequence_case("saved_bf16_fixed_D128_seg16_sub3", DecayMode::kFixed, 128, 128, 2200, 16);
  c.state_sub_chunks = 3;  // the kept states from split walks
  run_saved_states_case(c);
}

}  // namespace
}  // namespace lasp2::testing
