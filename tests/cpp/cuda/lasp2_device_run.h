// lasp2_forward + lasp2_backward of the scalar family on the CUDA backend, run the way its
// end-to-end tests run them (test_cuda_lasp2.cpp, test_cuda_pdl.cpp): a problem rounded to
// the device dtype; one rank eagerly, P ranks on threads sharing one GPU with the gradients
// gathered in the global layout, or one rank captured in a CUDA graph and replayed on new
// inputs; and the two checks of their results: against the float64 recurrence, and equal
// bits to another run.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <mutex>
#include <vector>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/lasp2.h"
#include "../local_slice.h"
#include "../recurrent_reference.h"

namespace lasp2::testing {

// The problem of `s` with its inputs rounded to `t` and its decay values to float32, so the
// device and the float64 reference compute on the same numbers.
inline Problem<double> rounded(const ProblemSpec& s, ScalarType t, uint32_t seed) {
  Problem<double> pr(s, seed);
  for (auto* v : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *v) x = round_to(t, x);
  for (auto& x : pr.gate) x = static_cast<double>(static_cast<float>(x));
  for (auto& x : pr.log_decay) x = static_cast<double>(static_cast<float>(x));
  return pr;
}

// Runs forward + backward of one rank's problem on the GPU (comm may be null).
inline Grads run_rank(const Problem<double>& pr, ScalarType dtype, const PartLayout& layout, Communicator* comm,
                      bool overlap, cudaStream_t stream, const KernelBackend& be = cuda_backend()) {
  DeviceRank r(pr, dtype, layout);
  r.enqueue(be, comm, layout, overlap, stream);
  cuda_ok(cudaStreamSynchronize(stream), "lasp2 on the device");
  return r.grads();
}

// One rank's outputs and gradients into the global ones at its layout's tokens.
inline void put_rank(Grads& out, const Grads& g, const PartLayout& layout, const ProblemSpec& s) {
  put_tokens(out.o, g.o, layout, s.batch, s.seqlen, s.heads, s.dim_v);
  put_tokens(out.dq, g.dq, layout, s.batch, s.seqlen, s.heads, s.dim_k);
  put_tokens(out.dk, g.dk, layout, s.batch, s.seqlen, s.heads, s.dim_k);
  put_tokens(out.dv, g.dv, layout, s.batch, s.seqlen, s.heads, s.dim_v);
  put_tokens(out.dg, g.dg, layout, s.batch, s.seqlen, s.heads, 1);
}

// Forward + backward of `global` on `world` ranks (balanced layout, overlapped forward; one
// device: the whole sequence), the gradients gathered in the global layout.
inline Grads run_world(const Problem<double>& global, ScalarType t, int world) {
  if (world == 1) return run_rank(global, t, PartLayout::contiguous(1, 0), nullptr, true, nullptr);
  const ProblemSpec& s = global.spec;
  Grads out{std::vector<double>(global.q.size() / s.dim_k * s.dim_v), std::vector<double>(global.q.size()),
            std::vector<double>(global.k.size()), std::vector<double>(global.v.size()),
            std::vector<double>(s.batch * s.seqlen * s.heads)};
  std::mutex mu;
  run_device_ranks(world, [&](int rank, DeviceThreadCommunicator& comm) {
    const PartLayout layout = PartLayout::balanced(world, rank);
    const auto local = local_problem(global, layout);
    cudaStream_t stream;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    const Grads g = run_rank(local, t, layout, &comm, true, stream);
    cudaStreamDestroy(stream);
    std::lock_guard<std::mutex> lock(mu);
    put_rank(out, g, layout, s);
  });
  return out;
}

// One rank's forward + backward captured in a CUDA graph on `stream` (nothing runs until
// replay): its buffers can take another problem's inputs and the graph be replayed on them.
class CapturedRank {
 public:
  CapturedRank(const Problem<double>& pr, ScalarType t, const PartLayout& layout, const KernelBackend& be,
               cudaStream_t stream)
      : rank_(pr, t, layout), stream_(stream) {
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    rank_.enqueue(be, nullptr, layout, true, stream);
    cuda_ok(cudaStreamEndCapture(stream, &graph_), "cudaStreamEndCapture");
    cuda_ok(cudaGraphInstantiate(&exec_, graph_, 0), "cudaGraphInstantiate");
  }
  CapturedRank(const CapturedRank&) = delete;
  CapturedRank& operator=(const CapturedRank&) = delete;
  ~CapturedRank() {
    cudaGraphExecDestroy(exec_);
    cudaGraphDestroy(graph_);
  }

  Grads replay() {
    cuda_ok(cudaGraphLaunch(exec_, stream_), "cudaGraphLaunch");
    cuda_ok(cudaStreamSynchronize(stream_), "replay");
    return rank_.grads();
  }

  // `pr`'s inputs (a problem of the captured one's sizes) into the captured buffers, and the
  // outputs poisoned, so a replay that wrote nothing (or read the old inputs) shows.
  void load(const Problem<double>& pr) {
    rank_.q.upload(pr.q);
    rank_.k.upload(pr.k);
    rank_.v.upload(pr.v);
    rank_.dout.upload(pr.dout);
    rank_.gate.upload(std::vector<float>(pr.gate.begin(), pr.gate.end()));
    rank_.log_decay.upload(std::vector<float>(pr.log_decay.begin(), pr.log_decay.end()));
    for (DevTensor* x : {&rank_.o, &rank_.dq, &rank_.dk, &rank_.dv}) x->buf.poison();
    rank_.dg.poison();
    cuda_ok(cudaDeviceSynchronize(), "uploads");
  }

 private:
  DeviceRank rank_;
  cudaStream_t stream_;
  cudaGraph_t graph_;
  cudaGraphExec_t exec_;
};

// max |got - want| / max |want|; infinite where the device wrote a NaN or infinity.
inline double rel_nan_aware(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::max(num, std::abs(got[i] - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / std::max(den, 1e-3);
}

// Every output and gradient within the tolerances of `t` (cuda_test_util.h) of the float64
// recurrence; dg's grows with the T tokens it sums over, and is left out where there is no
// decay (with_dg false). Prints the errors under `name`.
inline void expect_near_recurrence(const char* name, const Grads& g, const ReferenceGrads& ref, ScalarType t,
                                   int64_t T, bool with_dg) {
  const double tol = tol_of(t);
  const double eo = rel_nan_aware(g.o, ref.o), eq = rel_nan_aware(g.dq, ref.dq),
               ek = rel_nan_aware(g.dk, ref.dk), ev = rel_nan_aware(g.dv, ref.dv),
               eg = rel_nan_aware(g.dg, ref.dg);
  std::printf("[cuda-e2e] %-40s o=%.2e dq=%.2e dk=%.2e dv=%.2e dg=%.2e (tol %.0e, dg %.1e)\n", name, eo, eq, ek,
              ev, eg, tol, tol_dg(t, T));
  EXPECT_LT(eo, tol) << "o";
  EXPECT_LT(eq, tol) << "dq";
  EXPECT_LT(ek, tol) << "dk";
  EXPECT_LT(ev, tol) << "dv";
  if (with_dg) {
    EXPECT_LT(eg, tol_dg(t, T)) << "dg";
  }
}

inline void expect_bitwise(const Grads& a, const Grads& b) {
  EXPECT_EQ(a.o, b.o);
  EXPECT_EQ(a.dq, b.dq);
  EXPECT_EQ(a.dk, b.dk);
  EXPECT_EQ(a.dv, b.dv);
  EXPECT_EQ(a.dg, b.dg);
}

}  // namespace lasp2::testing
