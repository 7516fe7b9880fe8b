// Helpers of the GDN / KDA CUDA backend tests (test_delta_*.cpp): small delta-rule
// problems prepared for the kernels (inputs rounded to the element type, k scaled, -inf
// log gates), random entering states and leaving-state gradients, a backward call's
// output buffers and its results read back, and the comparisons several files share.
// In a namespace of their own (the tests' files open it too): device_rank.h's Grads is
// another struct of that name, and max_abs_diff here hides problem.h's template.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <random>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/delta_backend.h"

namespace lasp2::testing::delta_cuda {

using delta::DeltaKernelBackend;
using delta::DeltaParams;
using delta::DocStates;
using delta::GateKind;
using delta::testing::DeltaProblem;
using delta::testing::DeltaSpec;

// Rounds q, k, v, dO to the element type (so that both backends see the same
// inputs) and scales k to unit-ish norm, as GDN layers l2-normalize k.
inline void prepare_inputs(DeltaProblem<float>& pr, ScalarType type) {
  const double kscale = 2.0 / std::sqrt(static_cast<double>(pr.spec.dim_k));
  for (auto& x : pr.k) x = static_cast<float>(x * kscale);
  for (auto* vec : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *vec) x = static_cast<float>(round_to(type, x));
}

// GDN with d_k = d_v = d, two heads and 64-token chunks: what the chunked kernels take.
inline DeltaSpec gdn_spec(int d, int64_t seqlen, int64_t batch) {
  DeltaSpec spec;
  spec.seqlen = seqlen;
  spec.heads = 2;
  spec.batch = batch;
  spec.dim_k = spec.dim_v = d;
  spec.chunk_size = 64;
  spec.scale = 1.0 / std::sqrt(static_cast<double>(d));
  return spec;
}

// max |a - b| / max |b| over tokens [part.begin, part.end) of every batch row of
// [batch][seqlen][row] tensors (row values a token), every value there finite; `what`
// names the tensor in a failure. The chunked-vs-recurrent comparisons (DeltaCudaChunked,
// DeltaCudaDocStates forward and backward) share it.
inline double rel_in_part(const std::vector<double>& a, const std::vector<double>& b, TokenRange part, int64_t batch,
                          int64_t seqlen, int64_t row, const char* what) {
  double num = 0, den = 0;
  int64_t bad = 0;
  for (int64_t bi = 0; bi < batch; ++bi)
    for (int64_t i = (bi * seqlen + part.begin) * row; i < (bi * seqlen + part.end) * row; ++i) {
      if (!std::isfinite(a[i]) || !std::isfinite(b[i])) {
        ++bad;
        continue;
      }
      num = std::max(num, std::abs(a[i] - b[i]));
      den = std::max(den, std::abs(b[i]));
    }
  EXPECT_EQ(bad, 0) << what << ": not finite inside the part";
  return den > 0 ? num / den : num;
}

// -inf log gates (the state forgotten) at `tokens` of every row and head.
inline void forget_at(DeltaProblem<float>& pr, std::initializer_list<int64_t> tokens) {
  const DeltaSpec& spec = pr.spec;
  for (int64_t b = 0; b < spec.batch; ++b)
    for (int64_t t : tokens)
      for (int64_t h = 0; h < spec.heads; ++h) pr.g[(b * spec.seqlen + t) * spec.heads + h] = -INFINITY;
}

inline std::vector<float> zeros(size_t n) { return std::vector<float>(n, 0.f); }

inline DevBuf<float> zeroed(size_t n) {
  DevBuf<float> d(std::max<size_t>(n, 1));
  cuda_ok(cudaMemset(d.p, 0, d.n * sizeof(float)), "memset");
  return d;
}

// Random entering states and leaving-state gradients (normal, sd 0.3), `floats` each,
// on the host and on the device.
struct EdgeStates {
  std::vector<float> entering, leaving;
  DevBuf<float> d_entering, d_leaving;
};
inline EdgeStates random_edge_states(uint32_t seed, int64_t floats) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 0.3f);
  std::vector<float> entering(floats), leaving(floats);
  for (auto& x : entering) x = normal(rng);
  for (auto& x : leaving) x = normal(rng);
  DevBuf<float> d_entering = to_device_f32(entering), d_leaving = to_device_f32(leaving);
  return {std::move(entering), std::move(leaving), std::move(d_entering), std::move(d_leaving)};
}

// The CPU backend's backward of pr's problem over `part` from the entering state and the
// leaving-state gradient given (the reference of the backward tests; dq, dk, dv, dg, dbeta
// zero outside the part); with_docs also with the documents' initial states and end-state
// gradients in and their initial-state gradients out (dI).
struct CpuGrads {
  std::vector<float> dq, dk, dv, dg, db, dI, dE;
};
inline CpuGrads cpu_backward(const DeltaProblem<float>& pr, TokenRange part, const float* entering,
                             const float* leaving, bool with_docs) {
  const DeltaSpec& spec = pr.spec;
  const DeltaParams hp = pr.params();
  CpuGrads r;
  r.dq.assign(pr.q.size(), 0.f);
  r.dk.assign(pr.k.size(), 0.f);
  r.dv.assign(pr.v.size(), 0.f);
  r.dg.assign(pr.g.size(), 0.f);
  r.db.assign(pr.beta.size(), 0.f);
  r.dE.resize(hp.bh() * hp.state_elems());
  DocStates doc;
  if (with_docs) {
    r.dI = zeros(spec.num_docs() * spec.heads * hp.state_elems());
    doc.initial = pr.initial.data();
    doc.final_dstate = pr.final_dstate.data();
    doc.d_initial = r.dI.data();
  }
  delta::delta_cpu_backend().backward(hp, part, pr.dout_view(), entering, leaving, doc,
                                      {r.dq.data(), pr.strides(spec.dim_k)}, {r.dk.data(), pr.strides(spec.dim_k)},
                                      {r.dv.data(), pr.strides(spec.dim_v)}, r.dg.data(), r.db.data(), r.dE.data(),
                                      nullptr);
  return r;
}

// A backward call's results read back: dq, dk, dv (NaN where not written), dg, dbeta,
// the entering-state gradient, and entering_dstate's (dE_head).
struct Grads {
  std::vector<double> dq, dk, dv;
  std::vector<float> dg, db, dE, dE_head;
};

// The outputs of a backward call on pr's problem: dq, dk, dv in `type` (poisoned), dg
// and dbeta zeroed, and the entering-state gradient (`state_floats`).
struct BackwardBuffers {
  DevTensor dq, dk, dv;
  DevBuf<float> dg, db, dE;
  BackwardBuffers(const DeltaProblem<float>& pr, ScalarType type, Layout lay, int64_t state_floats)
      : dq(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        dk(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        dv(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, type, lay),
        dg(zeroed(pr.g.size())),
        db(zeroed(pr.beta.size())),
        dE(state_floats) {}
  // All of Grads but dE_head.
  void download(Grads& r) const {
    r.dq = dq.download().v;
    r.dk = dk.download().v;
    r.dv = dv.download().v;
    r.dg = dg.download();
    r.db = db.download();
    r.dE = dE.download();
  }
};

// The largest |a - b| over words written in both runs; a word written in one run only
// (NaN in the other, the buffers start as NaN) counts as infinitely far.
inline double max_abs_diff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (std::isnan(a[i]) != std::isnan(b[i])) return INFINITY;  // written in one run only
    if (!std::isnan(a[i])) m = std::max(m, std::abs(a[i] - b[i]));
  }
  return m;
}

// The words of two equally long arrays whose bits differ.
template <typename V>
int64_t bits_differ(const std::vector<V>& x, const std::vector<V>& y) {
  EXPECT_EQ(x.size(), y.size());
  int64_t n = 0;
  for (size_t e = 0; e < std::min(x.size(), y.size()); ++e) n += std::memcmp(&x[e], &y[e], sizeof(V)) != 0;
  return n;
}

// Whether the device's shared memory takes the chunked backward of the gate kind at d.
inline bool chunk_backward_fits_device(GateKind gate, int d) {
  int dev = 0, optin = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_ok(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev), "smem");
  return optin >= (gate == GateKind::kPerKey ? delta::gpu::kda_backward_smem_bytes(d)
                                             : delta::gpu::chunk_backward_smem_bytes(d));
}

}  // namespace lasp2::testing::delta_cuda
