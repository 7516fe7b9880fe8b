// LASP-1 (ring of P2P state passes) end to end on P threads: every rank's outputs
// and gradients equal the single-device float64 recurrence on its tokens, for all
// decay modes and packed documents, contiguous and balanced layouts; on the
// contiguous layout exactly one send and one recv per interior rank per direction,
// no collective (the balanced ring runs up and back down: one hop per part edge).
#include <gtest/gtest.h>

#include "lasp2/lasp1.h"
#include "local_slice.h"
#include "recurrent_reference.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

struct RingCase {
  int world;
  DecayMode mode;
  bool with_docs;
  bool balanced = false;
};

std::string ring_name(const ::testing::TestParamInfo<RingCase>& info) {
  const auto& c = info.param;
  const char* mode = decay_mode_name(c.mode);
  return "P" + std::to_string(c.world) + "_" + mode + (c.with_docs ? "_docs" : "") +
         (c.balanced ? "_balanced" : "");
}

// P2P calls a rank makes in one direction: interior ranks one recv and one send,
// the ends of the ring one of them; balanced, twice that, less the local turn at
// the last rank.
int p2p_per_direction(int rank, int world, bool balanced) {
  const int once = (rank > 0) + (rank < world - 1);
  return balanced ? 2 * once : once;
}

template <typename T>
struct RingResult {
  std::vector<T> o, dq, dk, dv, dg;
};

// Runs LASP-1 forward and backward on `world` threads over the global problem and
// collects every rank's results in global token order.
template <typename T>
RingResult<T> run_ring(const Problem<T>& global, int world, bool balanced = false) {
  const ProblemSpec& s = global.spec;
  RingResult<T> out{global.zeros_like_v(), global.zeros_like_k(), global.zeros_like_k(),
                    global.zeros_like_v(), std::vector<T>(global.gate.size())};
  std::mutex mu;
  run_ranks(world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = balanced ? PartLayout::balanced(world, rank) : PartLayout::contiguous(world, rank);
    const Problem<T> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    const auto sk = local.strides(p.dim_k), sv = local.strides(p.dim_v);

    std::vector<float> entering(Lasp1Saved::entering_state_floats(p, layout.parts_per_rank), -1.f);  // poisoned
    std::vector<float> record(Lasp1Saved::local_record_floats(p, layout.parts_per_rank), -1.f);
    const Lasp1Saved saved{entering.data(), record.data()};

    std::vector<T> lo = local.zeros_like_v();
    Workspace fws(lasp1_forward_workspace_bytes(p, layout));
    lasp1_forward(cpu_backend(), &comm, layout, p, {lo.data(), sv}, saved, fws.data(), nullptr);
    EXPECT_EQ(comm.p2p_calls(), p2p_per_direction(rank, world, balanced)) << "rank " << rank << " forward";

    std::vector<T> ldq = local.zeros_like_k(), ldk = local.zeros_like_k(), ldv = local.zeros_like_v();
    std::vector<T> ldg(local.gate.size());
    Workspace bws(lasp1_backward_workspace_bytes(p, layout, true));
    lasp1_backward(cpu_backend(), &comm, layout, p, local.dout_view(), saved, {ldq.data(), sk}, {ldk.data(), sk},
                   {ldv.data(), sv}, ldg.data(), bws.data(), nullptr);
    EXPECT_EQ(comm.p2p_calls(), 2 * p2p_per_direction(rank, world, balanced)) << "rank " << rank << " backward";
    EXPECT_EQ(comm.collectives(), 0);

    std::lock_guard<std::mutex> lock(mu);
    put_tokens(out.o, lo, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(out.dq, ldq, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(out.dk, ldk, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(out.dv, ldv, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(out.dg, ldg, layout, s.batch, s.seqlen, s.heads, 1);
  });
  return out;
}

class Lasp1Sp : public ::testing::TestWithParam<RingCase> {};

TEST_P(Lasp1Sp, RanksMatchSingleDevice) {
  const RingCase c = GetParam();
  ProblemSpec s;
  s.mode = c.mode;
  s.chunk_size = 4;
  s.seqlen = c.world * (c.balanced ? 10 : 7);  // parts of 7 or 5 tokens, chunk 4: parts end mid-chunk
  // inside a rank, spanning ranks 0-1, one token long, exactly at a rank edge (P > 2),
  // the last token alone
  if (c.with_docs) {
    for (int64_t t : {3, 10, 11, 14})
      if (t < s.seqlen - 1) s.doc_starts.push_back(t);
    s.doc_starts.push_back(s.seqlen - 1);
  }
  const Problem<double> global(s);
  const auto ref = recurrent_reference(global);
  const RingResult<double> got = run_ring(global, c.world, c.balanced);
  // States travel in fp32, so fp64 inputs agree to fp32 rounding.
  EXPECT_LT(rel_error(got.o, ref.o), 1e-5);
  EXPECT_LT(rel_error(got.dq, ref.dq), 1e-5);
  EXPECT_LT(rel_error(got.dk, ref.dk), 1e-5);
  EXPECT_LT(rel_error(got.dv, ref.dv), 1e-5);
  if (c.mode != DecayMode::kNone) EXPECT_LT(rel_error(got.dg, ref.dg), 1e-4);
}

std::vector<RingCase> ring_cases() {
  std::vector<RingCase> cases;
  for (int world : {2, 3, 4})
    for (DecayMode mode : {DecayMode::kNone, DecayMode::kFixed, DecayMode::kGate})
      for (bool docs : {false, true}) cases.push_back({world, mode, docs});
  for (int world : {2, 3})
    for (bool docs : {false, true}) cases.push_back({world, DecayMode::kGate, docs, true});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Ring, Lasp1Sp, ::testing::ValuesIn(ring_cases()), ring_name);

TEST(Lasp1Ring, Float32InputsOverFourRanks) {
  ProblemSpec s;
  s.seqlen = 4 * 9;
  s.chunk_size = 4;
  const Problem<float> global(s);
  const auto ref = recurrent_reference(global);
  const RingResult<float> got = run_ring(global, 4);
  EXPECT_LT(rel_error(got.o, ref.o), 2e-5);
  EXPECT_LT(rel_error(got.dq, ref.dq), 2e-5);
  EXPECT_LT(rel_error(got.dk, ref.dk), 2e-5);
  EXPECT_LT(rel_error(got.dv, ref.dv), 2e-5);
  EXPECT_LT(rel_error(got.dg, ref.dg), 2e-4);
}

// With a document starting inside every rank, nothing crosses rank boundaries:
// the states sent on the ring must not leak into later documents.
TEST(Lasp1Ring, DocumentInEveryRankStopsTheRing) {
  ProblemSpec s;
  s.seqlen = 3 * 8;
  s.chunk_size = 4;
  s.doc_starts = {2, 9, 17};
  const Problem<double> global(s);
  const auto ref = recurrent_reference(global);
  const RingResult<double> got = run_ring(global, 3);
  EXPECT_LT(rel_error(got.o, ref.o), 1e-5);
  EXPECT_LT(rel_error(got.dk, ref.dk), 1e-5);
  EXPECT_LT(rel_error(got.dg, ref.dg), 1e-4);
}

// LASP-1 and LASP-2 agree on one device (no communicator): both are the plain kernels.
TEST(Lasp1Ring, SingleDeviceNeedsNoCommunicator) {
  ProblemSpec s;
  s.seqlen = 19;
  s.chunk_size = 4;
  const Problem<double> pr(s);
  const auto ref = recurrent_reference(pr);
  const AttentionParams p = pr.params();
  const PartLayout layout = PartLayout::contiguous(1, 0);
  const auto sk = pr.strides(p.dim_k), sv = pr.strides(p.dim_v);
  std::vector<float> entering(Lasp1Saved::entering_state_floats(p));
  std::vector<float> record(Lasp1Saved::local_record_floats(p));
  const Lasp1Saved saved{entering.data(), record.data()};
  EXPECT_EQ(lasp1_forward_workspace_bytes(p, layout), 0);
  std::vector<double> o = pr.zeros_like_v(), dq = pr.zeros_like_k(), dk = pr.zeros_like_k(), dv = pr.zeros_like_v();
  std::vector<double> dg(pr.gate.size());
  lasp1_forward(cpu_backend(), nullptr, layout, p, {o.data(), sv}, saved, nullptr, nullptr);
  Workspace bws(lasp1_backward_workspace_bytes(p, layout, true));
  lasp1_backward(cpu_backend(), nullptr, layout, p, pr.dout_view(), saved, {dq.data(), sk}, {dk.data(), sk},
                 {dv.data(), sv}, dg.data(), bws.data(), nullptr);
  EXPECT_LT(rel_error(o, ref.o), 1e-11);
  EXPECT_LT(rel_error(dq, ref.dq), 1e-11);
  EXPECT_LT(rel_error(dk, ref.dk), 1e-11);
  EXPECT_LT(rel_error(dv, ref.dv), 1e-11);
  EXPECT_LT(rel_error(dg, ref.dg), 1e-10);
}

TEST(Lasp1Errors, MatchingCommunicatorOnly) {
  ProblemSpec s;
  s.seqlen = 8;
  const Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<double> o = pr.zeros_like_v();
  const MutView ov{o.data(), pr.strides(p.dim_v)};
  EXPECT_THROW(lasp1_forward(cpu_backend(), nullptr, PartLayout::contiguous(2, 0), p, ov, {}, nullptr, nullptr),
               Error);
  run_ranks(2, [&](int rank, ThreadCommunicator& comm) {
    // a layout that disagrees with the communicator is rejected before any communication,
    // so no rank waits for a peer
    EXPECT_THROW(lasp1_forward(cpu_backend(), &comm, PartLayout::contiguous(2, 1 - rank), p, ov, {}, nullptr,
                               nullptr),
                 Error);
    EXPECT_EQ(comm.p2p_calls(), 0);
  });
}

}  // namespace
}  // namespace lasp2::testing
