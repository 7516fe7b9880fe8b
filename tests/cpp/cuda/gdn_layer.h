// One GDN layer with [1, T, H, D] 16-bit inputs on the device, for the tests that launch
// the chunked kernels directly (test_delta_prep.cpp, test_delta_state_passes.cpp) and the
// timings (test_delta_timing.cpp): random inputs set up fast at 64K tokens, the backend's
// parameters of the layer and the kernels' problem of it.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <random>
#include <vector>

#include "cuda_test_util.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_cuda_route.h"
#include "delta_test_util.h"

namespace lasp2::testing::delta_cuda {

// ---- the timing tests' GDN layer: [1, T, H, D] bf16 inputs on one device ----
// Normal random values in `tensors` (2-byte elements; k's scaled by 1/sqrt(D)) as a
// repeated 2^20-element pattern (fast to set up at 64K tokens).
inline void upload_pattern(std::mt19937& rng, std::initializer_list<DevTensor*> tensors, const DevTensor* k) {
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t pattern = size_t{1} << 20;
  for (DevTensor* t : tensors) {
    std::vector<unsigned char> host(pattern * 2);
    for (size_t i = 0; i < pattern; ++i)
      encode(t->type, normal(rng) * (t == k ? 1.0 / std::sqrt(double(t->D)) : 1.0), &host[2 * i]);
    for (size_t at = 0; at < t->elems; at += pattern)
      cuda_ok(cudaMemcpy(t->buf.p + 2 * at, host.data(), 2 * std::min(pattern, t->elems - at), cudaMemcpyHostToDevice),
              "upload");
  }
}

// Log gates in log [0.9, 1) and betas in [0.1, 0.9), `rows` (token, head) rows of each.
struct GatesBetas {
  DevBuf<float> g, beta;
};
inline GatesBetas random_gates(std::mt19937& rng, int64_t rows) {
  std::vector<float> gh(rows), bh(rows);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  for (auto& e : gh) e = std::log(0.9f + 0.1f * u(rng));
  for (auto& e : bh) e = 0.1f + 0.8f * u(rng);
  return {to_device_f32(gh), to_device_f32(bh)};
}

// The backend's parameters of the layer (gates and betas [1, T, H] contiguous).
inline DeltaParams gdn_params(const DevTensor& q, const DevTensor& k, const DevTensor& v, const GatesBetas& gb) {
  const int64_t T = q.T, H = q.H, D = q.D;
  DeltaParams p;
  p.batch = 1;
  p.seqlen = T;
  p.heads = H;
  p.dim_k = p.dim_v = D;
  p.dtype = q.type;
  p.q = q.cview();
  p.k = k.cview();
  p.v = v.cview();
  p.g = gb.g.p;
  p.g_stride = {T * H, H, 1};
  p.beta = gb.beta.p;
  p.beta_stride = {T * H, H, 1};
  p.scale = 1.0 / std::sqrt(double(D));
  return p;
}

// The kernels' problem of gdn_params' layer: all T tokens, one segment (the backend's own
// conversion, delta_cuda_route.h).
inline delta::gpu::Problem gdn_problem(const DeltaParams& p) {
  return delta::cuda_route::problem_of(p, TokenRange{0, p.seqlen}, nullptr);
}

}  // namespace lasp2::testing::delta_cuda
