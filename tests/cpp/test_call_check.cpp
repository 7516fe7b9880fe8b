// "NaN at the call" (lasp2/call_check.h): the device values a call's cross-rank check
// arms ride in LASP-2's forward AllGather (LASP-1: one AllGather of their own beside the
// ring), and every rank compares every rank's words after it. Ranks whose digests
// differ, or a rank with a positive maximum (a positive gate), get NaN in every output
// and final state on EVERY rank, at this call; agreeing ranks get bit-for-bit what an
// unarmed call returns, LASP-2 with still exactly one collective, LASP-1 with one more
// (and the same ring). The armed check is taken by the forward (one call only).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <mutex>

#include "armed_words.h"
#include "consistency_values.h"
#include "lasp2/call_check.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "local_slice.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

// world ranks' words laid out as a gather would hold them: rank r's at r * stride floats
std::vector<float> gathered(const std::vector<std::vector<int64_t>>& ranks, int64_t stride) {
  std::vector<float> out(ranks.size() * stride, 0.f);
  for (size_t r = 0; r < ranks.size(); ++r) std::memcpy(out.data() + r * stride, ranks[r].data(), ranks[r].size() * 8);
  return out;
}

TEST(CallCheckWords, FailExactlyWhenTheCheckWouldRaise) {
  using consistency::words_fail;
  const int64_t digest = 0x7FF0123456789ABCll;  // NaN-like bits: moved, never computed on
  const int64_t neg = bits_of(-0.25), neg2 = bits_of(-3.0), pos = bits_of(1e-300), nan = bits_of(std::nan(""));
  auto fails = [&](std::vector<std::vector<int64_t>> ranks, uint32_t mask, int stride = 11) {
    const auto g = gathered(ranks, stride);
    return words_fail(g.data(), stride, static_cast<int>(ranks.size()), static_cast<int>(ranks[0].size()), mask);
  };
  EXPECT_FALSE(fails({{digest, neg, 0}, {digest, neg, 0}, {digest, neg, 0}}, 0b010));
  EXPECT_TRUE(fails({{digest, neg, 0}, {digest, neg, 0}, {digest ^ 1, neg, 0}}, 0b010));  // one bit of a digest
  EXPECT_TRUE(fails({{digest, neg, 0}, {digest, neg, 1}}, 0b010));                        // an unused slot differs
  EXPECT_TRUE(fails({{digest ^ (1ll << 40), neg}, {digest, neg}}, 0b10));                 // the high half
  EXPECT_FALSE(fails({{digest, neg}, {digest, neg2}}, 0b10));  // maxima differ per rank: only the sign counts
  EXPECT_TRUE(fails({{digest, neg}, {digest, pos}}, 0b10));    // a positive maximum on rank 1
  EXPECT_TRUE(fails({{digest, pos}, {digest, neg}}, 0b10));    // ... or on rank 0
  EXPECT_FALSE(fails({{digest, nan}, {digest, neg}}, 0b10));   // NaN is not positive (as the check's compare)
  EXPECT_TRUE(fails({{digest, neg}, {digest, neg2}}, 0b00));   // the same words as digests: they differ
  EXPECT_TRUE(fails({{digest}, {digest ^ 1}}, 0b0));
  EXPECT_TRUE(fails({{digest ^ 1, neg}, {digest, neg}}, 0b10, 4));  // adjacent blocks
}

TEST(CallCheckWords, TakeDisarms) {
  const int64_t words[2] = {1, 2};
  CallCheck c;
  c.words = words;
  c.count = 2;
  arm_call_check(c);
  EXPECT_TRUE(take_call_check().armed());
  EXPECT_FALSE(take_call_check().armed());
  arm_call_check(c);
  disarm_call_check();
  EXPECT_FALSE(take_call_check().armed());
  c.count = kCallCheckWords + 1;
  EXPECT_THROW(arm_call_check(c), Error);
}

bool all_nan(const std::vector<double>& x) {
  for (double e : x)
    if (!std::isnan(e)) return false;
  return !x.empty();
}
bool all_nan(const std::vector<float>& x) {
  for (float e : x)
    if (!std::isnan(e)) return false;
  return !x.empty();
}
bool none_nan(const std::vector<double>& x) {
  for (double e : x)
    if (std::isnan(e)) return false;
  return true;
}

struct Outcome {
  std::vector<double> o;
  std::vector<float> final_state;
  int collectives = 0, p2p = 0;
  bool left_armed = true;
};

// One forward of the schedule with final states on the rank's communicator.
void forward(bool lasp1, const ScalarDecay& fwd, ThreadCommunicator& comm, const PartLayout& layout,
             const SequenceStates& seq, bool overlap) {
  const SummaryShape sh = fwd.shape();
  if (lasp1) {
    std::vector<float> entering(Lasp1Saved::entering_state_floats(sh, layout.parts_per_rank));
    std::vector<float> records(Lasp1Saved::local_record_floats(sh, layout.parts_per_rank));
    Workspace ws(lasp1_forward_workspace_bytes(fwd, layout, seq));
    lasp1_forward(fwd, &comm, layout, Lasp1Saved{entering.data(), records.data(), nullptr}, seq, ws.data(), nullptr);
    return;
  }
  std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
  std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
  std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
  std::vector<float> head_maps(std::max<int64_t>(Lasp2Saved::head_maps_floats(sh, layout, false), 1));
  const Lasp2Saved saved{records.data(), prefixes.data(), maps.data(), head_maps.data()};
  Workspace ws(lasp2_forward_workspace_bytes(fwd, layout, seq));
  Lasp2Options options;
  options.overlap_forward = overlap;
  lasp2_forward(fwd, &comm, layout, saved, seq, ws.data(), options, nullptr);
}

// One forward per rank with final states (LASP-2, or LASP-1's ring); words(rank) is what
// the rank arms ({}: nothing).
template <typename Words>
std::vector<Outcome> run_forward(bool lasp1, int world, bool balanced, bool docs, bool overlap, uint32_t max_mask,
                                 Words words) {
  ProblemSpec s;
  s.mode = DecayMode::kGate;
  s.chunk_size = 4;
  s.seqlen = 2 * world * 5;
  if (docs) {
    s.batch = 1;
    s.doc_starts = {3, 7, s.seqlen - 2};
  }
  const Problem<double> global(s);
  std::vector<Outcome> out(world);
  run_ranks(world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = balanced ? PartLayout::balanced(world, rank) : PartLayout::contiguous(world, rank);
    const Problem<double> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    Outcome& r = out[rank];
    r.o = local.zeros_like_v();
    const ScalarDecay fwd(cpu_backend(), p, MutView{r.o.data(), local.strides(p.dim_v)});
    r.final_state.assign(fwd.shape().state_floats, -1.f);
    SequenceStates seq;
    seq.final_state = r.final_state.data();
    const std::vector<int64_t> mine = words(rank);
    if (!mine.empty()) arm_words(mine.data(), mine.size(), max_mask, Device::kCPU);
    forward(lasp1, fwd, comm, layout, seq, overlap);
    r.collectives = comm.collectives();
    r.p2p = comm.p2p_calls();
    r.left_armed = take_call_check().armed();
  });
  return out;
}

struct PoisonCase {
  int world;
  bool balanced, docs, overlap, lasp1;
};

class CallCheckPoison : public ::testing::TestWithParam<PoisonCase> {};

TEST_P(CallCheckPoison, EveryRankGetsNaNAtTheCallOrTheExactResult) {
  const PoisonCase c = GetParam();
  const int64_t digest = 0x5DEECE66Dll, neg = bits_of(-0.5);
  const auto none = [](int) { return std::vector<int64_t>{}; };
  const auto plain = run_forward(c.lasp1, c.world, c.balanced, c.docs, c.overlap, 0b10, none);
  // agreeing words (maxima that differ but are not positive): the unarmed call's bits
  const auto agree = run_forward(c.lasp1, c.world, c.balanced, c.docs, c.overlap, 0b10, [&](int rank) {
    return std::vector<int64_t>{digest, bits_of(-0.5 - rank), 0, 0};
  });
  // the last rank's digest differs
  const auto differ = run_forward(c.lasp1, c.world, c.balanced, c.docs, c.overlap, 0b10, [&](int rank) {
    return std::vector<int64_t>{rank == c.world - 1 ? digest + 1 : digest, neg, 0, 0};
  });
  // rank 0 holds a positive gate
  const auto positive = run_forward(c.lasp1, c.world, c.balanced, c.docs, c.overlap, 0b10, [&](int rank) {
    return std::vector<int64_t>{digest, rank == 0 ? bits_of(0.125) : neg, 0, 0};
  });
  for (int r = 0; r < c.world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    EXPECT_TRUE(none_nan(plain[r].o));
    EXPECT_EQ(std::memcmp(agree[r].o.data(), plain[r].o.data(), plain[r].o.size() * 8), 0);
    EXPECT_EQ(agree[r].final_state, plain[r].final_state);
    for (const auto* bad : {&differ, &positive}) {
      EXPECT_TRUE(all_nan((*bad)[r].o));  // every token, also those after a document start
      EXPECT_TRUE(all_nan((*bad)[r].final_state));
    }
    EXPECT_EQ(plain[r].collectives, 1);  // LASP-2's AllGather; LASP-1's of the final states
    for (const auto* run : {&agree, &differ, &positive}) {
      // LASP-2: the words ride in its one AllGather; LASP-1: one more, the ring unchanged
      EXPECT_EQ((*run)[r].collectives, c.lasp1 ? 2 : 1);
      EXPECT_EQ((*run)[r].p2p, plain[r].p2p);
    }
    for (const auto* run : {&plain, &agree, &differ, &positive}) EXPECT_FALSE((*run)[r].left_armed);  // taken
  }
}

std::vector<PoisonCase> poison_cases() {
  std::vector<PoisonCase> cases;
  for (bool lasp1 : {false, true})
    for (int world : {2, 3})
      for (bool balanced : {false, true})
        for (bool docs : {false, true}) cases.push_back({world, balanced, docs, world == 2 && !lasp1, lasp1});
  return cases;
}

std::string poison_name(const ::testing::TestParamInfo<PoisonCase>& info) {
  const auto& c = info.param;
  return std::string(c.lasp1 ? "Lasp1_P" : "P") + std::to_string(c.world) + (c.balanced ? "_balanced" : "_contiguous") +
         (c.docs ? "_docs" : "") + (c.lasp1 ? "" : c.overlap ? "_overlap" : "_fused");
}

INSTANTIATE_TEST_SUITE_P(Layouts, CallCheckPoison, ::testing::ValuesIn(poison_cases()), poison_name);

TEST(CallCheckTargets, StridedHalfPrecisionGetNaNTheGapsNot) {
  // a [B=2, T=3, H=2, D=3] bf16 view inside a wider buffer (head stride 4): NaN in the
  // view's elements, the gaps untouched
  std::vector<uint16_t> buf(2 * 3 * 2 * 4 + 1, 0x1234);
  PoisonTarget t{buf.data(), ScalarType::kBFloat16, 2, 3, 2, 3, {24, 8, 4}};
  std::vector<double> f64(5, 1.0);
  PoisonTarget u{f64.data(), ScalarType::kFloat64, 1, 1, 1, 5, {5, 5, 5}};
  const int64_t pos = bits_of(2.0);
  const std::vector<float> g = gathered({{0, 0}, {0, pos}}, 4);
  CallCheck check;
  check.words = reinterpret_cast<const int64_t*>(g.data());  // any non-null: armed
  check.count = 2;
  check.max_mask = 0b10;
  const PoisonTarget targets[] = {t, u};
  poison_on_failed_check(Device::kCPU, g.data(), 4, 2, check, targets, 2, nullptr);
  for (size_t i = 0; i < buf.size(); ++i) EXPECT_EQ(buf[i], i % 4 == 3 || i == 48 ? 0x1234 : 0x7FC0) << i;
  for (double x : f64) EXPECT_TRUE(std::isnan(x));
  check.max_mask = 0;  // agreeing digests: nothing written
  std::vector<double> again(3, 1.0);
  const PoisonTarget one[] = {PoisonTarget{again.data(), ScalarType::kFloat64, 1, 1, 1, 3, {3, 3, 3}}};
  const std::vector<float> same = gathered({{7, 9}, {7, 9}}, 4);
  poison_on_failed_check(Device::kCPU, same.data(), 4, 2, check, one, 1, nullptr);
  EXPECT_TRUE(none_nan(again));
}

}  // namespace
}  // namespace lasp2::testing
