// GDN's chunked kernels with packed documents' own initial and end states
// (delta_chunk_docs.h) against the token-recurrent kernels and the CPU backend.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/delta_backend.h"
#include "delta_test_util.h"

namespace lasp2::testing::delta_cuda {
namespace {

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
  DeltaDeviceProblem dev(pr, c.type, Layout{});
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
      const auto [dq, dk, dv, dg, db, dI, dE] =
          cpu_backward(pr, part, edge.entering.data(), edge.leaving.data(), true);
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

}  // namespace
}  // namespace lasp2::testing::delta_cuda
