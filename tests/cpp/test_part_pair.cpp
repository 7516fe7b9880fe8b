// A balanced rank's two parts as one batch of two rows (lasp2/part_pair.h): when the
// pair forms, what it reads and writes, and that LASP-2 then makes one backend call per
// pass with the two-row problem (B = 1) and still equals the recurrence; with B = 2 it
// keeps one call per part.
#include <gtest/gtest.h>

#include <mutex>

#include "lasp2/lasp2.h"
#include "lasp2/part_pair.h"
#include "local_slice.h"
#include "recurrent_reference.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

AttentionParams params_of(int64_t batch, int64_t seqlen) {
  AttentionParams p;
  p.batch = batch;
  p.seqlen = seqlen;
  p.heads = 3;
  p.dim_k = p.dim_v = 4;
  p.q.stride = p.k.stride = p.v.stride = {seqlen * 12, 12, 4};
  p.decay.gate_stride = {seqlen * 3, 3, 1};
  return p;
}

TEST(PartPair, FormsFromTheTwoHalvesOfOneRow) {
  if (!PartPair::enabled()) GTEST_SKIP() << "LASP2_PAIR_PARTS=0";
  const AttentionParams p = params_of(1, 10);
  const auto pair = PartPair::of(p, {{0, 5}, {5, 10}});
  ASSERT_TRUE(pair.has_value());
  EXPECT_EQ(pair->params.batch, 2);
  EXPECT_EQ(pair->params.seqlen, 5);
  EXPECT_TRUE(pair->range == (TokenRange{0, 5}));
  // row 1 starts where token 5 of the one row lies, in every view
  EXPECT_EQ(pair->params.q.stride.batch, 5 * 12);
  EXPECT_EQ(pair->params.v.stride.seq, 12);
  EXPECT_EQ(pair->params.decay.gate_stride.batch, 5 * 3);
  EXPECT_EQ(pair->params.doc_start_batch_stride, 5);
  const MutView o = pair->view(MutView{nullptr, {0, 7, 1}});
  EXPECT_EQ(o.stride.batch, 35);
  // Megatron's [T, B, H, D]: the sequence stride is what counts
  EXPECT_EQ(pair->view(ConstView{nullptr, {12, 24, 4}}).stride.batch, 5 * 24);
}

TEST(PartPair, NoneWhereTheHalvesAreNotTheWholeOfOneRow) {
  EXPECT_FALSE(PartPair::of(params_of(2, 10), {{0, 5}, {5, 10}}).has_value());  // B = 2
  EXPECT_FALSE(PartPair::of(params_of(1, 10), {{0, 10}}).has_value());          // one part
  EXPECT_FALSE(PartPair::of(params_of(1, 10), {{0, 4}, {4, 10}}).has_value());  // unequal
  EXPECT_FALSE(PartPair::of(params_of(1, 10), {{5, 10}, {0, 5}}).has_value());  // out of order
  EXPECT_FALSE(PartPair::of(params_of(1, 11), {{0, 5}, {5, 10}}).has_value());  // not the whole row
  EXPECT_FALSE(PartPair::of(params_of(1, 0), {{0, 0}, {0, 0}}).has_value());    // empty
}

TEST(PartPair, LaidOutFindsTheBaseOrRefuses) {
  float buf[8];
  EXPECT_EQ(*laid_out<float>({buf, buf + 4}, 4), buf);
  EXPECT_EQ(*laid_out<float>({nullptr, buf + 4}, 4), buf);  // a null entry's slot is the caller's zeros
  EXPECT_EQ(*laid_out<float>({buf, nullptr}, 4), buf);
  EXPECT_EQ(*laid_out<float>({nullptr, nullptr}, 4), nullptr);
  EXPECT_FALSE(laid_out<float>({buf, buf + 3}, 4).has_value());
  EXPECT_FALSE(laid_out<float>({buf + 4, buf}, 4).has_value());
}

// The CPU backend, recording the (batch, seqlen) of every pass it runs.
class RecordingBackend final : public KernelBackend {
 public:
  struct Call {
    const char* what;
    int64_t batch, seqlen;
  };
  Device device() const override { return Device::kCPU; }
  void part_state(const AttentionParams& p, TokenRange part, float* state, float* log_decay,
                  void* stream) const override {
    note("part_state", p);
    cpu_backend().part_state(p, part, state, log_decay, stream);
  }
  void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state, MutView o,
                     void* stream) const override {
    note("chunk_forward", p);
    cpu_backend().chunk_forward(p, part, initial_state, o, stream);
  }
  void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix, MutView o,
                         void* stream) const override {
    note("add_prefix_output", p);
    cpu_backend().add_prefix_output(p, part, prefix, o, stream);
  }
  void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate,
                   void* stream) const override {
    note("part_dstate", p);
    cpu_backend().part_dstate(p, part, dout, dstate, stream);
  }
  void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout, const float* initial_state,
                         MutView dq, void* q_dot_dq, void* stream) const override {
    note("chunk_backward_dq", p);
    cpu_backend().chunk_backward_dq(p, part, dout, initial_state, dq, q_dot_dq, stream);
  }
  void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout, const float* final_dstate,
                           MutView dk, MutView dv, const void* q_dot_dq, const float* dg_offset, void* dg,
                           void* stream) const override {
    note("chunk_backward_dkdv", p);
    cpu_backend().chunk_backward_dkdv(p, part, dout, final_dstate, dk, dv, q_dot_dq, dg_offset, dg, stream);
  }
  void combine_prefix(const std::vector<const float*>& parts, const float* log_decays, int target, int64_t bh,
                      int64_t state_elems, float* out, void* stream) const override {
    cpu_backend().combine_prefix(parts, log_decays, target, bh, state_elems, out, stream);
  }
  void combine_suffix(const std::vector<const float*>& parts, const float* log_decays, int target, int64_t bh,
                      int64_t state_elems, float* out, void* stream) const override {
    cpu_backend().combine_suffix(parts, log_decays, target, bh, state_elems, out, stream);
  }
  void state_dot(const float* prefix, const float* state, const float* log_decay, const float* dstate, int64_t bh,
                 int64_t state_elems, float* out, void* stream) const override {
    cpu_backend().state_dot(prefix, state, log_decay, dstate, bh, state_elems, out, stream);
  }
  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    cpu_backend().copy(dst, src, count, stream);
  }
  void fill_zero(float* dst, int64_t count, void* stream) const override {
    cpu_backend().fill_zero(dst, count, stream);
  }
  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    cpu_backend().add(dst, src, count, stream);
  }

  std::vector<Call> calls() const {
    std::lock_guard<std::mutex> lock(mu_);
    return calls_;
  }

 private:
  void note(const char* what, const AttentionParams& p) const {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.push_back({what, p.batch, p.seqlen});
  }
  mutable std::mutex mu_;
  mutable std::vector<Call> calls_;
};

// LASP-2 over P = 2 thread ranks, balanced split, fused forward: every rank's passes as
// the recording backend saw them, and the gathered results against the recurrence.
void run_balanced(int64_t batch, std::vector<std::vector<RecordingBackend::Call>>* calls) {
  ProblemSpec s;
  s.batch = batch;
  s.seqlen = 24;  // parts of 6 tokens
  s.chunk_size = 4;
  s.doc_starts = {5, 13};  // resets inside parts travel with the rows
  const Problem<double> global(s);
  const auto ref = recurrent_reference(global);
  std::vector<double> o(global.zeros_like_v()), dq(global.zeros_like_k()), dk(global.zeros_like_k()),
      dv(global.zeros_like_v()), dg(global.gate.size());
  std::mutex mu;
  calls->assign(2, {});
  run_ranks(2, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = PartLayout::balanced(2, rank);
    const Problem<double> local = local_problem(global, layout);
    const AttentionParams p = local.params();
    const auto sk = local.strides(p.dim_k), sv = local.strides(p.dim_v);
    std::vector<float> records(Lasp2Saved::local_records_floats(p, layout));
    std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(p, layout));
    std::vector<float> maps(Lasp2Saved::log_decays_floats(p, layout));
    const Lasp2Saved saved{records.data(), prefixes.data(), maps.data()};
    std::vector<double> lo(local.zeros_like_v()), ldq(local.zeros_like_k()), ldk(local.zeros_like_k()),
        ldv(local.zeros_like_v()), ldg(local.gate.size());
    RecordingBackend backend;
    Workspace fws(lasp2_forward_workspace_bytes(p, layout));
    Lasp2Options options;
    options.overlap_forward = false;
    lasp2_forward(backend, &comm, layout, p, {lo.data(), sv}, saved, fws.data(), options, nullptr);
    Workspace bws(lasp2_backward_workspace_bytes(p, layout, true));
    lasp2_backward(backend, &comm, layout, p, local.dout_view(), saved, {ldq.data(), sk}, {ldk.data(), sk},
                   {ldv.data(), sv}, ldg.data(), bws.data(), nullptr);
    std::lock_guard<std::mutex> lock(mu);
    (*calls)[rank] = backend.calls();
    put_tokens(o, lo, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(dq, ldq, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(dk, ldk, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(dv, ldv, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(dg, ldg, layout, s.batch, s.seqlen, s.heads, 1);
  });
  EXPECT_LT(rel_error(o, ref.o), 1e-5);
  EXPECT_LT(rel_error(dq, ref.dq), 1e-5);
  EXPECT_LT(rel_error(dk, ref.dk), 1e-5);
  EXPECT_LT(rel_error(dv, ref.dv), 1e-5);
  EXPECT_LT(rel_error(dg, ref.dg), 1e-4);
}

TEST(PartPair, BalancedRankOfOneRowRunsEachPassOnce) {
  if (!PartPair::enabled()) GTEST_SKIP() << "LASP2_PAIR_PARTS=0";
  std::vector<std::vector<RecordingBackend::Call>> calls;
  run_balanced(1, &calls);
  for (int rank = 0; rank < 2; ++rank) {
    // summary, output; entering-state gradient, dq, dk/dv: one call each, on the two-row problem
    ASSERT_EQ(calls[rank].size(), 5u) << "rank " << rank;
    for (const auto& c : calls[rank]) {
      EXPECT_EQ(c.batch, 2) << c.what << ", rank " << rank;
      EXPECT_EQ(c.seqlen, 6) << c.what << ", rank " << rank;
    }
  }
}

TEST(PartPair, BalancedRankOfTwoRowsRunsEachPartAlone) {
  std::vector<std::vector<RecordingBackend::Call>> calls;
  run_balanced(2, &calls);
  for (int rank = 0; rank < 2; ++rank) {
    ASSERT_EQ(calls[rank].size(), 10u) << "rank " << rank;
    for (const auto& c : calls[rank]) EXPECT_EQ(c.seqlen, 12) << c.what << ", rank " << rank;
  }
}

}  // namespace
}  // namespace lasp2::testing
