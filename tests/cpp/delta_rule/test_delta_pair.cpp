// A balanced rank's two delta-rule parts as one batch of two rows (delta_rule/delta_pair.h):
// what the two-row problem reads, and that LASP-2 then makes one backend call per pass
// with it (B = 1; GDN and KDA; with document starts, with or without their ids) and
// still equals the recurrence, with the forward's kept slot and the entering-state
// gradient's kept work reaching the pair's backward; with B = 2 or per-document states
// it keeps one call per part.
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>

#include "../thread_communicator.h"
#include "delta_problem.h"
#include "delta_token_outputs.h"
#include "delta_rule/delta_family.h"
#include "delta_rule/delta_pair.h"
#include "lasp2/lasp2.h"

namespace lasp2::delta::testing {
namespace {

using lasp2::testing::run_ranks;
using lasp2::testing::ThreadCommunicator;

// Row 1 of the pair is local token h + t of the one row, in every field read by row.
TEST(DeltaPair, RowOneReadsTheSecondHalf) {
  if (!DeltaPair::enabled()) GTEST_SKIP() << "LASP2_PAIR_PARTS=0";
  for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey}) {
    DeltaSpec s;
    s.batch = 1;
    s.seqlen = 10;
    s.gate_kind = gate;
    s.doc_starts = {3, 6, 9};
    const DeltaProblem<double> pr(s);
    DeltaParams p = pr.params();
    p.doc_batch_stride = 10;  // unused with one row: the pair sets its own
    const auto pair = DeltaPair::of(p, {{0, 5}, {5, 10}});
    ASSERT_TRUE(pair.has_value());
    const DeltaParams& q = pair->params;
    EXPECT_EQ(q.batch, 2);
    EXPECT_EQ(q.seqlen, 5);
    EXPECT_TRUE(pair->range == (TokenRange{0, 5}));
    for (int64_t t = 0; t < 5; ++t)
      for (int64_t h = 0; h < s.heads; ++h) {
        EXPECT_EQ(q.q.stride.offset(1, t, h), p.q.stride.offset(0, 5 + t, h));
        EXPECT_EQ(q.k.stride.offset(1, t, h), p.k.stride.offset(0, 5 + t, h));
        EXPECT_EQ(q.v.stride.offset(1, t, h), p.v.stride.offset(0, 5 + t, h));
        EXPECT_EQ(q.beta_at(1, t, h), p.beta_at(0, 5 + t, h));
        for (int64_t i = 0; i < s.dim_k; ++i) EXPECT_EQ(q.gate(1, t, h, i), p.gate(0, 5 + t, h, i));
        EXPECT_EQ(q.beta_at(0, t, h), p.beta_at(0, t, h));
      }
    for (int64_t t = 0; t < 5; ++t) {
      EXPECT_EQ(q.starts_doc(1, t), p.starts_doc(0, 5 + t)) << t;
      EXPECT_EQ(q.doc_of(1, t), p.doc_of(0, 5 + t)) << t;
      EXPECT_EQ(q.starts_doc(0, t), p.starts_doc(0, t)) << t;
    }
    const MutView o = pair->view(MutView{nullptr, pr.strides(s.dim_v)});
    EXPECT_EQ(o.stride.offset(1, 2, 1), pr.strides(s.dim_v).offset(0, 7, 1));
  }
}

TEST(DeltaPair, NoneWhereTheHalvesAreNotTheWholeOfOneRow) {
  DeltaSpec s;
  s.seqlen = 10;
  const DeltaProblem<double> two_rows(s);
  EXPECT_FALSE(DeltaPair::of(two_rows.params(), {{0, 5}, {5, 10}}).has_value());  // B = 2
  s.batch = 1;
  const DeltaProblem<double> one_row(s);
  EXPECT_FALSE(DeltaPair::of(one_row.params(), {{0, 10}}).has_value());          // one part
  EXPECT_FALSE(DeltaPair::of(one_row.params(), {{0, 4}, {4, 10}}).has_value());  // unequal
  EXPECT_FALSE(DeltaPair::of(one_row.params(), {{5, 10}, {0, 5}}).has_value());  // out of order
}

// The CPU backend, recording (batch, seqlen) of every pass, and asking for forward work
// of batch^2 * length floats (a pair's is larger than its two parts' together, so the
// buffer's size must be the pair's) and keeping a token of entering-state gradient work,
// so that the test sees where the family puts and finds them.
class RecordingBackend final : public DeltaKernelBackend {
 public:
  struct Call {
    const char* what;
    int64_t batch, seqlen;
    const float* forward_kept;  // the slot the call got ...
    int64_t kept_floats;        // ... and what it may use of it (forward_kept_floats)
    bool kept_work;             // backward: entering_dstate_keeping's work reached it
  };
  Device device() const override { return Device::kCPU; }

  void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc, float* A, float* M,
                    float* head_A, float* head_M, void* stream) const override {
    note({"part_summary", p.batch, p.seqlen, nullptr, 0, false});
    cpu().part_summary(p, part, doc, A, M, head_A, head_M, stream);
  }
  void forward(const DeltaParams&, TokenRange, const float*, const DocStates&, MutView, void*) const override {
    ADD_FAILURE() << "the family calls forward_keeping";
  }
  int64_t forward_kept_floats(const DeltaParams& p, TokenRange part) const override {
    return p.batch * p.batch * part.length();
  }
  void forward_keeping(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
                       MutView o, float* kept, void* stream) const override {
    note({"forward", p.batch, p.seqlen, kept, forward_kept_floats(p, part), false});
    cpu().forward(p, part, entering, doc, o, stream);
  }
  void entering_dstate(const DeltaParams&, TokenRange, ConstView, float*, void*) const override {
    ADD_FAILURE() << "the family calls entering_dstate_keeping";
  }
  std::unique_ptr<KeptPartWork> entering_dstate_keeping(const DeltaParams& p, TokenRange part, ConstView dout,
                                                        const BackwardPlan& plan, float* dentering,
                                                        void* stream) const override {
    note({"entering_dstate", p.batch, p.seqlen, plan.forward_kept, forward_kept_floats(p, part), false});
    cpu().entering_dstate(p, part, dout, dentering, stream);
    return std::make_unique<KeptPartWork>();
  }
  void backward(const DeltaParams&, TokenRange, ConstView, const float*, const float*, const DocStates&, MutView,
                MutView, MutView, void*, void*, float*, void*) const override {
    ADD_FAILURE() << "the family calls backward_reusing";
  }
  void backward_reusing(const KeptPartWork* kept, const DeltaParams& p, TokenRange part, ConstView dout,
                        const float* entering, const float* leaving_dstate, const DocStates& doc, MutView dq,
                        MutView dk, MutView dv, void* dg, void* dbeta, float* dentering, void* stream,
                        const float* forward_kept) const override {
    note({"backward", p.batch, p.seqlen, forward_kept, forward_kept_floats(p, part), kept != nullptr});
    cpu().backward(p, part, dout, entering, leaving_dstate, doc, dq, dk, dv, dg, dbeta, dentering, stream);
  }

  void apply_map(const float* A, const float* x, const float* y, int64_t bh, int64_t dk, int64_t dv, float* out,
                 void* stream) const override {
    cpu().apply_map(A, x, y, bh, dk, dv, out, stream);
  }
  void apply_map_transposed_add(const float* A, const float* x, int64_t bh, int64_t dk, int64_t dv, float* out,
                                void* stream) const override {
    cpu().apply_map_transposed_add(A, x, bh, dk, dv, out, stream);
  }
  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    cpu().add(dst, src, count, stream);
  }
  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    cpu().copy(dst, src, count, stream);
  }
  void fill_zero(float* dst, int64_t count, void* stream) const override { cpu().fill_zero(dst, count, stream); }

  std::vector<Call> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  static const DeltaKernelBackend& cpu() { return delta_cpu_backend(); }
  void note(const Call& c) const {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back(c);
  }
  mutable std::mutex mu_;
  mutable std::vector<Call> calls_;
};

struct PairRun {
  int64_t batch = 1;
  GateKind gate = GateKind::kScalar;
  bool doc_starts = false;
  bool doc_ids = true;      // with doc_starts: the torch op's doc_id, or starts alone
  // initial and final states: per document with doc_starts, else the row's (which the
  // schedule passes as entering and leaving states, not as DocStates)
  bool states = false;
};

// What one rank saw: its backend's calls, and its forward-kept buffer.
struct RankCalls {
  std::vector<RecordingBackend::Call> calls;
  const float* kept = nullptr;
  int64_t kept_floats = 0;

  // Every slot a call got lies inside the buffer.
  void expect_slots_inside() const {
    for (const auto& c : calls)
      if (c.forward_kept != nullptr) {
        EXPECT_GE(c.forward_kept, kept) << c.what;
        EXPECT_LE(c.forward_kept + c.kept_floats, kept + kept_floats) << c.what;
      }
  }
};

// LASP-2 over P = 2 thread ranks, balanced split: every rank's calls, and the gathered
// outputs and gradients against the float64 recurrence.
std::vector<RankCalls> run_balanced(const PairRun& r) {
  DeltaSpec s;
  s.batch = r.batch;
  s.gate_kind = r.gate;
  s.chunk_size = 4;
  s.seqlen = 24;  // parts of 6 tokens: they end mid-chunk
  if (r.doc_starts) s.doc_starts = {5, 6, 13, 20};  // one at a part edge, one in each half of rank 1
  DeltaProblem<double> global(s);
  if (!r.states) {  // nothing enters or leaves the sequences
    std::fill(global.initial.begin(), global.initial.end(), 0.f);
    std::fill(global.final_dstate.begin(), global.final_dstate.end(), 0.f);
  }
  const DeltaReference ref = delta_reference(global);
  TokenOutputs got(ref);
  std::vector<RankCalls> out(2);
  std::mutex mu;
  run_ranks(2, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = PartLayout::balanced(2, rank);
    DeltaProblem<double> local = local_problem(global, layout);
    for (auto& e : local.final_dstate) e *= 0.5f;  // the ranks' final-state gradients add up
    DeltaParams p = local.params();
    if (!r.doc_ids) p.doc_id = nullptr;
    const int64_t gk = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;
    const int64_t N = s.num_docs(), D = N * s.heads * s.dim_k * s.dim_v;
    RecordingBackend backend;
    std::vector<float> kept(DeltaFamily::forward_kept_floats(backend, p, layout));
    std::vector<double> lo(local.v.size()), ldq(local.q.size()), ldk(local.k.size()), ldv(local.v.size());
    std::vector<double> ldg(local.g.size()), ldb(local.beta.size());
    std::vector<float> fold(p.bh() * p.state_elems()), finals(D), d_initial(D);
    DeltaFamily fwd(backend, p, MutView{lo.data(), local.strides(s.dim_v)}, fold.data());
    fwd.with_forward_kept(kept.data(), layout);
    const SummaryShape sh = fwd.shape();
    std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
    std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
    const bool doc_states = r.states && r.doc_starts;
    std::vector<float> head_maps(Lasp2Saved::head_maps_floats(sh, layout, doc_states) + 1);
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data(), head_maps.data()};
    SequenceStates seq;
    if (r.states) {
      seq.initial = local.initial.data();
      seq.final_state = finals.data();
    }
    if (doc_states) {
      for (int64_t g = 0; g < 4; ++g) {  // the document ending in each global part's head (-1: none)
        int64_t d = -1;
        for (int64_t t = 6 * g; t < 6 * g + 6 && d < 0; ++t)
          if (global.doc_start[t]) d = global.doc_id[t] - 1;
        seq.head_doc.push_back(d);
      }
      seq.count = N;
    }
    std::vector<double> fws((lasp2_forward_workspace_bytes(fwd, layout, seq) + 7) / 8);
    lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), Lasp2Options{}, nullptr);

    const DeltaGrads grads{local.dout_view(), {ldq.data(), local.strides(s.dim_k)},
                           {ldk.data(), local.strides(s.dim_k)}, {ldv.data(), local.strides(s.dim_v)},
                           ldg.data(), ldb.data(), r.states};  // as the torch op sets it
    DeltaFamily bwd(backend, p, grads, fold.data());
    bwd.with_forward_kept(kept.data(), layout);
    if (r.states) {
      seq.final_state = nullptr;
      seq.final_grad = local.final_dstate.data();
      seq.initial_grad = d_initial.data();
    }
    std::vector<double> bws((lasp2_backward_workspace_bytes(bwd, layout, seq) + 7) / 8);
    lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);

    std::lock_guard<std::mutex> lock(mu);
    out[rank] = {backend.calls(), kept.data(), static_cast<int64_t>(kept.size())};
    got.put(layout, s, gk, lo, ldq, ldk, ldv, ldg, ldb);
  });
  got.expect_match(ref);
  return out;
}

std::string run_name(const PairRun& r) {
  return std::string(r.gate == GateKind::kScalar ? "gdn" : "kda") +
         (r.doc_starts ? (r.doc_ids ? " with documents" : " with document starts alone") : "") +
         (r.states ? " and states" : "");
}

TEST(DeltaPair, BalancedRankOfOneRowRunsEachPassOnce) {
  if (!DeltaPair::enabled()) GTEST_SKIP() << "LASP2_PAIR_PARTS=0";
  for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
    for (const PairRun& r : {PairRun{1, gate}, PairRun{1, gate, true, true}, PairRun{1, gate, true, false},
                             PairRun{1, gate, false, true, true}}) {  // the last: the row's states
      SCOPED_TRACE(run_name(r));
      const std::vector<RankCalls> ranks = run_balanced(r);
      for (int rank = 0; rank < 2; ++rank) {
        const RankCalls& rc = ranks[rank];
        // the buffer holds the pair's 2 * 2 * 6 floats, more than its parts' 6 + 6
        EXPECT_EQ(rc.kept_floats, 24);
        // summary, output; entering-state gradient, backward: one call each, on the two-row problem
        ASSERT_EQ(rc.calls.size(), 4u) << "rank " << rank;
        for (const auto& c : rc.calls) {
          EXPECT_EQ(c.batch, 2) << c.what << ", rank " << rank;
          EXPECT_EQ(c.seqlen, 6) << c.what << ", rank " << rank;
        }
        for (size_t i = 1; i < 4; ++i) EXPECT_EQ(rc.calls[i].forward_kept, rc.kept) << rc.calls[i].what;
        rc.expect_slots_inside();
        EXPECT_TRUE(rc.calls[3].kept_work);
      }
    }
}

TEST(DeltaPair, BalancedRankOfTwoRowsRunsEachPartAlone) {
  for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey}) {
    const PairRun r{2, gate};
    SCOPED_TRACE(run_name(r));
    const std::vector<RankCalls> ranks = run_balanced(r);
    for (int rank = 0; rank < 2; ++rank) {
      const RankCalls& rc = ranks[rank];
      EXPECT_EQ(rc.kept_floats, 2 * 2 * 2 * 6);  // two parts of 2 * 2 * 6
      ASSERT_EQ(rc.calls.size(), 8u) << "rank " << rank;
      for (const auto& c : rc.calls) EXPECT_EQ(c.seqlen, 12) << c.what << ", rank " << rank;
      // part 1's slot follows part 0's; its backward finds its own kept work
      EXPECT_EQ(rc.calls[3].forward_kept, rc.kept + 24);
      rc.expect_slots_inside();
      EXPECT_TRUE(rc.calls[7].kept_work);
    }
  }
}

// Per-document states keep the single-part calls (DeltaFamily::pair_of), in both
// directions alike.
TEST(DeltaPair, DocumentStatesRunEachPartAlone) {
  for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey}) {
    const PairRun r{1, gate, true, true, true};
    SCOPED_TRACE(run_name(r));
    const std::vector<RankCalls> ranks = run_balanced(r);
    for (int rank = 0; rank < 2; ++rank) {
      ASSERT_EQ(ranks[rank].calls.size(), 8u) << "rank " << rank;
      for (const auto& c : ranks[rank].calls) EXPECT_EQ(c.batch, 1) << c.what << ", rank " << rank;
    }
  }
}

}  // namespace
}  // namespace lasp2::delta::testing
