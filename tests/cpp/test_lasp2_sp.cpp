// LASP-2 end to end on P threads: every rank's outputs and gradients equal the
// single-device result on its tokens, for contiguous and balanced layouts, all
// decay modes, packed documents, and both forward schedules; exactly one
// collective per direction. With sequence states: the initial state enters global
// part 0 wherever it lives, every rank returns the same final state, the ranks'
// final-state gradients add up (the loss is the sum of the ranks' losses) and reach
// every earlier token, and the ranks' initial-state gradients are shares summing to
// one process's.
#include <gtest/gtest.h>

#include <mutex>

#include <random>

#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "local_slice.h"
#include "recurrent_reference.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

struct SpCase {
  int world;
  bool balanced;
  DecayMode mode;
  bool with_docs;
  bool overlap;
  int64_t batch = 2;  // 1 with the balanced split: its two parts run as one pair (part_pair.h)
};

std::string sp_name(const ::testing::TestParamInfo<SpCase>& info) {
  const auto& c = info.param;
  const char* mode = decay_mode_name(c.mode);
  return "P" + std::to_string(c.world) + (c.balanced ? "_balanced_" : "_contiguous_") + mode +
         (c.with_docs ? "_docs" : "") + (c.overlap ? "_overlap" : "_fused") + (c.batch == 1 ? "_B1" : "");
}

class Lasp2Sp : public ::testing::TestWithParam<SpCase> {};

// One rank's outputs and gradients, and every rank's gathered in global token order.
struct RankResults {
  std::vector<double> o, dq, dk, dv, dg;
  explicit RankResults(const Problem<double>& pr)
      : o(pr.zeros_like_v()), dq(pr.zeros_like_k()), dk(pr.zeros_like_k()), dv(pr.zeros_like_v()),
        dg(pr.gate.size()) {}
};

struct GlobalResults : RankResults {
  std::mutex mu;
  using RankResults::RankResults;

  void put(const RankResults& r, const PartLayout& l, const ProblemSpec& s) {
    std::lock_guard<std::mutex> lock(mu);
    put_tokens(o, r.o, l, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(dq, r.dq, l, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(dk, r.dk, l, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(dv, r.dv, l, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(dg, r.dg, l, s.batch, s.seqlen, s.heads, 1);
  }
  // States travel in fp32, so fp64 inputs agree to fp32 rounding.
  void expect_matches(const ReferenceGrads& ref, DecayMode mode) const {
    EXPECT_LT(rel_error(o, ref.o), 1e-5);
    EXPECT_LT(rel_error(dq, ref.dq), 1e-5);
    EXPECT_LT(rel_error(dk, ref.dk), 1e-5);
    EXPECT_LT(rel_error(dv, ref.dv), 1e-5);
    if (mode != DecayMode::kNone) EXPECT_LT(rel_error(dg, ref.dg), 1e-4);
  }
};

// The final-state gradient shared out over the ranks and the ranks' initial-state
// gradients summed back. Rank r's loss weights the final state by (r + 1) / sum, so the
// ranks' losses add up to one process's: their initial-state gradients must sum to its.
class StateGradShares {
 public:
  StateGradShares(const std::vector<float>& dfinal, int world)
      : dfinal_(dfinal), weight_sum_(world * (world + 1) / 2.0), initial_sum_(dfinal.size(), 0.0) {}
  std::vector<float> final_grad_of(int rank) const {
    std::vector<float> share(dfinal_);
    for (auto& x : share) x = static_cast<float>(x * (rank + 1) / weight_sum_);
    return share;
  }
  void add_initial_grad(const std::vector<float>& initial_grad) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t e = 0; e < initial_grad.size(); ++e) initial_sum_[e] += initial_grad[e];
  }
  const std::vector<double>& initial_grad_sum() const { return initial_sum_; }

 private:
  std::vector<float> dfinal_;
  double weight_sum_;
  std::vector<double> initial_sum_;
  std::mutex mu_;
};

TEST_P(Lasp2Sp, RanksMatchSingleDevice) {
  const SpCase c = GetParam();
  ProblemSpec s;
  s.batch = c.batch;
  s.mode = c.mode;
  s.chunk_size = 4;
  s.seqlen = 2 * c.world * 6;  // parts of 6 tokens, chunk 4: parts end mid-chunk
  if (c.with_docs) s.doc_starts = {5, 6, 13, s.seqlen - 1};  // incl. one exactly at a part edge
  const Problem<double> global(s);
  const auto ref = recurrent_reference(global);

  GlobalResults got(global);
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = c.balanced ? PartLayout::balanced(c.world, rank) : PartLayout::contiguous(c.world, rank);
    const Problem<double> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    const auto sk = local.strides(p.dim_k), sv = local.strides(p.dim_v);

    std::vector<float> records(Lasp2Saved::local_records_floats(p, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(p, layout));
    std::vector<float> decays(Lasp2Saved::log_decays_floats(p, layout));
    const Lasp2Saved saved{records.data(), prefixes.data(), decays.data()};

    RankResults r(local);
    Workspace fws(lasp2_forward_workspace_bytes(p, layout));
    Lasp2Options options;
    options.overlap_forward = c.overlap;
    lasp2_forward(cpu_backend(), &comm, layout, p, {r.o.data(), sv}, saved, fws.data(), options, nullptr);
    EXPECT_EQ(comm.collectives(), 1);

    Workspace bws(lasp2_backward_workspace_bytes(p, layout, true));
    lasp2_backward(cpu_backend(), &comm, layout, p, local.dout_view(), saved, {r.dq.data(), sk}, {r.dk.data(), sk},
                   {r.dv.data(), sv}, r.dg.data(), bws.data(), nullptr);
    EXPECT_EQ(comm.collectives(), 2);
    got.put(r, layout, s);
  });
  got.expect_matches(ref, c.mode);
}

TEST_P(Lasp2Sp, SequenceStatesMatchTheRecurrence) {
  const SpCase c = GetParam();
  ProblemSpec s;
  s.batch = c.batch;
  s.mode = c.mode;
  s.chunk_size = 4;
  s.seqlen = 2 * c.world * 5;
  if (c.with_docs) s.doc_starts = {3, 7};  // h0's document ends inside the first parts
  const Problem<double> global(s);
  const int64_t state = s.batch * s.heads * s.dim_k * s.dim_v;
  std::vector<float> h0(state), dfinal(state);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal;
  for (auto& x : h0) x = normal(rng);
  for (auto& x : dfinal) x = normal(rng);
  const auto ref = recurrent_reference(global, &h0, &dfinal);

  GlobalResults got(global);
  StateGradShares shares(dfinal, c.world);
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = c.balanced ? PartLayout::balanced(c.world, rank) : PartLayout::contiguous(c.world, rank);
    const Problem<double> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    const auto sk = local.strides(p.dim_k), sv = local.strides(p.dim_v);
    RankResults r(local);
    const std::vector<float> my_dfinal = shares.final_grad_of(rank);
    const ScalarDecay fwd(cpu_backend(), p, MutView{r.o.data(), sv});
    const ScalarDecay bwd(cpu_backend(), p,
                          ScalarDecayGrads{local.dout_view(), {r.dq.data(), sk}, {r.dk.data(), sk},
                                           {r.dv.data(), sv}, r.dg.data()});
    const SummaryShape sh = fwd.shape();
    std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
    std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data()};
    std::vector<float> final_state(state, -1.f), initial_grad(state, -1.f);
    SequenceStates seq;
    seq.initial = h0.data();
    seq.final_state = final_state.data();
    seq.final_grad = my_dfinal.data();
    seq.initial_grad = initial_grad.data();

    Workspace fws(lasp2_forward_workspace_bytes(fwd, layout, seq));
    Lasp2Options options;
    options.overlap_forward = c.overlap;
    lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), options, nullptr);
    EXPECT_EQ(comm.collectives(), 1);
    Workspace bws(lasp2_backward_workspace_bytes(bwd, layout, seq));
    lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);
    EXPECT_EQ(comm.collectives(), 2);
    EXPECT_LT(rel_error(final_state, ref.final_state), 1e-5) << "rank " << rank;
    shares.add_initial_grad(initial_grad);
    got.put(r, layout, s);
  });
  EXPECT_LT(rel_error(shares.initial_grad_sum(), ref.initial_grad), 1e-5);
  got.expect_matches(ref, c.mode);
}

std::vector<SpCase> sp_cases() {
  std::vector<SpCase> cases;
  for (int world : {2, 3, 4})
    for (bool balanced : {false, true})
      for (DecayMode mode : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate})
        for (bool docs : {false, true}) {
          cases.push_back({world, balanced, mode, docs, world != 3});
          if (balanced) cases.push_back({world, balanced, mode, docs, world != 3, 1});
        }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Layouts, Lasp2Sp, ::testing::ValuesIn(sp_cases()), sp_name);

// Packed documents with their own initial and final states (the scalar family cuts
// parts at document starts): documents that span parts and ranks, begin at a part's
// first token, or lie inside one part; every rank returns every document's end state,
// the ranks' initial-state gradients sum to one process's.
struct DocCase {
  int world;
  bool balanced;
  DecayMode mode;
};

class Lasp2DocumentStates : public ::testing::TestWithParam<DocCase> {};

TEST_P(Lasp2DocumentStates, MatchTheRecurrence) {
  const DocCase c = GetParam();
  ProblemSpec s;
  s.batch = 1;
  s.mode = c.mode;
  s.chunk_size = 4;
  s.seqlen = 2 * c.world * 6;
  s.doc_starts = {3, 4, 6, 9, s.seqlen - 2};  // 6: a part edge (contiguous P = 2: 12)
  const Problem<double> global(s);
  const int64_t N = 1 + static_cast<int64_t>(s.doc_starts.size());
  const int64_t state = s.heads * s.dim_k * s.dim_v, D = N * state;
  std::vector<float> h0(D), dfinal(D);
  std::mt19937 rng(3);
  std::normal_distribution<float> normal;
  for (auto& x : h0) x = normal(rng);
  for (auto& x : dfinal) x = normal(rng);
  const auto ref = recurrent_reference(global, &h0, &dfinal, /*per_document=*/true);

  const int parts_per_rank = c.balanced ? 2 : 1, total = c.world * parts_per_rank;
  std::vector<int64_t> head_doc(total, -1);  // the document ending in each part's head
  for (int g = 0; g < total; ++g) {
    const int64_t n = s.seqlen / total;
    for (int64_t t = g * n, doc = 0; t < (g + 1) * n; ++t)
      if (global.doc_start[t]) {
        for (int64_t u = 1; u < t; ++u) doc += global.doc_start[u];
        head_doc[g] = doc;
        break;
      }
  }
  GlobalResults got(global);
  StateGradShares shares(dfinal, c.world);
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout{c.world, rank, parts_per_rank};
    const Problem<double> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    const auto sk = local.strides(p.dim_k), sv = local.strides(p.dim_v);
    RankResults r(local);
    const std::vector<float> my_dfinal = shares.final_grad_of(rank);
    std::vector<float> scratch(ScalarDecay::documents_scratch_floats(p));
    const LocalDocuments docs = LocalDocuments::of(local.doc_start.data(), p.seqlen, layout, head_doc);
    ScalarDecay fwd(cpu_backend(), p, MutView{r.o.data(), sv});
    ScalarDecay bwd(cpu_backend(), p,
                    ScalarDecayGrads{local.dout_view(), {r.dq.data(), sk}, {r.dk.data(), sk},
                                     {r.dv.data(), sv}, r.dg.data()});
    fwd.with_documents(docs, scratch.data());
    bwd.with_documents(docs, scratch.data());
    const SummaryShape sh = fwd.shape();
    std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
    std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
    std::vector<float> head_maps(Lasp2Saved::head_maps_floats(sh, layout, true));
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data(), head_maps.data()};
    std::vector<float> finals(D, -1.f), initial_grad(D, -1.f);
    SequenceStates seq;
    seq.head_doc = head_doc;
    seq.count = N;
    seq.initial = h0.data();
    seq.final_state = finals.data();
    Workspace fws(lasp2_forward_workspace_bytes(fwd, layout, seq));
    lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), Lasp2Options{}, nullptr);
    seq.final_state = nullptr;
    seq.final_grad = my_dfinal.data();
    seq.initial_grad = initial_grad.data();
    Workspace bws(lasp2_backward_workspace_bytes(bwd, layout, seq));
    lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);
    EXPECT_EQ(comm.collectives(), 2);
    EXPECT_LT(rel_error(finals, ref.final_state), 1e-5) << "rank " << rank;
    shares.add_initial_grad(initial_grad);
    got.put(r, layout, s);
  });
  EXPECT_LT(rel_error(shares.initial_grad_sum(), ref.initial_grad), 1e-5);
  got.expect_matches(ref, c.mode);
}

std::vector<DocCase> doc_cases() {
  std::vector<DocCase> cases;
  for (int world : {1, 2, 3})
    for (bool balanced : {false, true})
      for (DecayMode mode : {DecayMode::kNone, DecayMode::kGate})
        if (world > 1 || !balanced) cases.push_back({world, balanced, mode});
  return cases;
}

std::string doc_name(const ::testing::TestParamInfo<DocCase>& info) {
  const auto& c = info.param;
  return "P" + std::to_string(c.world) + (c.balanced ? "_balanced_" : "_contiguous_") +
         (c.mode == DecayMode::kNone ? "none" : "gate");
}

INSTANTIATE_TEST_SUITE_P(Layouts, Lasp2DocumentStates, ::testing::ValuesIn(doc_cases()), doc_name);

TEST(Lasp2Errors, CommunicatorMustMatchLayout) {
  ProblemSpec s;
  s.seqlen = 8;
  const Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<double> o = pr.zeros_like_v();
  EXPECT_THROW(lasp2_forward(cpu_backend(), nullptr, PartLayout::contiguous(2, 0), p, {o.data(), pr.strides(p.dim_v)},
                             {}, nullptr, {}, nullptr),
               Error);
  EXPECT_THROW(PartLayout::balanced(2, 0).validate(7), Error);
}

}  // namespace
}  // namespace lasp2::testing
