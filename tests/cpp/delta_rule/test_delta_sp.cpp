// The delta-rule family (DeltaFamily over the CPU DeltaKernelBackend) under the
// generic LASP-2 schedule (csrc/core/sp) on P threads: every rank's outputs,
// gradients and final states equal the float64 recurrence over the whole sequence,
// for the contiguous and balanced layouts, GDN and KDA gates, batch rows and packed
// documents that span ranks, with initial states in and final states out (and without
// states: documents then only reset); exactly one collective per direction. B = 1 with
// the balanced split runs a rank's two parts as one pair (delta_rule/delta_pair.h)
// unless per-document states are in play. The ranks' initial-state gradients are shares: their
// sum is one process's (the loss is the sum of the ranks' losses).
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>

#include "../thread_communicator.h"
#include "delta_problem.h"
#include "delta_token_outputs.h"
#include "delta_rule/delta_family.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"

namespace lasp2::delta::testing {
namespace {

using lasp2::testing::run_ranks;
using lasp2::testing::ThreadCommunicator;

struct SpCase {
  int world;
  bool balanced;
  GateKind gate;
  bool packed;
  int64_t batch = 2;  // rows only (packed documents are one row): 1 with the balanced split pairs its parts
};

std::string sp_name(const ::testing::TestParamInfo<SpCase>& info) {
  const auto& c = info.param;
  return "P" + std::to_string(c.world) + (c.balanced ? "_balanced_" : "_contiguous_") +
         (c.gate == GateKind::kScalar ? "gdn" : "kda") + (c.packed ? "_packed" : "_rows") +
         (!c.packed && c.batch == 1 ? "_B1" : "");
}

// The six token tensors the ranks of every schedule produce (o and the gradients), put
// together in global token order and compared with the float64 recurrence: one
// definition for the tests of both schedules.

// The document ending at the end of each global part's head (-1: no start inside).
// One rank's outputs and gradients and the two families (forward, backward) that write
// them, for calls without sequence states.
struct RankCall {
  std::vector<double> o, dq, dk, dv, dg, dbeta;
  std::vector<float> fold;
  DeltaFamily fwd, bwd;

  explicit RankCall(const DeltaProblem<double>& l)
      : o(l.v.size()), dq(l.q.size()), dk(l.k.size()), dv(l.v.size()), dg(l.g.size()),
        dbeta(l.beta.size()), fold(l.params().bh() * l.params().state_elems()),
        fwd(delta_cpu_backend(), l.params(), MutView{o.data(), l.strides(l.spec.dim_v)}, fold.data()),
        bwd(delta_cpu_backend(), l.params(),
            DeltaGrads{l.dout_view(), {dq.data(), l.strides(l.spec.dim_k)}, {dk.data(), l.strides(l.spec.dim_k)},
                       {dv.data(), l.strides(l.spec.dim_v)}, dg.data(), dbeta.data()},
            fold.data()) {}
};

std::vector<int64_t> head_docs(const DeltaProblem<double>& global, int parts) {
  const int64_t n = global.spec.seqlen / parts;
  std::vector<int64_t> out(parts, -1);
  for (int g = 0; g < parts; ++g)
    for (int64_t t = g * n; t < (g + 1) * n; ++t)
      if (global.doc_start[t]) {
        out[g] = global.doc_id[t] - 1;
        break;
      }
  return out;
}

// One schedule over the family with sequence states: LASP-2, or the LASP-1 ring
// (which adds one AllGather per direction for the final states and their gradients).
void run_with_states(const SpCase& c, bool ring) {
  DeltaSpec s;
  s.batch = c.batch;
  s.gate_kind = c.gate;
  s.chunk_size = 4;
  s.seqlen = 12 * std::max(c.world, 2);  // parts of 6 or 12 (+) tokens: parts end mid-chunk
  if (c.packed) {
    s.batch = 1;
    // one at a balanced part edge, a one-token document, one spanning several parts
    s.doc_starts = {5, 6, 7, 12, s.seqlen - 1};
  }
  const DeltaProblem<double> global(s);
  const DeltaReference ref = delta_reference(global);
  const int64_t N = s.num_docs(), D = N * s.heads * s.dim_k * s.dim_v;
  const int parts_per_rank = c.balanced ? 2 : 1;

  TokenOutputs got(ref);
  std::vector<double> d_initial(D, 0.0);
  std::vector<std::vector<float>> finals(c.world);
  std::mutex mu;
  const double weight_sum = c.world * (c.world + 1) / 2.0;
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout{c.world, rank, parts_per_rank};
    DeltaProblem<double> local = local_problem(global, layout);
    // Each rank holds its own copy of the final states; their gradients add up.
    for (auto& e : local.final_dstate) e = static_cast<float>(e * (rank + 1) / weight_sum);
    const DeltaParams p = local.params();
    const int64_t gk = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;

    std::vector<double> lo(local.v.size());
    std::vector<float> lfinals(D), fold(p.bh() * p.state_elems());
    SequenceStates seq;
    if (c.packed) {
      seq.head_doc = head_docs(global, c.world * parts_per_rank);
      seq.count = N;
    }
    seq.initial = local.initial.data();
    seq.final_state = lfinals.data();
    const DeltaFamily fwd(delta_cpu_backend(), p, MutView{lo.data(), local.strides(s.dim_v)}, fold.data());
    const SummaryShape sh = fwd.shape();
    std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
    std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
    std::vector<float> head_maps(Lasp2Saved::head_maps_floats(sh, layout, c.packed) + 1);
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data(), head_maps.data()};
    // LASP-1 keeps the entering states, the records and the head maps of its parts
    std::vector<float> ring_entering(Lasp1Saved::entering_state_floats(sh, parts_per_rank), -1.f);  // poisoned
    std::vector<float> ring_records(Lasp1Saved::local_record_floats(sh, parts_per_rank), -1.f);
    std::vector<float> ring_heads(Lasp1Saved::head_maps_floats(sh, parts_per_rank, c.packed) + 1, -1.f);
    const Lasp1Saved ring_saved{ring_entering.data(), ring_records.data(), ring_heads.data()};
    if (ring) {
      std::vector<double> fws((lasp1_forward_workspace_bytes(fwd, layout, seq) + 7) / 8);
      lasp1_forward(fwd, &comm, layout, ring_saved, seq, fws.data(), nullptr);
    } else {
      std::vector<double> fws((lasp2_forward_workspace_bytes(fwd, layout, seq) + 7) / 8);
      lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), Lasp2Options{}, nullptr);
    }
    EXPECT_EQ(comm.collectives(), 1);  // one device with states: the same path

    std::vector<double> ldq(local.q.size()), ldk(local.k.size()), ldv(local.v.size());
    std::vector<double> ldg(local.g.size()), ldb(local.beta.size());
    std::vector<float> ldi(D);
    const DeltaGrads grads{local.dout_view(), {ldq.data(), local.strides(s.dim_k)},
                           {ldk.data(), local.strides(s.dim_k)}, {ldv.data(), local.strides(s.dim_v)},
                           ldg.data(), ldb.data(), true};  // states in, their gradients out (as the torch op says)
    const DeltaFamily bwd(delta_cpu_backend(), p, grads, fold.data());
    seq.final_state = nullptr;
    seq.final_grad = local.final_dstate.data();
    seq.initial_grad = ldi.data();
    if (ring) {
      std::vector<double> bws((lasp1_backward_workspace_bytes(bwd, layout, seq) + 7) / 8);
      lasp1_backward(bwd, &comm, layout, ring_saved, seq, bws.data(), nullptr);
    } else {
      std::vector<double> bws((lasp2_backward_workspace_bytes(bwd, layout, seq) + 7) / 8);
      lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);
    }
    EXPECT_EQ(comm.collectives(), 2);

    std::lock_guard<std::mutex> lock(mu);
    got.put(layout, s, gk, lo, ldq, ldk, ldv, ldg, ldb);
    for (int64_t e = 0; e < D; ++e) d_initial[e] += ldi[e];
    finals[rank] = lfinals;
  });
  got.expect_match(ref);  // the states too agree to fp32 rounding
  EXPECT_LT(rel_error(d_initial, ref.d_initial), 1e-5);
  for (int r = 0; r < c.world; ++r) EXPECT_LT(rel_error(finals[r], ref.finals), 1e-5) << "rank " << r;
}

class DeltaLasp2Sp : public ::testing::TestWithParam<SpCase> {};
TEST_P(DeltaLasp2Sp, RanksMatchRecurrence) { run_with_states(GetParam(), false); }

// LASP-1 with sequence states: the ring in global part order (the balanced split
// runs up and back down the ranks).
class DeltaLasp1StatesSp : public ::testing::TestWithParam<SpCase> {};
TEST_P(DeltaLasp1StatesSp, RanksMatchRecurrence) { run_with_states(GetParam(), true); }

std::vector<SpCase> sp_cases() {
  std::vector<SpCase> out;
  for (int world : {1, 2, 3, 4})
    for (bool balanced : {false, true})
      for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
        for (bool packed : {false, true}) {
          if (world == 1 && balanced) continue;
          out.push_back({world, balanced, gate, packed});
          if (balanced && !packed) out.push_back({world, balanced, gate, packed, 1});
        }
  return out;
}

// Without sequence states (the training step's usual call): documents only reset, as
// cu_seqlens describe them, and nothing enters or leaves the sequences; B = 1 with the
// balanced split pairs its parts with or without document starts.
TEST_P(DeltaLasp2Sp, WithoutStatesMatchesRecurrence) {
  const SpCase c = GetParam();
  DeltaSpec s;
  s.batch = c.packed ? 1 : c.batch;
  s.gate_kind = c.gate;
  s.chunk_size = 4;
  s.seqlen = 12 * std::max(c.world, 2);
  if (c.packed) s.doc_starts = {5, 6, 7, 12, s.seqlen - 1};
  DeltaProblem<double> global(s);
  std::fill(global.initial.begin(), global.initial.end(), 0.f);
  std::fill(global.final_dstate.begin(), global.final_dstate.end(), 0.f);
  const DeltaReference ref = delta_reference(global);
  const int parts_per_rank = c.balanced ? 2 : 1;
  TokenOutputs got(ref);
  std::mutex mu;
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout{c.world, rank, parts_per_rank};
    const DeltaProblem<double> local = local_problem(global, layout);
    const int64_t gk = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;
    RankCall call(local);
    const DeltaFamily &fwd = call.fwd, &bwd = call.bwd;
    const SummaryShape sh = fwd.shape();
    std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
    std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data()};
    const SequenceStates seq;
    std::vector<double> fws((lasp2_forward_workspace_bytes(fwd, layout, seq) + 7) / 8);
    lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), Lasp2Options{}, nullptr);
    std::vector<double> bws((lasp2_backward_workspace_bytes(bwd, layout, seq) + 7) / 8);
    lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);
    std::lock_guard<std::mutex> lock(mu);
    got.put(layout, s, gk, call.o, call.dq, call.dk, call.dv, call.dg, call.dbeta);
  });
  got.expect_match(ref);
}

INSTANTIATE_TEST_SUITE_P(All, DeltaLasp2Sp, ::testing::ValuesIn(sp_cases()), sp_name);
INSTANTIATE_TEST_SUITE_P(All, DeltaLasp1StatesSp, ::testing::ValuesIn(sp_cases()), sp_name);

// LASP-1 (the ring of the same summaries) serves the family too: contiguous layout,
// no sequence states (documents still reset inside and across ranks).
class DeltaLasp1Sp : public ::testing::TestWithParam<SpCase> {};

TEST_P(DeltaLasp1Sp, RanksMatchRecurrence) {
  const SpCase c = GetParam();
  DeltaSpec s;
  s.gate_kind = c.gate;
  s.chunk_size = 4;
  s.seqlen = 10 * c.world;
  if (c.packed) {
    s.batch = 1;
    s.doc_starts = {4, 10, 11, s.seqlen - 3};  // one at a rank edge
  }
  DeltaProblem<double> global(s);
  std::fill(global.initial.begin(), global.initial.end(), 0.f);
  std::fill(global.final_dstate.begin(), global.final_dstate.end(), 0.f);
  const DeltaReference ref = delta_reference(global);
  TokenOutputs got(ref);
  std::mutex mu;
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = PartLayout::contiguous(c.world, rank);
    DeltaProblem<double> local = local_problem(global, layout);
    const int64_t gk = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;
    RankCall call(local);
    const DeltaFamily &fwd = call.fwd, &bwd = call.bwd;
    const SummaryShape sh = fwd.shape();
    std::vector<float> entering(Lasp1Saved::entering_state_floats(sh)), record(Lasp1Saved::local_record_floats(sh));
    const Lasp1Saved saved{entering.data(), record.data()};
    std::vector<double> fws((lasp1_forward_workspace_bytes(fwd, layout) + 15) / 8);
    std::vector<double> bws((lasp1_backward_workspace_bytes(bwd, layout) + 15) / 8);
    lasp1_forward(fwd, &comm, layout, saved, fws.data(), nullptr);
    lasp1_backward(bwd, &comm, layout, saved, bws.data(), nullptr);
    std::lock_guard<std::mutex> lock(mu);
    got.put(layout, s, gk, call.o, call.dq, call.dk, call.dv, call.dg, call.dbeta);
  });
  got.expect_match(ref);
}

std::vector<SpCase> ring_cases() {
  std::vector<SpCase> out;
  for (int world : {2, 3})
    for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
      for (bool packed : {false, true}) out.push_back({world, false, gate, packed});
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, DeltaLasp1Sp, ::testing::ValuesIn(ring_cases()), sp_name);

}  // namespace
}  // namespace lasp2::delta::testing

namespace lasp2::delta::testing {
namespace {

// Bad sequence states fail with lasp2::Error before any kernel or collective runs.
TEST(DeltaSpChecks, RejectsInconsistentArguments) {
  DeltaSpec s;
  s.seqlen = 8;
  const DeltaProblem<double> pr(s);
  const DeltaParams p = pr.params();
  std::vector<double> o(pr.v.size());
  std::vector<float> buffers(4096), fold(p.bh() * p.state_elems());
  const Lasp2Saved saved{buffers.data(), buffers.data() + 1024, buffers.data() + 2048, buffers.data() + 3072};
  std::vector<double> ws(8192);
  const DeltaFamily f(delta_cpu_backend(), p, MutView{o.data(), pr.strides(s.dim_v)}, fold.data());
  std::vector<float> finals(4 * p.bh() * p.state_elems());
  auto run = [&](const PartLayout& layout, const SequenceStates& seq) {
    lasp2_forward(f, nullptr, layout, saved, seq, ws.data(), Lasp2Options{}, nullptr);
  };
  SequenceStates rows;
  rows.final_state = finals.data();
  EXPECT_THROW(run(PartLayout::contiguous(2, 0), rows), Error);  // SP without a communicator
  SequenceStates packed = rows;  // one head_doc entry per global part
  packed.count = 2;
  packed.head_doc = {-1, 0};
  EXPECT_THROW(run(PartLayout::contiguous(1, 0), packed), Error);
  packed.head_doc = {1};  // the last document never ends in a head
  EXPECT_THROW(run(PartLayout::contiguous(1, 0), packed), Error);
  EXPECT_NO_THROW(run(PartLayout::contiguous(1, 0), rows));
}

}  // namespace
}  // namespace lasp2::delta::testing
