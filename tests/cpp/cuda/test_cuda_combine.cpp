// The scalar family's CUDA combines (combine_prefix / combine_suffix over the parts'
// states, state_dot, copy, fill_zero) against the CPU backend; copy_rows of both families'
// CUDA backends against the rows themselves.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "delta_rule/delta_backend.h"
#include "lasp2/kernel_backend.h"

namespace lasp2::testing {
namespace {

// ---- combines ---------------------------------------------------------------------------
TEST(CudaCombine, MatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int parts = 19;  // folds of up to 18 parts: two whole batches of 8 loads and a partial one
  const int64_t bh = 3, elems = 300;
  std::vector<std::vector<float>> states(parts);
  std::vector<DevBuf<float>> dstates;
  for (int i = 0; i < parts; ++i) {
    auto v = random_vec(bh * elems, 100 + i);
    states[i].assign(v.begin(), v.end());
    dstates.push_back(to_device_f32(states[i]));
  }
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> u(-2.f, 0.f);
  std::vector<float> L(parts * bh);
  for (auto& x : L) x = u(rng);
  L[2 * bh + 1] = -INFINITY;  // parts that start a document
  L[12 * bh] = -INFINITY;
  DevBuf<float> Ld = to_device_f32(L);
  std::vector<const float*> hp, dp;
  for (int i = 0; i < parts; ++i) {
    hp.push_back(states[i].data());
    dp.push_back(dstates[i].p);
  }
  for (int target = 0; target < parts; ++target) {
    for (bool suffix : {false, true}) {
      std::vector<float> want(bh * elems);
      DevBuf<float> got(bh * elems);
      got.poison();
      if (suffix) {
        cpu_backend().combine_suffix(hp, L.data(), target, bh, elems, want.data(), nullptr);
        cuda_backend().combine_suffix(dp, Ld.p, target, bh, elems, got.p, nullptr);
      } else {
        cpu_backend().combine_prefix(hp, L.data(), target, bh, elems, want.data(), nullptr);
        cuda_backend().combine_prefix(dp, Ld.p, target, bh, elems, got.p, nullptr);
      }
      EXPECT_LT(rel_err_f32(got.download(), want), 1e-6) << "target " << target << " suffix " << suffix;
    }
  }
  std::vector<float> want(bh);
  DevBuf<float> got(bh);
  cpu_backend().state_dot(states[0].data(), states[1].data(), L.data(), states[2].data(), bh, elems,
                          want.data(), nullptr);
  cuda_backend().state_dot(dstates[0].p, dstates[1].p, Ld.p, dstates[2].p, bh, elems, got.p, nullptr);
  EXPECT_LT(rel_err_f32(got.download(), want), 1e-6);

  // copy / fill_zero
  DevBuf<float> a = to_device_f32(states[3]), b(bh * elems);
  cuda_backend().copy(b.p, a.p, bh * elems, nullptr);
  EXPECT_EQ(b.download(), states[3]);
  cuda_backend().fill_zero(b.p, bh * elems, nullptr);
  for (float x : b.download()) EXPECT_EQ(x, 0.f);
}

// copy_rows: null rows give zeros, more rows than one launch's table (kMaxParts = 256) go in
// several, a row longer than the grid's stride, and a row count that is not a multiple of 4.
TEST(CudaCombine, CopyRowsGathersEveryRow) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const int64_t count : {int64_t{37}, int64_t{70001}}) {
    const int rows = count < 100 ? 300 : 5;
    std::vector<std::vector<float>> host(rows);
    std::vector<DevBuf<float>> dev;
    std::vector<const float*> ptrs(rows, nullptr);
    std::vector<float> want(rows * count, 0.f);
    for (int r = 0; r < rows; ++r) {
      if (r % 3 == 1) continue;  // null: zeros
      const auto v = random_vec(count, 700 + r);
      host[r].assign(v.begin(), v.end());
      std::copy(host[r].begin(), host[r].end(), want.begin() + r * count);
      dev.push_back(to_device_f32(host[r]));
      ptrs[r] = dev.back().p;
    }
    DevBuf<float> out(rows * count + 1), out_delta(rows * count + 1);
    out.poison();
    out_delta.poison();
    cuda_backend().copy_rows(out.p, ptrs, count, nullptr);
    delta::delta_backend_for(Device::kCUDA).copy_rows(out_delta.p, ptrs, count, nullptr);
    for (const auto* got : {&out, &out_delta}) {
      const std::vector<float> g = got->download();
      EXPECT_EQ(std::vector<float>(g.begin(), g.begin() + rows * count), want) << "count " << count;
      EXPECT_TRUE(std::isnan(g.back())) << "count " << count << ": wrote past the last row";
    }
  }
}

TEST(CudaCombine, TooManyPartsIsAnError) {
  LASP2_SKIP_WITHOUT_CUDA();
  DevBuf<float> s(4), L(1000), out(4);
  std::vector<const float*> parts(300, s.p);
  EXPECT_THROW(cuda_backend().combine_prefix(parts, L.p, 1, 1, 4, out.p, nullptr), Error);
}

}  // namespace
}  // namespace lasp2::testing
