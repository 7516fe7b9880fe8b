// Everything the scalar family's CUDA backend computes for one OpCase, as bits, for the
// tests of knobs that must change no bit (test_cuda_state_stages.cpp: the state walk's
// copy ring): the state passes and the walking passes that read segment states over the
// case's part (from a given entering state), the forward's kept states, then
// lasp2_forward + lasp2_backward of the whole problem on one rank (which keeps states and
// reads them back), with its kept states. The caller sets the knobs around run_pass_bits.
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/lasp2.h"
#include "walking_passes.h"
#include "../problem.h"

namespace lasp2::testing {

struct PassBits {
  WalkBits walk;                     // the state and walking passes (walking_passes.h)
  std::vector<uint32_t> saved;       // chunk_forward_kept's states
  Grads e2e;
  std::vector<uint32_t> e2e_states;  // lasp2_forward's kept segment states
};

// S0: the state entering the part ([bh][dk * dv]), for chunk_forward and chunk_backward_dq.
inline PassBits run_pass_bits(const OpCase& c, const Problem<double>& pr, const std::vector<float>& S0) {
  DeviceProblem dp(pr, c.dtype, c.layout);
  const AttentionParams& pg = dp.p;
  const TokenRange part{c.begin, c.end};
  const int64_t bh = pg.bh(), se = pg.state_elems();
  DevBuf<float> init = to_device_f32(S0), D0 = to_device_f32(std::vector<float>(bh * se, -0.5f)),
                dgoff = to_device_f32(std::vector<float>(bh, 1.f));
  const KernelBackend& gpu = cuda_backend();
  const int64_t nsaved = gpu.saved_states_floats(pg, part);
  DevBuf<float> saved(std::max<int64_t>(1, nsaved));
  DevTensor o2 = dp.like_v();
  saved.poison();
  const WalkOutputs walk = run_walking_passes(gpu, c, dp, init.p, D0.p, dgoff.p);
  // the states a forward keeps (every slot written, the last segment's entering state too);
  // its o is o's
  if (nsaved > 0) gpu.chunk_forward_kept(pg, part, init.p, o2.mview(), saved.p, nullptr, nullptr);
  PassBits r;
  r.walk = walk.bits();
  if (nsaved > 0) {
    r.saved = float_bits(saved.download());
    EXPECT_EQ(o2.buf.download(), walk.o.buf.download()) << "chunk_forward_kept's o differs from chunk_forward's";
  }
  const PartLayout layout = PartLayout::contiguous(1, 0);
  DeviceRank rank(pr, c.dtype, layout);
  rank.states.poison();
  cuda_ok(cudaDeviceSynchronize(), "poison");
  rank.enqueue(gpu, nullptr, layout, true, nullptr);
  cuda_ok(cudaStreamSynchronize(nullptr), "lasp2 forward + backward");
  r.e2e = rank.grads();
  r.e2e_states = float_bits(rank.states.download());
  return r;
}

inline void expect_same_pass_bits(const PassBits& got, const PassBits& want) {
  expect_same_walk_bits(got.walk, want.walk);
  EXPECT_EQ(got.saved, want.saved) << "chunk_forward_kept's kept states differ";
  EXPECT_EQ(got.e2e.o, want.e2e.o) << "lasp2_forward's o differs";
  EXPECT_EQ(got.e2e.dq, want.e2e.dq) << "lasp2_backward's dq differs";
  EXPECT_EQ(got.e2e.dk, want.e2e.dk) << "lasp2_backward's dk differs";
  EXPECT_EQ(got.e2e.dv, want.e2e.dv) << "lasp2_backward's dv differs";
  EXPECT_EQ(got.e2e.dg, want.e2e.dg) << "lasp2_backward's dg differs";
  EXPECT_EQ(got.e2e_states, want.e2e_states) << "lasp2_forward's kept states differ";
}

// The default's states against the float64 CPU backend, so that equal runs are right ones.
inline void expect_states_near_cpu(const OpCase& c, const Problem<double>& pr, const PassBits& r) {
  const AttentionParams pc = pr.params();
  const int64_t n = pc.bh() * pc.state_elems();
  std::vector<float> cpu_st(n), cpu_L(pc.bh()), cpu_dst(n);
  const TokenRange part{c.begin, c.end};
  cpu_backend().part_state(pc, part, cpu_st.data(), cpu_L.data(), nullptr);
  cpu_backend().part_dstate(pc, part, pr.dout_view(), cpu_dst.data(), nullptr);
  auto floats = [](const std::vector<uint32_t>& bits) {
    std::vector<float> f(bits.size());
    std::memcpy(f.data(), bits.data(), bits.size() * sizeof(float));
    return f;
  };
  const double tol = tol_of(c.dtype);
  EXPECT_LT(rel_err_f32(floats(r.walk.st), cpu_st), tol) << "part_state against the CPU";
  EXPECT_LT(rel_err_f32(floats(r.walk.dst), cpu_dst), tol) << "part_dstate against the CPU";
}

}  // namespace lasp2::testing
