// The passes of the scalar family's CUDA backend that walk segment states (the state passes
// part_state / part_dstate and the passes chunk_forward, chunk_backward_dq and
// chunk_backward_dkdv over a case's part), for the tests that run them all under two settings
// of a knob and require the same bits (test_cuda_state_pass.cpp, test_cuda_state_stages.cpp):
// one run into poisoned buffers and the comparison of two runs' bits (the case's knobs and
// whole-sequence cases: cuda_op_case.h).
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"

namespace lasp2::testing {

// What the walking passes wrote, as bits (tensors: their bytes, padding included).
struct WalkBits {
  std::vector<uint32_t> st, L, dst, qdq, dg;
  std::vector<unsigned char> o, dq, dk, dv;
};

// The outputs of the walking passes on the device (poisoned before the passes run).
struct WalkOutputs {
  DevBuf<float> st, L, dst;
  DevTensor o, dq, dk, dv;
  DevBuf<float> qdq, dg;

  WalkBits bits() const {
    return {float_bits(st.download()),  float_bits(L.download()), float_bits(dst.download()),
            float_bits(qdq.download()), float_bits(dg.download()), o.buf.download(),
            dq.buf.download(),          dk.buf.download(),        dv.buf.download()};
  }
};

// The walking passes of `gpu` over the case's part of `dp`, from the entry states S0 (forward,
// dq) and D0 (dk, dv) and dg's per-(b, h) offsets dgoff (device pointers).
inline WalkOutputs run_walking_passes(const KernelBackend& gpu, const OpCase& c, const DeviceProblem& dp,
                                      const float* S0, const float* D0, const float* dgoff) {
  const AttentionParams& p = dp.p;
  const TokenRange part{c.begin, c.end};
  const int64_t bh = p.bh(), se = p.state_elems(), scalars = c.B * c.T * c.H;
  WalkOutputs r{DevBuf<float>(bh * se), DevBuf<float>(bh), DevBuf<float>(bh * se), dp.like_v(), dp.like_k(),
                dp.like_k(), dp.like_v(), DevBuf<float>(scalars), DevBuf<float>(scalars)};
  for (DevBuf<float>* b : {&r.st, &r.L, &r.dst, &r.qdq, &r.dg}) b->poison();
  gpu.part_state(p, part, r.st.p, r.L.p, nullptr);
  gpu.part_dstate(p, part, dp.dout.cview(), r.dst.p, nullptr);
  gpu.chunk_forward(p, part, S0, r.o.mview(), nullptr);
  gpu.chunk_backward_dq(p, part, dp.dout.cview(), S0, r.dq.mview(), r.qdq.p, nullptr);
  gpu.chunk_backward_dkdv(p, part, dp.dout.cview(), D0, r.dk.mview(), r.dv.mview(), r.qdq.p, dgoff, r.dg.p,
                          nullptr);
  return r;
}

inline void expect_same_walk_bits(const WalkBits& got, const WalkBits& want) {
  EXPECT_EQ(got.st, want.st) << "part_state differs";
  EXPECT_EQ(got.L, want.L) << "part_state's log decay differs";
  EXPECT_EQ(got.dst, want.dst) << "part_dstate differs";
  EXPECT_EQ(got.o, want.o) << "o differs";
  EXPECT_EQ(got.dq, want.dq) << "dq differs";
  EXPECT_EQ(got.qdq, want.qdq) << "q.dq differs";
  EXPECT_EQ(got.dk, want.dk) << "dk differs";
  EXPECT_EQ(got.dv, want.dv) << "dv differs";
  EXPECT_EQ(got.dg, want.dg) << "dg differs";
}

}  // namespace lasp2::testing
