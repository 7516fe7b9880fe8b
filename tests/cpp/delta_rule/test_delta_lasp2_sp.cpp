// The delta-rule LASP-2 schedule on P threads: every rank's outputs, gradients and
// final states equal the float64 recurrence over the whole sequence, for the
// contiguous and balanced layouts, GDN and KDA gates, batch rows and packed
// documents that span ranks, with initial states in and final states out; exactly
// one collective per direction.
#include <gtest/gtest.h>

#include <algorithm>
#include <mutex>

#include "../thread_communicator.h"
#include "delta_problem.h"
#include "delta_rule/delta_lasp2.h"

namespace lasp2::delta::testing {
namespace {

using lasp2::testing::run_ranks;
using lasp2::testing::ThreadCommunicator;

struct SpCase {
  int world;
  bool balanced;
  GateKind gate;
  bool packed;
};

std::string sp_name(const ::testing::TestParamInfo<SpCase>& info) {
  const auto& c = info.param;
  return "P" + std::to_string(c.world) + (c.balanced ? "_balanced_" : "_contiguous_") +
         (c.gate == GateKind::kScalar ? "gdn" : "kda") + (c.packed ? "_packed" : "_rows");
}

// The document ending at the end of each global part's head (-1: no start inside).
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

class DeltaLasp2Sp : public ::testing::TestWithParam<SpCase> {};

TEST_P(DeltaLasp2Sp, RanksMatchRecurrence) {
  const SpCase c = GetParam();
  DeltaSpec s;
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
  DeltaSequences seqs;
  seqs.count = N;
  const int parts_per_rank = c.balanced ? 2 : 1;
  if (c.packed) seqs.head_doc = head_docs(global, c.world * parts_per_rank);

  std::vector<double> o(ref.o.size()), dq(ref.dq.size()), dk(ref.dk.size()), dv(ref.dv.size());
  std::vector<double> dg(ref.dg.size()), db(ref.dbeta.size()), d_initial(D, 0.0);
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

    std::vector<float> records(DeltaSaved::records_floats(p, layout));
    std::vector<float> prefixes(DeltaSaved::prefixes_floats(p, layout));
    const DeltaSaved saved{records.data(), prefixes.data()};
    std::vector<double> lo(local.v.size());
    std::vector<float> lfinals(D);
    std::vector<double> fws((delta_lasp2_forward_workspace_bytes(p, layout, seqs, true) + 7) / 8);
    delta_lasp2_forward(delta_cpu_backend(), &comm, layout, p, seqs, local.initial.data(),
                        {lo.data(), local.strides(s.dim_v)}, saved, lfinals.data(), fws.data(), nullptr);
    EXPECT_EQ(comm.collectives(), c.world > 1 ? 1 : 0);

    std::vector<double> ldq(local.q.size()), ldk(local.k.size()), ldv(local.v.size());
    std::vector<double> ldg(local.g.size()), ldb(local.beta.size());
    std::vector<float> ldi(D);
    std::vector<double> bws((delta_lasp2_backward_workspace_bytes(p, layout, seqs, true) + 7) / 8);
    delta_lasp2_backward(delta_cpu_backend(), &comm, layout, p, seqs, local.initial.data(),
                         local.dout_view(), saved, local.final_dstate.data(),
                         {ldq.data(), local.strides(s.dim_k)}, {ldk.data(), local.strides(s.dim_k)},
                         {ldv.data(), local.strides(s.dim_v)}, ldg.data(), ldb.data(), ldi.data(),
                         bws.data(), nullptr);
    EXPECT_EQ(comm.collectives(), c.world > 1 ? 2 : 0);

    std::lock_guard<std::mutex> lock(mu);
    put_tokens(o, lo, layout, s.batch, s.seqlen, s.heads * s.dim_v);
    put_tokens(dq, ldq, layout, s.batch, s.seqlen, s.heads * s.dim_k);
    put_tokens(dk, ldk, layout, s.batch, s.seqlen, s.heads * s.dim_k);
    put_tokens(dv, ldv, layout, s.batch, s.seqlen, s.heads * s.dim_v);
    put_tokens(dg, ldg, layout, s.batch, s.seqlen, s.heads * gk);
    put_tokens(db, ldb, layout, s.batch, s.seqlen, s.heads);
    for (int64_t e = 0; e < D; ++e) d_initial[e] += ldi[e];
    finals[rank] = lfinals;
  });
  // Summaries travel in fp32, so fp64 inputs agree to fp32 rounding.
  EXPECT_LT(rel_error(o, ref.o), 1e-5);
  EXPECT_LT(rel_error(dq, ref.dq), 1e-5);
  EXPECT_LT(rel_error(dk, ref.dk), 1e-5);
  EXPECT_LT(rel_error(dv, ref.dv), 1e-5);
  EXPECT_LT(rel_error(dg, ref.dg), 1e-5);
  EXPECT_LT(rel_error(db, ref.dbeta), 1e-5);
  EXPECT_LT(rel_error(d_initial, ref.d_initial), 1e-5);
  for (int r = 0; r < c.world; ++r) EXPECT_LT(rel_error(finals[r], ref.finals), 1e-5) << "rank " << r;
}

std::vector<SpCase> sp_cases() {
  std::vector<SpCase> out;
  for (int world : {1, 2, 3, 4})
    for (bool balanced : {false, true})
      for (GateKind gate : {GateKind::kScalar, GateKind::kPerKey})
        for (bool packed : {false, true}) {
          if (world == 1 && balanced) continue;
          out.push_back({world, balanced, gate, packed});
        }
  return out;
}

INSTANTIATE_TEST_SUITE_P(All, DeltaLasp2Sp, ::testing::ValuesIn(sp_cases()), sp_name);

}  // namespace
}  // namespace lasp2::delta::testing
