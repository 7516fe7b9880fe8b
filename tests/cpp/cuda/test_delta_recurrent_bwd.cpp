// The token-recurrent backward (delta_recurrent.cu's backward_kernel) with its per-token
// sums in a row per token of the stretch (the default since session 26, and
// LASP2_DELTA_RECURRENT_BWD=tokens: one block barrier per half a stretch less) against
// rows per half a stretch (=halves, the form before): the same sums in the same order,
// so the same bits.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "../expect_error.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/delta_backend.h"
#include "delta_test_util.h"

namespace lasp2::testing::delta_cuda {
namespace {

// A backward call on the device: the recurrent kernels for everything (recurrent), or the
// default route (GDN's chunked kernels, which give the chunks where a document with its
// own state starts to the recurrent backward, one block per such chunk).
struct RecurrentBwdCase {
  const char* name;
  GateKind gate;
  ScalarType type;
  int dk, dv;
  int64_t batch, seqlen;
  bool packed;  // packed documents with their own initial states and end-state gradients
  TokenRange part;
  bool recurrent;
};

struct RecurrentBwdResult : Grads {
  std::vector<float> dI;  // the documents' initial-state gradients (packed)
};

struct RecurrentBwdRun {
  explicit RecurrentBwdRun(const RecurrentBwdCase& c)
      : c(c), pr(spec_of(c), 59), dev(prepared(pr, c), c.type, Layout{}), se(dev.p.bh() * dev.p.state_elems()),
        edge(random_edge_states(23, se)), d_initial(to_device_f32(pr.initial)),
        d_final_dstate(to_device_f32(pr.final_dstate)) {}

  // The backward with LASP2_DELTA_RECURRENT_BWD set to `rows` ("" unsets it).
  RecurrentBwdResult run(const char* rows) const {
    const EnvGuard route("LASP2_DELTA_CHUNKED", c.recurrent ? "0" : "");
    const EnvGuard knob("LASP2_DELTA_RECURRENT_BWD", rows);
    RecurrentBwdResult r;
    BackwardBuffers g(pr, c.type, Layout{}, se);
    const int64_t nI = pr.spec.num_docs() * pr.spec.heads * dev.p.state_elems();
    DevBuf<float> gdI = zeroed(nI);
    DocStates doc;
    if (c.packed) {
      doc.initial = d_initial.p;
      doc.final_dstate = d_final_dstate.p;
      doc.d_initial = gdI.p;
    }
    delta::delta_backend_for(Device::kCUDA)
        .backward(dev.p, c.part, dev.dout.cview(), edge.d_entering.p, edge.d_leaving.p, doc, g.dq.mview(),
                  g.dk.mview(), g.dv.mview(), g.dg.p, g.db.p, g.dE.p, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "recurrent backward");
    g.download(r);
    r.dI = gdI.download();
    r.dI.resize(nI);
    return r;
  }

  RecurrentBwdCase c;
  DeltaProblem<float> pr;
  DeltaDeviceProblem dev;
  int64_t se;
  EdgeStates edge;
  DevBuf<float> d_initial, d_final_dstate;

 private:
  static DeltaSpec spec_of(const RecurrentBwdCase& c) {
    DeltaSpec s;
    s.gate_kind = c.gate;
    s.batch = c.batch;
    s.seqlen = c.seqlen;
    s.heads = 2;
    s.dim_k = c.dk;
    s.dim_v = c.dv;
    s.chunk_size = 64;
    s.scale = 1.0 / std::sqrt(static_cast<double>(c.dk));
    // documents shorter than a stretch and than a chunk, one-token ones, one on a chunk's
    // first token of the part {37, ...} (101), and one on the part's first token (37)
    if (c.packed) s.doc_starts = {5, 37, 40, 50, 52, 64, 101, 130, 200, 201, 202, 263, 270};
    s.reset_tokens = {45, 166, 250};  // -inf log gates (the state forgotten)
    return s;
  }
  static const DeltaProblem<float>& prepared(DeltaProblem<float>& pr, const RecurrentBwdCase& c) {
    prepare_inputs(pr, c.type);
    return pr;
  }
};

// Whether the backward's per-token sums of every (token, b, h) come from one block of
// columns (CW = 32 columns a block at d_k <= 64, 16 above), so that their fp32 atomics add
// in one order and the default's bits are reproducible.
bool one_column_block(const RecurrentBwdCase& c) { return c.dv <= (c.dk <= 64 ? 32 : 16); }

// The parts walk many chunks (31 in the first case) and end mid-chunk: the last stretch
// of 3 or 4 tokens takes the half whose sums cover no token. GDN and KDA, fp32 and 16-bit
// inputs, d_k > 64 (16 lanes a column) and <= 64 (8), odd sizes, rows with -inf gates and
// packed documents with their own states; the last case is GDN's default route with
// document states at d = 128 (bf16), whose chunks with a document start take the recurrent
// backward one block a chunk (at d_v = 128, 8 column blocks add each token's sums by fp32
// atomics in a varying order: there dq, dk, dg and dbeta are held to the atomics'
// rounding, dv, the entering and the initial-state gradients to the bit).
const std::vector<RecurrentBwdCase> kCases = {
    {"gdn_bf16_dk128_dv16_rows_31chunks", GateKind::kScalar, ScalarType::kBFloat16, 128, 16, 2, 2048, false,
     {37, 2000}, true},
    {"gdn_fp16_dk64_dv32_packed", GateKind::kScalar, ScalarType::kFloat16, 64, 32, 1, 300, true, {37, 280}, true},
    {"kda_bf16_dk64_dv32_packed", GateKind::kPerKey, ScalarType::kBFloat16, 64, 32, 1, 300, true, {0, 300}, true},
    {"kda_fp32_dk40_dv24_rows", GateKind::kPerKey, ScalarType::kFloat32, 40, 24, 2, 300, false, {37, 280}, true},
    {"gdn_fp32_dk48_dv20_rows", GateKind::kScalar, ScalarType::kFloat32, 48, 20, 2, 300, false, {0, 300}, true},
    {"gdn_bf16_dk100_dv12_packed", GateKind::kScalar, ScalarType::kBFloat16, 100, 12, 1, 300, true, {37, 280}, true},
    {"gdn_bf16_d128_packed_chunked", GateKind::kScalar, ScalarType::kBFloat16, 128, 128, 1, 330, true, {37, 310},
     false},
};

TEST(DeltaCudaRecurrentBackward, TokenRowsSameBitsAsHalfRows) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const RecurrentBwdCase& c : kCases) {
    SCOPED_TRACE(c.name);
    const RecurrentBwdRun r(c);
    const RecurrentBwdResult want = r.run(""), named = r.run("halves"), got = r.run("tokens");
    // the gradients are there: nonzero dq, dk, dg, dbeta and entering-state gradient,
    // which is exactly zero where a document starts on the part's first token (the
    // entering state is replaced there: nothing of it reaches an output)
    EXPECT_GT(delta::testing::max_abs(want.dg), 0.0) << "dg";
    EXPECT_GT(delta::testing::max_abs(want.db), 0.0) << "dbeta";
    const std::vector<int64_t>& starts = r.pr.spec.doc_starts;
    if (std::find(starts.begin(), starts.end(), c.part.begin) != starts.end())
      EXPECT_EQ(delta::testing::max_abs(want.dE), 0.0) << "d_entering past a document start";
    else
      EXPECT_GT(delta::testing::max_abs(want.dE), 0.0) << "d_entering";
    if (c.packed) EXPECT_GT(delta::testing::max_abs(want.dI), 0.0) << "d_initial";
    for (const RecurrentBwdResult* x : {&named, &got}) {
      const char* which = x == &named ? "halves" : "tokens";
      EXPECT_EQ(bits_differ(x->dv, want.dv), 0) << which << ": dv";
      EXPECT_EQ(bits_differ(x->dE, want.dE), 0) << which << ": d_entering";
      EXPECT_EQ(bits_differ(x->dI, want.dI), 0) << which << ": d_initial";
      if (one_column_block(c)) {
        EXPECT_EQ(bits_differ(x->dq, want.dq), 0) << which << ": dq";
        EXPECT_EQ(bits_differ(x->dk, want.dk), 0) << which << ": dk";
        EXPECT_EQ(bits_differ(x->dg, want.dg), 0) << which << ": dg";
        EXPECT_EQ(bits_differ(x->db, want.db), 0) << which << ": dbeta";
      } else {
        // one 16-bit rounding step (2^-8 of the value at most) and fp32 sums in another order
        const double qmax = delta::testing::max_abs(want.dq), kmax = delta::testing::max_abs(want.dk);
        EXPECT_LE(max_abs_diff(x->dq, want.dq), qmax / 128) << which << ": dq";
        EXPECT_LE(max_abs_diff(x->dk, want.dk), kmax / 128) << which << ": dk";
        EXPECT_LT(rel_err_f32(x->dg, want.dg), 1e-5) << which << ": dg";
        EXPECT_LT(rel_err_f32(x->db, want.db), 1e-5) << which << ": dbeta";
      }
    }
  }
}

// A misspelt value is an error naming the variable, not the default.
TEST(DeltaCudaRecurrentBackward, UnknownRowsValueIsAnError) {
  LASP2_SKIP_WITHOUT_CUDA();
  const RecurrentBwdRun r(kCases[4]);
  expect_error_naming([&] { r.run("token"); }, "LASP2_DELTA_RECURRENT_BWD=\"token\"");
}

}  // namespace
}  // namespace lasp2::testing::delta_cuda
