// One case of the scalar family's CUDA kernel tests (test_cuda_kernels.cpp and the
// test_cuda_*_pass.cpp files): an OpCase (sizes, dtype, decay, documents, layout, the knobs
// it sets), its problem rounded to the device dtype, and the checks of the kernels' outputs
// against the CPU backend's float64 ones (within the tolerance inside the part, nothing
// written outside it). The tolerances: test_cuda_kernels.cpp.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "../problem.h"

namespace lasp2::testing {

struct OpCase {
  std::string name;
  ScalarType dtype = ScalarType::kBFloat16;
  DecayMode mode = DecayMode::kGate;
  int64_t dk = 64, dv = 64, T = 1000, begin = 37, end = 1000;
  std::vector<int64_t> docs;
  Layout layout;
  int seg_chunks = 2;  // 0: the backend's own choice
  int state_sub_chunks = -1;  // LASP2_CUDA_STATE_SUB_CHUNKS (split state walks); -1: unset
  int state_floor = -1;       // LASP2_CUDA_STATE_FLOOR (where state walks may end); -1: unset
  bool force_generic = false;
  int64_t B = 2, H = 2;
};

// The knobs an OpCase sets for its scope (unset where the case leaves them to the
// backend, so a knob set outside the test does not leak into a case that does not name it).
struct CaseKnobs {
  explicit CaseKnobs(const OpCase& c)
      : seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : ""),
        sub("LASP2_CUDA_STATE_SUB_CHUNKS", c.state_sub_chunks >= 0 ? std::to_string(c.state_sub_chunks) : ""),
        floor("LASP2_CUDA_STATE_FLOOR", c.state_floor >= 0 ? std::to_string(c.state_floor) : ""),
        generic("LASP2_CUDA_FORCE_GENERIC", c.force_generic ? "1" : "") {}
  EnvGuard seg, sub, floor, generic;
};

// LASP2_TEST_CASES=<substring>: run only the cases whose names contain it (short sanitizer
// runs of the long case lists); unset, every case runs.
inline bool selected_by_env(const OpCase& c) {
  const char* only = std::getenv("LASP2_TEST_CASES");
  return only == nullptr || c.name.find(only) != std::string::npos;
}

inline std::vector<double> random_vec(size_t n, uint32_t seed, double sd = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, sd);
  std::vector<double> v(n);
  for (auto& x : v) x = static_cast<double>(static_cast<float>(normal(rng)));
  return v;
}

// Problem rounded to the device precision; decay values rounded to float32.
inline Problem<double> make_problem(const OpCase& c, uint32_t seed) {
  ProblemSpec s;
  s.batch = c.B;
  s.seqlen = c.T;
  s.heads = c.H;
  s.dim_k = c.dk;
  s.dim_v = c.dv;
  s.mode = c.mode;
  s.chunk_size = 48;  // the CPU's chunking need not match the GPU's 64
  s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.dk)));
  s.doc_starts = c.docs;
  Problem<double> pr(s, seed);
  for (auto* v : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *v) x = round_to(c.dtype, x);
  for (auto& x : pr.gate) x = static_cast<double>(static_cast<float>(x));
  for (auto& x : pr.log_decay) x = static_cast<double>(static_cast<float>(x));
  return pr;
}

inline void report(const OpCase& c, const char* op, double err, double tol) {
  std::printf("[cuda-op] %-34s %-12s rel_err=%.3e tol=%.1e %s\n", c.name.c_str(), op, err, tol,
              err < tol ? "ok" : "FAIL");
}

inline void expect_rows(const OpCase& c, const char* op, const DevTensor& t, const std::vector<double>& want,
                        double tol) {
  const auto r = t.download();
  const Compare cmp = compare_rows(r.v, r.written, want, t.B, t.T, t.H, t.D, c.begin, c.end);
  report(c, op, cmp.rel, tol);
  EXPECT_EQ(cmp.missing, 0) << op << ": part elements not written or not finite";
  EXPECT_EQ(cmp.clobbered, 0) << op << ": elements outside the part were written";
  EXPECT_EQ(r.pad_clobbered, 0) << op << ": padding between heads was written";
  EXPECT_LT(cmp.rel, tol) << op;
}

// [B, T, H] scalars (q.dq, dg): inside the part against the reference, outside untouched.
inline void expect_scalars(const OpCase& c, const char* op, const DevBuf<float>& d,
                           const std::vector<double>& want, double tol) {
  std::vector<float> got = d.download();
  std::vector<float> in_got;
  std::vector<double> in_want;
  int64_t clobbered = 0;
  for (int64_t b = 0; b < c.B; ++b)
    for (int64_t t = 0; t < c.T; ++t)
      for (int64_t h = 0; h < c.H; ++h) {
        const int64_t i = (b * c.T + t) * c.H + h;
        if (t >= c.begin && t < c.end) {
          in_got.push_back(got[i]);
          in_want.push_back(want[i]);
        } else if (!std::isnan(got[i])) {
          ++clobbered;
        }
      }
  int64_t bad = 0;
  const double err = rel_err_f32(in_got, in_want, &bad);
  report(c, op, err, tol);
  EXPECT_EQ(bad, 0) << op << ": not written / not finite";
  EXPECT_EQ(clobbered, 0) << op << ": written outside the part";
  EXPECT_LT(err, tol) << op;
}

inline void expect_state(const OpCase& c, const char* op, const DevBuf<float>& d, const std::vector<float>& want,
                         double tol) {
  int64_t bad = 0;
  const double err = rel_err_f32(d.download(), want, &bad);
  report(c, op, err, tol);
  EXPECT_EQ(bad, 0) << op;
  EXPECT_LT(err, tol) << op;
}

inline void PrintTo(const OpCase& c, std::ostream* os) { *os << c.name; }

// The bits of x (== calls NaN words unequal; poisoned buffers are NaN).
inline std::vector<uint32_t> float_bits(const std::vector<float>& x) {
  std::vector<uint32_t> bits(x.size());
  if (!x.empty()) std::memcpy(bits.data(), x.data(), x.size() * sizeof(float));
  return bits;
}

// The walking passes' edge cases (dk/dv rows of 32, the output / dq score split): part
// [37, 1000) of the default problem, so the last chunk is partial, with 2-chunk segments
// and documents (none with a fixed decay).
inline OpCase walking_edge_case(const char* name, ScalarType t, DecayMode m, int64_t dk, int64_t dv) {
  OpCase c;
  c.name = name;
  c.dtype = t;
  c.mode = m;
  c.dk = dk;
  c.dv = dv;
  c.docs = m == DecayMode::kFixed ? std::vector<int64_t>{} : std::vector<int64_t>{101, 293, 294, 600, 999};
  return c;
}
// The same over a whole T = 4109 with three documents and the backend's own segments.
inline OpCase with_auto_segments(OpCase c) {
  c.T = 4109;
  c.begin = 0;
  c.end = 4109;
  c.docs = {64, 1000, 4096};
  c.seg_chunks = 0;
  return c;
}
// Case c on a [T, B, H, D] view with padded heads (the stores' row stride is not H * D),
// in 3-chunk segments.
inline OpCase as_padded_tbhd(OpCase c) {
  c.layout = {true, 8};
  c.seg_chunks = 3;
  return c;
}

// A case over the whole sequence [0, T) with segments of `seg_chunks` chunks (0: the
// backend's own), bf16 and without documents.
inline OpCase whole_sequence_case(const char* name, DecayMode m, int64_t dk, int64_t dv, int64_t T,
                                  int seg_chunks) {
  OpCase c;
  c.name = name;
  c.mode = m;
  c.dk = dk;
  c.dv = dv;
  c.T = c.end = T;
  c.begin = 0;
  c.seg_chunks = seg_chunks;
  return c;
}

}  // namespace lasp2::testing
