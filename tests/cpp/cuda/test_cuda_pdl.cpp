// Programmatic dependent launch of the scalar family's kernels (LASP2_CUDA_PDL=1,
// csrc/core/cuda/pdl.cuh): lasp2_forward + lasp2_backward with the knob on write the same
// bits as with it unset (every kernel computes what it did; only when its blocks start
// moved), eagerly, captured in a CUDA graph and replayed (twice, the outputs poisoned in
// between), and on P = 2 ranks (the combines and state_dot run too); the default run is
// checked against the float64 recurrence as well. Gates with documents and -inf gates,
// a fixed decay per head, D = 64 and 128, bf16; the parts end mid-chunk and have several
// segments (states, scans, dg fix-up). On an sm_90 device the knob must have given
// launches the attribute (else the comparison would be of the default with itself), and
// with the knob unset none.
#include <gtest/gtest.h>

#include <cmath>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/lasp2.h"
#include "lasp2_device_run.h"
#include "../recurrent_reference.h"

namespace lasp2::cuda {
// csrc/core/cuda/pdl.h (not a public header): launches given the PDL attribute so far.
int64_t pdl_attributed_launches();
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

constexpr ScalarType kType = ScalarType::kBFloat16;

struct PdlCase {
  const char* name;
  DecayMode mode;
  int64_t d;
  bool docs;  // document starts, and -inf log gates (kGate only)
};

Problem<double> pdl_problem(const PdlCase& c, uint32_t seed) {
  ProblemSpec s;
  s.batch = 2;
  s.heads = 3;
  s.seqlen = 2000;  // 31.25 chunks: several segments on any GPU, a partial last chunk
  s.dim_k = s.dim_v = c.d;
  s.mode = c.mode;
  s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.d)));
  if (c.docs) s.doc_starts = {1, 64, 700, 1333, s.seqlen - 1};
  Problem<double> pr = rounded(s, kType, seed);
  if (c.docs && c.mode == DecayMode::kGate)
    for (int64_t t : {int64_t{0}, int64_t{63}, int64_t{64}, int64_t{1000}, s.seqlen - 1})
      pr.gate[(1 * s.seqlen + t) * s.heads + 2] = -INFINITY;
  return pr;
}

bool sm90_device() {
  int dev = 0, major = 0;
  cuda_ok(cudaGetDevice(&dev), "cudaGetDevice");
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "attribute");
  return major >= 9;
}

// Forward + backward of one rank on `stream`, eagerly.
Grads run_eager(const Problem<double>& pr, const PartLayout& layout, cudaStream_t stream) {
  return run_rank(pr, kType, layout, nullptr, true, stream);
}

void expect_near_reference(const char* name, const Grads& g, const Problem<double>& pr) {
  expect_near_recurrence(name, g, recurrent_reference(pr), kType, pr.spec.seqlen, true);
}

const PdlCase kCases[] = {{"gate_docs_D64", DecayMode::kGate, 64, true},
                          {"gate_docs_D128", DecayMode::kGate, 128, true},
                          {"gate_D128", DecayMode::kGate, 128, false},
                          {"fixed_D64", DecayMode::kFixed, 64, false},
                          {"fixed_docs_D128", DecayMode::kFixed, 128, true}};

TEST(CudaLasp2Pdl, SameBitsEagerAndFromGraph) {
  LASP2_SKIP_WITHOUT_CUDA();
  const bool sm90 = sm90_device();
  const PartLayout layout = PartLayout::contiguous(1, 0);
  cudaStream_t stream;
  cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
  for (const PdlCase& c : kCases) {
    SCOPED_TRACE(c.name);
    const auto first = pdl_problem(c, 41), second = pdl_problem(c, 42);
    int64_t n0 = cuda::pdl_attributed_launches();
    const Grads want1 = with_env("LASP2_CUDA_PDL", "", [&] { return run_eager(first, layout, stream); });
    const Grads want2 = with_env("LASP2_CUDA_PDL", "", [&] { return run_eager(second, layout, stream); });
    EXPECT_EQ(cuda::pdl_attributed_launches(), n0) << "attribute set with the knob unset";
    expect_near_reference(c.name, want1, first);

    const EnvGuard knob("LASP2_CUDA_PDL", "1");
    n0 = cuda::pdl_attributed_launches();
    expect_bitwise(run_eager(first, layout, stream), want1);
    const int64_t eager_launches = cuda::pdl_attributed_launches() - n0;
    if (sm90) EXPECT_GE(eager_launches, 6) << "PDL did not take effect on an sm_90 device";
    else EXPECT_EQ(eager_launches, 0);

    // captured with the knob on (programmatic edges in the graph), replayed
    CapturedRank graph(first, kType, layout, cuda_backend(), stream);
    expect_bitwise(graph.replay(), want1);
    graph.load(second);  // new inputs into the captured buffers, outputs poisoned, replayed again
    expect_bitwise(graph.replay(), want2);
  }
  cudaStreamDestroy(stream);
}

// P = 2 ranks on one GPU (balanced layout): the LASP-2 combines and state_dot run between
// the passes; the gathered gradients equal the default run's bit for bit.
TEST(CudaLasp2Pdl, SameBitsOnTwoRanks) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const PdlCase& c : {kCases[1], kCases[3]}) {
    SCOPED_TRACE(c.name);
    const auto pr = pdl_problem(c, 43);
    const Grads want = with_env("LASP2_CUDA_PDL", "", [&] { return run_world(pr, kType, 2); });
    expect_near_reference(c.name, want, pr);
    expect_bitwise(with_env("LASP2_CUDA_PDL", "1", [&] { return run_world(pr, kType, 2); }), want);
  }
}

}  // namespace
}  // namespace lasp2::testing
