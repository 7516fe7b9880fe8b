// Random linear attention problems held in host vectors, plus the views that the
// core takes. Shared by the core tests.
#pragma once

#include <cmath>
#include <random>
#include <vector>

#include "lasp2/params.h"

namespace lasp2::testing {

// A decay mode as the parameterized tests name their cases.
inline const char* decay_mode_name(DecayMode m) {
  return m == DecayMode::kNone ? "none" : m == DecayMode::kFixed ? "fixed" : "gate";
}

struct ProblemSpec {
  int64_t batch = 2, seqlen = 37, heads = 3, dim_k = 8, dim_v = 5;
  DecayMode mode = DecayMode::kGate;
  int chunk_size = 8;
  float scale = 0.7f;
  std::vector<int64_t> doc_starts;  // token indices (all batches) that begin a document
};

template <typename T>
struct Problem {
  ProblemSpec spec;
  std::vector<T> q, k, v, dout;
  std::vector<T> gate, log_decay;  // decay values share the inputs' precision here
  std::vector<uint8_t> doc_start;

  explicit Problem(const ProblemSpec& s, uint32_t seed = 1234) : spec(s) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> uniform(-0.6, -0.01);
    auto fill = [&](std::vector<T>& x, int64_t d) {
      x.resize(s.batch * s.seqlen * s.heads * d);
      for (auto& e : x) e = static_cast<T>(0.5 * normal(rng));
    };
    fill(q, s.dim_k);
    fill(k, s.dim_k);
    fill(v, s.dim_v);
    fill(dout, s.dim_v);
    gate.resize(s.batch * s.seqlen * s.heads);
    for (auto& e : gate) e = static_cast<T>(uniform(rng));
    log_decay.resize(s.heads);
    for (int64_t h = 0; h < s.heads; ++h) log_decay[h] = static_cast<T>(-0.03 * (h + 1));
    doc_start.assign(s.seqlen, 0);
    for (int64_t t : s.doc_starts) doc_start[t] = 1;
  }

  BTHStrides strides(int64_t d) const {
    return {spec.seqlen * spec.heads * d, spec.heads * d, d};
  }

  AttentionParams params() const {
    AttentionParams p;
    p.batch = spec.batch;
    p.seqlen = spec.seqlen;
    p.heads = spec.heads;
    p.dim_k = spec.dim_k;
    p.dim_v = spec.dim_v;
    p.dtype = std::is_same<T, double>::value ? ScalarType::kFloat64 : ScalarType::kFloat32;
    p.decay.dtype = p.dtype;
    p.q = {q.data(), strides(spec.dim_k)};
    p.k = {k.data(), strides(spec.dim_k)};
    p.v = {v.data(), strides(spec.dim_v)};
    p.decay.mode = spec.mode;
    p.decay.gate = gate.data();
    p.decay.gate_stride = {spec.seqlen * spec.heads, spec.heads, 1};
    p.decay.log_decay = log_decay.data();
    p.scale = spec.scale;
    if (!spec.doc_starts.empty()) {
      p.doc_start = doc_start.data();
      p.doc_start_batch_stride = 0;
    }
    p.chunk_size = spec.chunk_size;
    return p;
  }
  ConstView dout_view() const { return {dout.data(), strides(spec.dim_v)}; }
  std::vector<T> zeros_like_v() const { return std::vector<T>(v.size(), T(0)); }
  std::vector<T> zeros_like_k() const { return std::vector<T>(k.size(), T(0)); }
};

// Scratch memory for the core, 8-byte aligned.
struct Workspace {
  std::vector<double> storage;
  explicit Workspace(int64_t bytes) : storage((bytes + 7) / 8) {}
  void* data() { return storage.empty() ? nullptr : storage.data(); }
};

template <typename A, typename B>
double max_abs_diff(const std::vector<A>& a, const std::vector<B>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i)
    m = std::max(m, std::abs(static_cast<double>(a[i]) - static_cast<double>(b[i])));
  return m;
}

template <typename A>
double max_abs(const std::vector<A>& a) {
  double m = 0;
  for (auto x : a) m = std::max(m, std::abs(static_cast<double>(x)));
  return m;
}

// Error relative to the largest reference entry (max norm); references that are
// (almost) zero everywhere, like dg of a one-token sequence, compare absolutely.
template <typename A, typename B>
double rel_error(const std::vector<A>& got, const std::vector<B>& want) {
  return max_abs_diff(got, want) / std::max(1e-3, max_abs(want));
}

}  // namespace lasp2::testing
