// GDN's state-pass kernel families (LASP2_DELTA_STATE_KERNEL: w8, w8calc, tma) against
// each other, bit for bit: the passes launched directly, the part summary and the whole
// backend with document states.
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/delta_backend.h"
#include "delta_test_util.h"
#include "gdn_layer.h"

namespace lasp2::testing::delta_cuda {
namespace {

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
    const gpu::View dO = delta::cuda_route::view_of(dout.cview());
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
    DeltaDeviceProblem dev(pr, c.type, Layout{});
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
    DeltaDeviceProblem dev(pr, ScalarType::kBFloat16, Layout{});
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
}  // namespace lasp2::testing::delta_cuda
