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
#include <mutex>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/lasp2.h"
#include "../local_slice.h"
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
  Problem<double> pr(s, seed);
  for (auto* v : {&pr.q, &pr.k, &pr.v, &pr.dout})
    for (auto& x : *v) x = round_to(kType, x);
  for (auto& x : pr.gate) x = static_cast<double>(static_cast<float>(x));
  for (auto& x : pr.log_decay) x = static_cast<double>(static_cast<float>(x));
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
Grads run_eager(const Problem<double>& pr, const PartLayout& layout, Communicator* comm, cudaStream_t stream) {
  DeviceRank r(pr, kType, layout);
  r.enqueue(cuda_backend(), comm, layout, true, stream);
  cuda_ok(cudaStreamSynchronize(stream), "lasp2 on the device");
  return r.grads();
}

void expect_same_bits(const Grads& got, const Grads& want) {
  EXPECT_EQ(got.o, want.o);
  EXPECT_EQ(got.dq, want.dq);
  EXPECT_EQ(got.dk, want.dk);
  EXPECT_EQ(got.dv, want.dv);
  EXPECT_EQ(got.dg, want.dg);
}

double max_rel(const std::vector<double>& got, const std::vector<double>& want) {
  double num = 0, den = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    num = std::max(num, std::abs(got[i] - want[i]));
    den = std::max(den, std::abs(want[i]));
  }
  return num / std::max(den, 1e-3);
}

void expect_near_reference(const Grads& g, const Problem<double>& pr) {
  const ReferenceGrads ref = recurrent_reference(pr);
  const double tol = tol_of(kType);
  EXPECT_LT(max_rel(g.o, ref.o), tol) << "o";
  EXPECT_LT(max_rel(g.dq, ref.dq), tol) << "dq";
  EXPECT_LT(max_rel(g.dk, ref.dk), tol) << "dk";
  EXPECT_LT(max_rel(g.dv, ref.dv), tol) << "dv";
  EXPECT_LT(max_rel(g.dg, ref.dg), tol_dg(kType, pr.spec.seqlen)) << "dg";
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
    const Grads want1 = with_env("LASP2_CUDA_PDL", "", [&] { return run_eager(first, layout, nullptr, stream); });
    const Grads want2 = with_env("LASP2_CUDA_PDL", "", [&] { return run_eager(second, layout, nullptr, stream); });
    EXPECT_EQ(cuda::pdl_attributed_launches(), n0) << "attribute set with the knob unset";
    expect_near_reference(want1, first);

    const EnvGuard knob("LASP2_CUDA_PDL", "1");
    n0 = cuda::pdl_attributed_launches();
    expect_same_bits(run_eager(first, layout, nullptr, stream), want1);
    const int64_t eager_launches = cuda::pdl_attributed_launches() - n0;
    if (sm90) EXPECT_GE(eager_launches, 6) << "PDL did not take effect on an sm_90 device";
    else EXPECT_EQ(eager_launches, 0);

    // captured with the knob on (programmatic edges in the graph), replayed
    DeviceRank r(first, kType, layout);
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    cuda_ok(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal), "cudaStreamBeginCapture");
    r.enqueue(cuda_backend(), nullptr, layout, true, stream);
    cuda_ok(cudaStreamEndCapture(stream, &graph), "cudaStreamEndCapture");
    cuda_ok(cudaGraphInstantiate(&exec, graph, 0), "cudaGraphInstantiate");
    cuda_ok(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    cuda_ok(cudaStreamSynchronize(stream), "replay");
    expect_same_bits(r.grads(), want1);
    // new inputs into the captured buffers, outputs poisoned, replayed again
    r.q.upload(second.q);
    r.k.upload(second.k);
    r.v.upload(second.v);
    r.dout.upload(second.dout);
    r.gate.upload(std::vector<float>(second.gate.begin(), second.gate.end()));
    r.log_decay.upload(std::vector<float>(second.log_decay.begin(), second.log_decay.end()));
    for (DevTensor* x : {&r.o, &r.dq, &r.dk, &r.dv}) x->buf.poison();
    r.dg.poison();
    cuda_ok(cudaDeviceSynchronize(), "uploads");
    cuda_ok(cudaGraphLaunch(exec, stream), "cudaGraphLaunch");
    cuda_ok(cudaStreamSynchronize(stream), "replay");
    expect_same_bits(r.grads(), want2);
    cudaGraphExecDestroy(exec);
    cudaGraphDestroy(graph);
  }
  cudaStreamDestroy(stream);
}

// P = 2 ranks on one GPU (balanced layout): the LASP-2 combines and state_dot run between
// the passes; the gathered gradients equal the default run's bit for bit.
Grads run_two_ranks(const Problem<double>& global) {
  const ProblemSpec& s = global.spec;
  Grads out{std::vector<double>(global.q.size() / s.dim_k * s.dim_v), std::vector<double>(global.q.size()),
            std::vector<double>(global.k.size()), std::vector<double>(global.v.size()),
            std::vector<double>(s.batch * s.seqlen * s.heads)};
  std::mutex mu;
  run_device_ranks(2, [&](int rank, DeviceThreadCommunicator& comm) {
    const PartLayout layout = PartLayout::balanced(2, rank);
    const auto local = local_problem(global, layout);
    cudaStream_t stream;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    const Grads g = run_eager(local, layout, &comm, stream);
    cudaStreamDestroy(stream);
    const std::lock_guard<std::mutex> lock(mu);
    put_tokens(out.o, g.o, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(out.dq, g.dq, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(out.dk, g.dk, layout, s.batch, s.seqlen, s.heads, s.dim_k);
    put_tokens(out.dv, g.dv, layout, s.batch, s.seqlen, s.heads, s.dim_v);
    put_tokens(out.dg, g.dg, layout, s.batch, s.seqlen, s.heads, 1);
  });
  return out;
}

TEST(CudaLasp2Pdl, SameBitsOnTwoRanks) {
  LASP2_SKIP_WITHOUT_CUDA();
  for (const PdlCase& c : {kCases[1], kCases[3]}) {
    SCOPED_TRACE(c.name);
    const auto pr = pdl_problem(c, 43);
    const Grads want = with_env("LASP2_CUDA_PDL", "", [&] { return run_two_ranks(pr); });
    expect_near_reference(want, pr);
    expect_same_bits(with_env("LASP2_CUDA_PDL", "1", [&] { return run_two_ranks(pr); }), want);
  }
}

}  // namespace
}  // namespace lasp2::testing
