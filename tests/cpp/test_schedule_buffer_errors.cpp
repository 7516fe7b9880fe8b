// Null saved buffers or workspaces given to the schedules must throw lasp2::Error
// naming the buffer, on every rank before any communication, instead of writing
// through a null pointer.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "expect_error.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "problem.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

// One rank's valid problem, outputs, gradients and properly sized buffers.
struct Rank {
  ProblemSpec spec;
  Problem<double> pr;
  AttentionParams p;
  std::vector<double> o, dq, dk, dv, dg;
  std::vector<float> records, prefix, maps, entering;
  Workspace ws;

  explicit Rank(const PartLayout& l)
      : spec(small()), pr(spec), p(pr.params()), o(pr.zeros_like_v()), dq(pr.zeros_like_k()),
        dk(pr.zeros_like_k()), dv(pr.zeros_like_v()), dg(pr.gate.size()),
        records(Lasp2Saved::local_records_floats(p, l)), prefix(Lasp2Saved::prefix_states_floats(p, l)),
        maps(Lasp2Saved::log_decays_floats(p, l)),
        entering(Lasp1Saved::entering_state_floats(p, l.parts_per_rank)),
        ws(std::max(lasp2_backward_workspace_bytes(p, l, true), lasp1_backward_workspace_bytes(p, l, true))) {}

  static ProblemSpec small() {
    ProblemSpec s;
    s.seqlen = 8;
    return s;
  }
  MutView ov() { return {o.data(), pr.strides(spec.dim_v)}; }
  MutView dqv() { return {dq.data(), pr.strides(spec.dim_k)}; }
  MutView dkv() { return {dk.data(), pr.strides(spec.dim_k)}; }
  MutView dvv() { return {dv.data(), pr.strides(spec.dim_v)}; }
  Lasp2Saved saved2() { return {records.data(), prefix.data(), maps.data()}; }
  Lasp1Saved saved1() { return {entering.data(), records.data()}; }
};

TEST(ScheduleBufferErrors, Lasp2NullSavedOrWorkspace) {
  for (const bool balanced : {false, true}) {
    run_ranks(2, [&](int rank, ThreadCommunicator& comm) {
      const PartLayout l = balanced ? PartLayout::balanced(2, rank) : PartLayout::contiguous(2, rank);
      Rank r(l);
      const auto fwd = [&](const Lasp2Saved& saved, void* ws) {
        lasp2_forward(cpu_backend(), &comm, l, r.p, r.ov(), saved, ws, {}, nullptr);
      };
      const auto bwd = [&](const Lasp2Saved& saved, void* ws) {
        lasp2_backward(cpu_backend(), &comm, l, r.p, r.pr.dout_view(), saved, r.dqv(), r.dkv(), r.dvv(),
                       r.dg.data(), ws, nullptr);
      };
      Lasp2Saved s = r.saved2();
      s.local_records = nullptr;
      expect_error_naming([&] { fwd(s, r.ws.data()); }, "Lasp2Saved.local_records");
      expect_error_naming([&] { bwd(s, r.ws.data()); }, "Lasp2Saved.local_records");
      s = r.saved2();
      s.prefix_states = nullptr;
      expect_error_naming([&] { fwd(s, r.ws.data()); }, "Lasp2Saved.prefix_states");
      s = r.saved2();
      s.maps = nullptr;
      expect_error_naming([&] { bwd(s, r.ws.data()); }, "Lasp2Saved.maps");
      expect_error_naming([&] { fwd(r.saved2(), nullptr); }, "workspace");
      expect_error_naming([&] { bwd(r.saved2(), nullptr); }, "workspace");
      EXPECT_EQ(comm.collectives(), 0);
    });
  }
}

TEST(ScheduleBufferErrors, Lasp1NullSavedOrWorkspace) {
  run_ranks(2, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout l = PartLayout::contiguous(2, rank);
    Rank r(l);
    const auto fwd = [&](const Lasp1Saved& saved, void* ws) {
      lasp1_forward(cpu_backend(), &comm, l, r.p, r.ov(), saved, ws, nullptr);
    };
    const auto bwd = [&](const Lasp1Saved& saved, void* ws) {
      lasp1_backward(cpu_backend(), &comm, l, r.p, r.pr.dout_view(), saved, r.dqv(), r.dkv(), r.dvv(),
                     r.dg.data(), ws, nullptr);
    };
    Lasp1Saved s = r.saved1();
    s.entering_state = nullptr;
    expect_error_naming([&] { fwd(s, r.ws.data()); }, "Lasp1Saved.entering_state");
    expect_error_naming([&] { bwd(s, r.ws.data()); }, "Lasp1Saved.entering_state");
    s = r.saved1();
    s.local_record = nullptr;
    expect_error_naming([&] { fwd(s, r.ws.data()); }, "Lasp1Saved.local_record");
    expect_error_naming([&] { fwd(r.saved1(), nullptr); }, "workspace");
    expect_error_naming([&] { bwd(r.saved1(), nullptr); }, "workspace");
    EXPECT_EQ(comm.p2p_calls(), 0);
  });
}

// One device: the backward's only workspace is the gate gradient's scratch.
TEST(ScheduleBufferErrors, OneDeviceBackwardNeedsItsScratchForDg) {
  const PartLayout one = PartLayout::contiguous(1, 0);
  Rank r(one);
  ASSERT_GT(lasp2_backward_workspace_bytes(r.p, one, true), 0);
  expect_error_naming([&] {
    lasp2_backward(cpu_backend(), nullptr, one, r.p, r.pr.dout_view(), {}, r.dqv(), r.dkv(), r.dvv(), r.dg.data(),
                   nullptr, nullptr);
  }, "workspace");
  // Without dg nothing needs scratch: a null workspace runs.
  EXPECT_NO_THROW(lasp2_backward(cpu_backend(), nullptr, one, r.p, r.pr.dout_view(), {}, r.dqv(), r.dkv(), r.dvv(),
                                 nullptr, nullptr, nullptr));
}

}  // namespace
}  // namespace lasp2::testing
