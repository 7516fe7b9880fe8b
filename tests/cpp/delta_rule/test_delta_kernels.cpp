// The CPU delta-rule kernels on one part (the whole sequence) against the float64
// step-by-step recurrence: outputs, the affine part summary, the gradient of the
// entering state, and the local backward, for GDN and KDA gates, float32 and
// float64, rows and packed documents with initial / final states.
#include <gtest/gtest.h>

#include "delta_problem.h"
#include "delta_rule/delta_backend.h"

namespace lasp2::delta::testing {
namespace {

struct KernelCase {
  GateKind gate;
  bool packed;
  bool fp64;
  bool resets = false;  // -inf / -1e30 log gates (full resets) inside and at the edges of chunks
};

std::string kernel_name(const ::testing::TestParamInfo<KernelCase>& info) {
  const auto& c = info.param;
  return std::string(c.gate == GateKind::kScalar ? "gdn" : "kda") + (c.packed ? "_packed" : "_rows") +
         (c.fp64 ? "_fp64" : "_fp32") + (c.resets ? "_resets" : "");
}

DeltaSpec spec_for(const KernelCase& c) {
  DeltaSpec s;
  s.gate_kind = c.gate;
  if (c.packed) {
    s.batch = 1;
    s.doc_starts = {3, 4, 11, 12, 20};  // a one-token document, starts on and off chunk edges
  }
  if (c.resets) s.reset_tokens = {0, 6, 8, 9, 12, 22};  // the first token, mid-chunk, chunk edges, a doc start, the last
  return s;
}

class DeltaKernels : public ::testing::TestWithParam<KernelCase> {};

template <typename T>
void check_kernels(const KernelCase& c) {
  const DeltaProblem<T> pr(spec_for(c));
  const DeltaSpec& s = pr.spec;
  const DeltaReference ref = delta_reference(pr);
  const DeltaParams p = pr.params();
  const DeltaKernelBackend& be = delta_cpu_backend();
  const TokenRange all{0, s.seqlen};
  const double tol = c.fp64 ? 1e-11 : 2e-5;
  const int64_t se = p.state_elems(), S = p.bh() * se, N = s.num_docs();
  // The sequence's first document (each row without packing) starts from its initial state.
  const float* entering = pr.initial.data();

  std::vector<T> o(pr.v.size());
  DocStates doc;
  doc.initial = pr.initial.data();
  be.forward(p, all, entering, doc, {o.data(), pr.strides(s.dim_v)}, nullptr);
  EXPECT_LT(rel_error(o, ref.o), tol);

  // Summary: S_out = A S_in + M; with documents, A = 0 and the head ends the first one.
  std::vector<float> A(p.bh() * p.map_elems()), M(S), hA(A.size()), hM(S);
  std::vector<float> finals(N * s.heads * se, 0.f);
  doc.finals = finals.data();
  be.part_summary(p, all, doc, A.data(), M.data(), hA.data(), hM.data(), nullptr);
  std::vector<float> out(S);
  be.apply_map(A.data(), entering, M.data(), p.bh(), p.dim_k, p.dim_v, out.data(), nullptr);
  const int64_t last = c.packed ? (N - 1) * S : 0;
  EXPECT_LT(rel_error(out, std::vector<double>(ref.finals.begin() + last, ref.finals.begin() + last + S)), 2e-6);
  if (c.packed) {
    EXPECT_EQ(max_abs(A), 0.0);
    be.apply_map(hA.data(), entering, hM.data(), p.bh(), p.dim_k, p.dim_v, out.data(), nullptr);
    EXPECT_LT(rel_error(out, std::vector<double>(ref.finals.begin(), ref.finals.begin() + S)), 2e-6);
    // documents 2 and 4 begin and end inside the part ([4, 11), [12, 20)); 1 is [3, 4)
    for (int d : {1, 2, 3, 4}) {
      std::vector<float> got(finals.begin() + d * S, finals.begin() + (d + 1) * S);
      EXPECT_LT(rel_error(got, std::vector<double>(ref.finals.begin() + d * S, ref.finals.begin() + (d + 1) * S)), 2e-6) << d;
    }
  } else {
    EXPECT_EQ(A, hA);
    EXPECT_EQ(M, hM);
  }

  // Backward with the final-state gradients injected where each document ends.
  std::vector<T> dq(pr.q.size()), dk(pr.k.size()), dv(pr.v.size()), dg(pr.g.size()), db(pr.beta.size());
  std::vector<float> d_initial(pr.initial.size(), 0.f), dentering(S), E(S);
  DocStates bdoc;
  bdoc.initial = pr.initial.data();
  bdoc.final_dstate = pr.final_dstate.data();
  bdoc.d_initial = d_initial.data();
  be.backward(p, all, pr.dout_view(), entering, pr.final_dstate.data() + last, bdoc,
              {dq.data(), pr.strides(s.dim_k)}, {dk.data(), pr.strides(s.dim_k)},
              {dv.data(), pr.strides(s.dim_v)}, dg.data(), db.data(), dentering.data(), nullptr);
  EXPECT_LT(rel_error(dq, ref.dq), tol);
  EXPECT_LT(rel_error(dk, ref.dk), tol);
  EXPECT_LT(rel_error(dv, ref.dv), tol);
  EXPECT_LT(rel_error(dg, ref.dg), c.fp64 ? 1e-10 : 1e-4);
  EXPECT_LT(rel_error(db, ref.dbeta), c.fp64 ? 1e-10 : 1e-4);
  // The entering state is the first document's initial state.
  EXPECT_LT(rel_error(dentering, std::vector<double>(ref.d_initial.begin(), ref.d_initial.begin() + S)), 1e-5);
  if (c.packed) {
    std::vector<float> rest(d_initial.begin() + S, d_initial.end());
    EXPECT_LT(rel_error(rest, std::vector<double>(ref.d_initial.begin() + S, ref.d_initial.end())), 1e-5);
  }

  // Entering-state gradient from the outputs alone = the backward's with no final-state gradient.
  be.entering_dstate(p, all, pr.dout_view(), E.data(), nullptr);
  DocStates none;
  none.initial = pr.initial.data();
  be.backward(p, all, pr.dout_view(), entering, nullptr, none, {dq.data(), pr.strides(s.dim_k)},
              {dk.data(), pr.strides(s.dim_k)}, {dv.data(), pr.strides(s.dim_v)}, nullptr, nullptr,
              dentering.data(), nullptr);
  EXPECT_LT(rel_error(E, dentering), 1e-5);
  if (c.resets && c.gate == GateKind::kScalar) {
    EXPECT_EQ(max_abs(E), 0.0);  // every head forgets the entering state at token 0
  } else {
    EXPECT_GT(max_abs(E), 1e-3);
  }
}

TEST_P(DeltaKernels, MatchRecurrence) {
  if (GetParam().fp64) {
    check_kernels<double>(GetParam());
  } else {
    check_kernels<float>(GetParam());
  }
}

INSTANTIATE_TEST_SUITE_P(All, DeltaKernels,
                         ::testing::Values(KernelCase{GateKind::kScalar, false, true},
                                           KernelCase{GateKind::kScalar, true, true},
                                           KernelCase{GateKind::kPerKey, false, true},
                                           KernelCase{GateKind::kPerKey, true, true},
                                           KernelCase{GateKind::kScalar, false, false},
                                           KernelCase{GateKind::kPerKey, true, false},
                                           KernelCase{GateKind::kScalar, false, true, true},
                                           KernelCase{GateKind::kScalar, true, true, true},
                                           KernelCase{GateKind::kPerKey, false, true, true},
                                           KernelCase{GateKind::kPerKey, true, false, true}),
                         kernel_name);

// The chunk length changes nothing but rounding.
TEST(DeltaKernels, ChunkSizeInvariant) {
  DeltaSpec s;
  s.gate_kind = GateKind::kPerKey;
  s.seqlen = 29;
  std::vector<double> first;
  for (int chunk : {1, 3, 8, 64}) {
    s.chunk_size = chunk;
    const DeltaProblem<double> pr(s);
    std::vector<double> o(pr.v.size());
    delta_cpu_backend().forward(pr.params(), {0, s.seqlen}, nullptr, {}, {o.data(), pr.strides(s.dim_v)}, nullptr);
    if (first.empty()) first = o;
    EXPECT_LT(rel_error(o, first), 1e-12) << chunk;
  }
}

}  // namespace
}  // namespace lasp2::delta::testing
