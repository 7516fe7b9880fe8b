// GDN's chunk backward (delta_chunk_bwd.h): its forms (ordered, early, lean) and copy
// modes (tensor maps, cp.async) against each other, and the same inputs giving the same
// bits run after run (GDN and KDA).
#include <gtest/gtest.h>

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
  DeltaDeviceProblem dev;
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
      const auto [dq, dk, dv, dg, db, dI, dE] =
          cpu_backward(pr, c.part, edge.entering.data(), edge.leaving.data(), false);
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
  DeltaDeviceProblem dev;
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
}  // namespace lasp2::testing::delta_cuda
