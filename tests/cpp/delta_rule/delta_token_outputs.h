// Every rank's delta-rule outputs and gradients gathered in global token order, against
// the float64 recurrence (the SP tests' shared check).
#pragma once

#include <gtest/gtest.h>

#include <vector>

#include "delta_problem.h"

namespace lasp2::delta::testing {

struct TokenOutputs {
  std::vector<double> o, dq, dk, dv, dg, db;
  explicit TokenOutputs(const DeltaReference& ref)
      : o(ref.o.size()), dq(ref.dq.size()), dk(ref.dk.size()), dv(ref.dv.size()), dg(ref.dg.size()),
        db(ref.dbeta.size()) {}
  // A rank's part (its local tensors; gk gate values a token and head); the caller holds
  // the lock that serialises the ranks.
  void put(const PartLayout& layout, const DeltaSpec& s, int64_t gk, const std::vector<double>& lo,
           const std::vector<double>& ldq, const std::vector<double>& ldk, const std::vector<double>& ldv,
           const std::vector<double>& ldg, const std::vector<double>& ldb) {
    put_tokens(o, lo, layout, s.batch, s.seqlen, s.heads * s.dim_v);
    put_tokens(dq, ldq, layout, s.batch, s.seqlen, s.heads * s.dim_k);
    put_tokens(dk, ldk, layout, s.batch, s.seqlen, s.heads * s.dim_k);
    put_tokens(dv, ldv, layout, s.batch, s.seqlen, s.heads * s.dim_v);
    put_tokens(dg, ldg, layout, s.batch, s.seqlen, s.heads * gk);
    put_tokens(db, ldb, layout, s.batch, s.seqlen, s.heads);
  }
  // Summaries travel in fp32, so fp64 inputs agree to fp32 rounding.
  void expect_match(const DeltaReference& ref) const {
    EXPECT_LT(rel_error(o, ref.o), 1e-5);
    EXPECT_LT(rel_error(dq, ref.dq), 1e-5);
    EXPECT_LT(rel_error(dk, ref.dk), 1e-5);
    EXPECT_LT(rel_error(dv, ref.dv), 1e-5);
    EXPECT_LT(rel_error(dg, ref.dg), 1e-5);
    EXPECT_LT(rel_error(db, ref.dbeta), 1e-5);
  }
};

}  // namespace lasp2::delta::testing
