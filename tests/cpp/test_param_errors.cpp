// Malformed AttentionParams given to the public entry points (the LASP-2 / LASP-1
// schedules over the CPU backend, one device) must throw lasp2::Error naming the field
// instead of reading null or out-of-bounds memory, looping forever, or returning NaN.
#include <gtest/gtest.h>

#include <cmath>
#include <functional>
#include <limits>
#include <string>

#include "expect_error.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "problem.h"

namespace lasp2::testing {
namespace {

// LASP-2 and LASP-1 forwards and backwards on one device with `edit` applied to the
// params of a valid float64 problem; each must reject it naming `field`.
void expect_rejected(const std::function<void(AttentionParams&)>& edit, const std::string& field) {
  ProblemSpec s;
  s.seqlen = 16;
  const Problem<double> pr(s);
  AttentionParams p = pr.params();
  edit(p);
  std::vector<double> o = pr.zeros_like_v(), dq = pr.zeros_like_k(), dk = pr.zeros_like_k(),
                      dv = pr.zeros_like_v(), dg(pr.gate.size());
  const PartLayout one = PartLayout::contiguous(1, 0);
  const MutView ov{o.data(), pr.strides(s.dim_v)};
  const MutView dqv{dq.data(), pr.strides(s.dim_k)}, dkv{dk.data(), pr.strides(s.dim_k)},
      dvv{dv.data(), pr.strides(s.dim_v)};
  Workspace ws(1 << 16);
  SCOPED_TRACE(field);
  expect_error_naming([&] { lasp2_forward(cpu_backend(), nullptr, one, p, ov, {}, ws.data(), {}, nullptr); },
                      field);
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, dqv, dkv, dvv, dg.data(), ws.data(),
                   nullptr);
  }, field);
  expect_error_naming([&] { lasp1_forward(cpu_backend(), nullptr, one, p, ov, {}, ws.data(), nullptr); }, field);
  expect_error_naming([&] {
    lasp1_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, dqv, dkv, dvv, dg.data(), ws.data(),
                   nullptr);
  }, field);
}

TEST(ParamErrors, NegativeSizes) {
  expect_rejected([](AttentionParams& p) { p.batch = -1; }, "batch");
  expect_rejected([](AttentionParams& p) { p.seqlen = -4; }, "seqlen");
  expect_rejected([](AttentionParams& p) { p.heads = -2; }, "heads");
}

TEST(ParamErrors, HeadDimsBelowOne) {
  expect_rejected([](AttentionParams& p) { p.dim_k = 0; }, "dim_k");
  expect_rejected([](AttentionParams& p) { p.dim_v = -1; }, "dim_v");
}

TEST(ParamErrors, NullInputs) {
  expect_rejected([](AttentionParams& p) { p.q.data = nullptr; }, "q.data");
  expect_rejected([](AttentionParams& p) { p.k.data = nullptr; }, "k.data");
  expect_rejected([](AttentionParams& p) { p.v.data = nullptr; }, "v.data");
}

TEST(ParamErrors, DecayModeWithoutValues) {
  expect_rejected([](AttentionParams& p) { p.decay.gate = nullptr; }, "decay.gate");
  expect_rejected([](AttentionParams& p) {
    p.decay.mode = DecayMode::kFixed;
    p.decay.log_decay = nullptr;
  }, "decay.log_decay");
  expect_rejected([](AttentionParams& p) { p.decay.dtype = ScalarType::kBFloat16; }, "decay.dtype");
  expect_rejected([](AttentionParams& p) { p.decay.mode = static_cast<DecayMode>(7); }, "decay.mode");
}

TEST(ParamErrors, NonFiniteScale) {
  expect_rejected([](AttentionParams& p) { p.scale = std::numeric_limits<double>::quiet_NaN(); }, "scale");
  expect_rejected([](AttentionParams& p) { p.scale = std::numeric_limits<double>::infinity(); }, "scale");
}

// chunk_size 0 never advanced the CPU kernels' chunk loop: the call hung.
TEST(ParamErrors, ChunkSizeBelowOne) {
  expect_rejected([](AttentionParams& p) { p.chunk_size = 0; }, "chunk_size");
  expect_rejected([](AttentionParams& p) { p.chunk_size = -8; }, "chunk_size");
}

TEST(ParamErrors, NegativeDocStartStride) {
  expect_rejected([](AttentionParams& p) {
    static const std::vector<uint8_t> starts(16, 0);
    p.doc_start = starts.data();
    p.doc_start_batch_stride = -16;
  }, "doc_start_batch_stride");
}

// Null outputs / gradients with tokens to write: a segfault before.
TEST(ParamErrors, NullOutputsAndGradients) {
  ProblemSpec s;
  s.seqlen = 16;
  const Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<double> grads(2 * pr.k.size() + pr.v.size());
  const PartLayout one = PartLayout::contiguous(1, 0);
  const MutView dqv{grads.data(), pr.strides(s.dim_k)}, dkv{grads.data() + pr.k.size(), pr.strides(s.dim_k)},
      dvv{grads.data() + 2 * pr.k.size(), pr.strides(s.dim_v)}, none{nullptr, pr.strides(s.dim_v)};
  Workspace ws(1 << 16);
  expect_error_naming([&] { lasp2_forward(cpu_backend(), nullptr, one, p, none, {}, ws.data(), {}, nullptr); },
                      "o.data");
  expect_error_naming([&] { lasp1_forward(cpu_backend(), nullptr, one, p, none, {}, ws.data(), nullptr); },
                      "o.data");
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, p, {nullptr, pr.strides(s.dim_v)}, {}, dqv, dkv, dvv, nullptr,
                   ws.data(), nullptr);
  }, "dout.data");
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, none, dkv, dvv, nullptr, ws.data(), nullptr);
  }, "dq.data");
  expect_error_naming([&] {
    lasp1_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, dqv, none, dvv, nullptr, ws.data(), nullptr);
  }, "dk.data");
  expect_error_naming([&] {
    lasp1_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, dqv, dkv, none, nullptr, ws.data(), nullptr);
  }, "dv.data");
}

// An empty problem (no tokens) may come with null data, as torch's empty tensors do.
TEST(ParamErrors, EmptyProblemWithNullDataRuns) {
  ProblemSpec s;
  s.seqlen = 0;
  const Problem<double> pr(s);
  AttentionParams p = pr.params();
  p.q.data = p.k.data = p.v.data = nullptr;
  p.decay.gate = nullptr;
  EXPECT_NO_THROW(lasp2_forward(cpu_backend(), nullptr, PartLayout::contiguous(1, 0), p,
                                {nullptr, pr.strides(s.dim_v)}, {}, nullptr, {}, nullptr));
}

// The local document starts of a packed sequence: null flags with tokens read null
// memory, a layout that does not split the tokens read past the last part.
TEST(ParamErrors, LocalDocumentsNeedFlagsAndAValidLayout) {
  const std::vector<uint8_t> flags(7, 0);
  expect_error_naming([] { LocalDocuments::of(nullptr, 8, PartLayout::contiguous(1, 0), {-1}); },
                      "host_doc_start");
  expect_error_naming([&] { LocalDocuments::of(flags.data(), 7, PartLayout::balanced(2, 0), {-1, -1, -1, -1}); },
                      "balanced");
  EXPECT_TRUE(LocalDocuments::of(nullptr, 0, PartLayout::contiguous(1, 0), {-1}).starts.empty());
}

// Outputs whose strides were left at 0 made every token write one row: forward
// returned a silently wrong o. A broadcast dout (zero strides, torch's expand of a
// per-channel weight) is a valid input and still runs.
TEST(ParamErrors, OutputsWithZeroStrides) {
  ProblemSpec s;
  s.seqlen = 16;
  const Problem<double> pr(s);
  const AttentionParams p = pr.params();
  std::vector<double> o = pr.zeros_like_v(), dq = pr.zeros_like_k(), dk = pr.zeros_like_k(),
                      dv = pr.zeros_like_v();
  const PartLayout one = PartLayout::contiguous(1, 0);
  const BTHStrides sk = pr.strides(s.dim_k), sv = pr.strides(s.dim_v);
  const auto forward = [&](BTHStrides st) {
    lasp2_forward(cpu_backend(), nullptr, one, p, {o.data(), st}, {}, nullptr, {}, nullptr);
  };
  expect_error_naming([&] { forward({}); }, "o.stride.batch");
  expect_error_naming([&] { forward({sv.batch, 0, sv.head}); }, "o.stride.seq");
  expect_error_naming([&] { forward({sv.batch, sv.seq, 0}); }, "o.stride.head");
  expect_error_naming([&] {
    lasp1_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, {dq.data(), {sk.batch, 0, sk.head}},
                   {dk.data(), sk}, {dv.data(), sv}, nullptr, nullptr, nullptr);
  }, "dq.stride.seq");
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, {dq.data(), sk}, {dk.data(), {0, sk.seq, sk.head}},
                   {dv.data(), sv}, nullptr, nullptr, nullptr);
  }, "dk.stride.batch");
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, p, pr.dout_view(), {}, {dq.data(), sk}, {dk.data(), sk},
                   {dv.data(), {sv.batch, sv.seq, 0}}, nullptr, nullptr, nullptr);
  }, "dv.stride.head");
  // A broadcast dout: one row of dim_v values for every (b, t, h).
  const std::vector<double> row(pr.dout.begin(), pr.dout.begin() + s.dim_v);
  EXPECT_NO_THROW(lasp2_backward(cpu_backend(), nullptr, one, p, {row.data(), {0, 0, 0}}, {}, {dq.data(), sk},
                                 {dk.data(), sk}, {dv.data(), sv}, nullptr, nullptr, nullptr));
}

}  // namespace
}  // namespace lasp2::testing
