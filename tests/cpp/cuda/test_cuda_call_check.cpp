// "NaN at the call" on the CUDA backend (lasp2/call_check.h): the words a call's
// cross-rank check arms live on the device; LASP-2 carries them in its forward AllGather,
// LASP-1 in one AllGather of its own beside the ring, and the poison kernel
// (csrc/core/cuda/call_check_kernels.cu) compares every rank's words on the device.
// P threads share one GPU (DeviceThreadCommunicator). Ranks whose digests differ, or a
// rank whose maximum word is positive (a positive gate), get NaN in every element of the
// output and the final state on EVERY rank; agreeing ranks get the unarmed call's bytes.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <functional>

#include "../armed_words.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/call_check.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "lasp2/scalar_decay.h"
#include "../local_slice.h"

namespace lasp2::testing {
namespace {

struct Armed {
  std::vector<int64_t> words;  // {}: nothing armed
  uint32_t max_mask = 0b10;    // word 1 holds a maximum
};

struct Result {
  std::vector<unsigned char> o;  // the output's bytes
  std::vector<double> o_values;  // decoded (NaN where never written or NaN)
  std::vector<char> o_written;   // per element: written by the call
  std::vector<float> final_state;
  int collectives = 0;
  bool left_armed = true;
};

// One rank's forward (LASP-2 or LASP-1) with final states on the GPU.
Result forward_on_device(bool lasp1, const Problem<double>& pr, ScalarType t, const PartLayout& layout,
                         DeviceThreadCommunicator& comm, const Armed& armed) {
  DeviceRank rank(pr, t, layout);
  const ScalarDecay family(cuda_backend(), rank.p, rank.o.mview());
  const SummaryShape sh = family.shape();
  DevBuf<float> final_state(sh.state_floats);
  // zeros, not the 0xFF poison: an unwritten final state must not pass for NaN
  cuda_ok(cudaMemset(final_state.p, 0, sh.state_floats * sizeof(float)), "cudaMemset");
  SequenceStates seq;
  seq.final_state = final_state.p;
  DevBuf<int64_t> words(armed.words.size());
  if (!armed.words.empty()) words.upload(armed.words);
  cudaStream_t stream;
  cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
  cuda_ok(cudaDeviceSynchronize(), "uploads");  // they ran on the legacy stream
  if (!armed.words.empty()) arm_words(words.p, armed.words.size(), armed.max_mask, Device::kCUDA);
  if (lasp1) {
    DevBuf<float> entering(Lasp1Saved::entering_state_floats(sh, layout.parts_per_rank));
    DevBuf<float> records(Lasp1Saved::local_record_floats(sh, layout.parts_per_rank));
    DevBuf<double> ws((lasp1_forward_workspace_bytes(family, layout, seq) + 7) / 8);
    lasp1_forward(family, &comm, layout, Lasp1Saved{entering.p, records.p, nullptr}, seq, ws.p, stream);
    cuda_ok(cudaStreamSynchronize(stream), "LASP-1 forward");
  } else {
    DevBuf<float> head_maps(1);
    DevBuf<double> ws((lasp2_forward_workspace_bytes(family, layout, seq) + 7) / 8);
    lasp2_forward(family, &comm, layout, Lasp2Saved{rank.records.p, rank.prefixes.p, rank.decays.p, head_maps.p},
                  seq, ws.p, Lasp2Options{}, stream);
    cuda_ok(cudaStreamSynchronize(stream), "LASP-2 forward");
  }
  cuda_ok(cudaStreamDestroy(stream), "cudaStreamDestroy");
  Result r;
  r.o = rank.o.buf.download();
  const auto back = rank.o.download();
  r.o_values = back.v;
  r.o_written = back.written;
  r.final_state = final_state.download();
  r.collectives = comm.collectives();
  r.left_armed = take_call_check().armed();
  return r;
}

bool all_nan(const Result& r) {
  for (size_t i = 0; i < r.o_values.size(); ++i)
    if (!r.o_written[i] || !std::isnan(r.o_values[i])) return false;
  for (float x : r.final_state)
    if (!std::isnan(x)) return false;
  return !r.o_values.empty() && !r.final_state.empty();
}

bool all_finite(const Result& r) {
  for (size_t i = 0; i < r.o_values.size(); ++i)
    if (!r.o_written[i] || !std::isfinite(r.o_values[i])) return false;
  for (float x : r.final_state)
    if (!std::isfinite(x)) return false;
  return true;
}

struct Case {
  bool lasp1;
  int world;
  bool balanced;
  ScalarType dtype;
};

std::string case_name(const Case& c) {
  return std::string(c.lasp1 ? "Lasp1_P" : "Lasp2_P") + std::to_string(c.world) +
         (c.balanced ? "_balanced_" : "_contiguous_") + dtype_name(c.dtype);
}

void PrintTo(const Case& c, std::ostream* os) { *os << case_name(c); }

class CudaCallCheck : public ::testing::TestWithParam<Case> {};

TEST_P(CudaCallCheck, EveryRankGetsNaNAtTheCallOrTheUnarmedBytes) {
  LASP2_SKIP_WITHOUT_CUDA();
  const Case c = GetParam();
  const Problem<double> global(sp_spec(c.world), 21);
  const int64_t digest = 0x5DEECE66Dll, neg = bits_of(-0.5);
  // name -> what rank r arms
  const auto plain = [](int) { return Armed{}; };
  const auto agree = [&](int r) { return Armed{{digest, bits_of(-0.5 - r), 0, 0}}; };  // maxima differ, none > 0
  const auto differ = [&](int r) { return Armed{{r == c.world - 1 ? digest + 1 : digest, neg, 0, 0}}; };
  const auto positive = [&](int r) { return Armed{{digest, r == 0 ? bits_of(0.125) : neg, 0, 0}}; };
  std::vector<std::vector<Result>> runs;
  for (const auto& arm : {std::function<Armed(int)>(plain), std::function<Armed(int)>(agree),
                          std::function<Armed(int)>(differ), std::function<Armed(int)>(positive)}) {
    std::vector<Result> out(c.world);
    run_device_ranks(c.world, [&](int rank, DeviceThreadCommunicator& comm) {
      const PartLayout layout =
          c.balanced ? PartLayout::balanced(c.world, rank) : PartLayout::contiguous(c.world, rank);
      out[rank] = forward_on_device(c.lasp1, local_problem(global, layout), c.dtype, layout, comm, arm(rank));
    });
    runs.push_back(std::move(out));
  }
  for (int r = 0; r < c.world; ++r) {
    SCOPED_TRACE("rank " + std::to_string(r));
    const Result &unarmed = runs[0][r], &agreeing = runs[1][r];
    EXPECT_TRUE(all_finite(unarmed));
    EXPECT_EQ(agreeing.o, unarmed.o) << "agreeing words changed the output's bytes";
    EXPECT_EQ(std::memcmp(agreeing.final_state.data(), unarmed.final_state.data(), unarmed.final_state.size() * 4), 0)
        << "agreeing words changed the final state's bytes";
    EXPECT_TRUE(all_nan(runs[2][r])) << "differing digests: NaN in every output and final state";
    EXPECT_TRUE(all_nan(runs[3][r])) << "a positive maximum on rank 0: NaN in every output and final state";
    EXPECT_EQ(unarmed.collectives, 1);  // LASP-2's AllGather; LASP-1's of the final states
    for (int i = 1; i < 4; ++i) {
      EXPECT_EQ(runs[i][r].collectives, c.lasp1 ? 2 : 1);
      EXPECT_FALSE(runs[i][r].left_armed);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaCallCheck,
                         ::testing::Values(Case{false, 2, false, ScalarType::kBFloat16},
                                           Case{false, 3, true, ScalarType::kFloat32},
                                           Case{true, 2, true, ScalarType::kBFloat16},
                                           Case{true, 3, false, ScalarType::kFloat32}),
                         [](const ::testing::TestParamInfo<Case>& i) { return case_name(i.param); });

}  // namespace
}  // namespace lasp2::testing
