// Malformed DeltaParams given to the delta-rule family (LASP-2 / LASP-1 on one device
// over the CPU backend) must throw lasp2::Error naming the field instead of reading
// null memory, looping forever, or returning NaN.
#include <gtest/gtest.h>

#include <functional>
#include <limits>
#include <string>

#include "../expect_error.h"
#include "delta_problem.h"
#include "delta_rule/delta_family.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"

namespace lasp2::delta::testing {
namespace {

using ::lasp2::testing::expect_error_naming;

// Builds the family (forward and backward) from a valid float64 problem with `edit`
// applied and runs it through both schedules on one device.
void expect_rejected(const std::function<void(DeltaParams&)>& edit, const std::string& field) {
  DeltaSpec s;
  s.seqlen = 8;
  const DeltaProblem<double> pr(s);
  DeltaParams p = pr.params();
  edit(p);
  std::vector<double> out(3 * pr.v.size() + 2 * pr.k.size());
  std::vector<float> fold(pr.v.size() * pr.k.size() + 64);
  const MutView o{out.data(), pr.strides(s.dim_v)}, dv{out.data() + pr.v.size(), pr.strides(s.dim_v)},
      dq{out.data() + 2 * pr.v.size(), pr.strides(s.dim_k)},
      dk{out.data() + 2 * pr.v.size() + pr.k.size(), pr.strides(s.dim_k)};
  std::vector<double> ws(1 << 14);
  const PartLayout one = PartLayout::contiguous(1, 0);
  SCOPED_TRACE(field);
  expect_error_naming([&] {
    const DeltaFamily f(delta_cpu_backend(), p, o, fold.data());
    lasp2_forward(f, nullptr, one, Lasp2Saved{}, SequenceStates{}, ws.data(), Lasp2Options{}, nullptr);
  }, field);
  expect_error_naming([&] {
    const DeltaFamily f(delta_cpu_backend(), p, DeltaGrads{pr.dout_view(), dq, dk, dv}, fold.data());
    lasp1_backward(f, nullptr, one, Lasp1Saved{}, ws.data(), nullptr);
  }, field);
}

TEST(DeltaParamErrors, NegativeSizesAndDims) {
  expect_rejected([](DeltaParams& p) { p.batch = -1; }, "batch");
  expect_rejected([](DeltaParams& p) { p.seqlen = -1; }, "seqlen");
  expect_rejected([](DeltaParams& p) { p.heads = -3; }, "heads");
  expect_rejected([](DeltaParams& p) { p.dim_k = 0; }, "dim_k");
  expect_rejected([](DeltaParams& p) { p.dim_v = 0; }, "dim_v");
}

TEST(DeltaParamErrors, NullInputs) {
  expect_rejected([](DeltaParams& p) { p.q.data = nullptr; }, "q.data");
  expect_rejected([](DeltaParams& p) { p.k.data = nullptr; }, "k.data");
  expect_rejected([](DeltaParams& p) { p.v.data = nullptr; }, "v.data");
  expect_rejected([](DeltaParams& p) { p.g = nullptr; }, "DeltaParams.g");
  expect_rejected([](DeltaParams& p) { p.beta = nullptr; }, "beta");
}

TEST(DeltaParamErrors, BadScalarsAndKinds) {
  expect_rejected([](DeltaParams& p) { p.scale = std::numeric_limits<double>::quiet_NaN(); }, "scale");
  // chunk_size 0 never advanced the CPU kernels' chunk loop.
  expect_rejected([](DeltaParams& p) { p.chunk_size = 0; }, "chunk_size");
  expect_rejected([](DeltaParams& p) { p.gate_dtype = ScalarType::kBFloat16; }, "gate_dtype");
  expect_rejected([](DeltaParams& p) { p.gate_kind = static_cast<GateKind>(5); }, "gate_kind");
}

TEST(DeltaParamErrors, NullOutputsAndGradients) {
  DeltaSpec s;
  s.seqlen = 8;
  const DeltaProblem<double> pr(s);
  const DeltaParams p = pr.params();
  std::vector<double> g(2 * pr.k.size() + pr.v.size());
  std::vector<float> fold(pr.v.size() * pr.k.size() + 64);
  const MutView dq{g.data(), pr.strides(s.dim_k)}, dk{g.data() + pr.k.size(), pr.strides(s.dim_k)},
      dv{g.data() + 2 * pr.k.size(), pr.strides(s.dim_v)}, none{nullptr, pr.strides(s.dim_v)};
  expect_error_naming([&] { DeltaFamily(delta_cpu_backend(), p, none, fold.data()); }, "o.data");
  // Strides left at 0: every token would write one row of o.
  expect_error_naming([&] { DeltaFamily(delta_cpu_backend(), p, MutView{g.data(), {}}, fold.data()); },
                      "o.stride.batch");
  expect_error_naming([&] {
    DeltaFamily(delta_cpu_backend(), p, DeltaGrads{pr.dout_view(), dq, dk, {dv.data, {dv.stride.batch, 0, 1}}},
                fold.data());
  }, "dv.stride.seq");
  expect_error_naming([&] {
    DeltaFamily(delta_cpu_backend(), p, DeltaGrads{{nullptr, pr.strides(s.dim_v)}, dq, dk, dv}, fold.data());
  }, "dout.data");
  expect_error_naming([&] { DeltaFamily(delta_cpu_backend(), p, DeltaGrads{pr.dout_view(), none, dk, dv}, fold.data()); },
                      "dq.data");
  expect_error_naming([&] { DeltaFamily(delta_cpu_backend(), p, DeltaGrads{pr.dout_view(), dq, none, dv}, fold.data()); },
                      "dk.data");
  expect_error_naming([&] { DeltaFamily(delta_cpu_backend(), p, DeltaGrads{pr.dout_view(), dq, dk, none}, fold.data()); },
                      "dv.data");
}

}  // namespace
}  // namespace lasp2::delta::testing
