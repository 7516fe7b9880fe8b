// A malformed environment knob reaches the caller of a CUDA backend call as lasp2::Error
// naming the variable and its value (env_knob.h), where std::atoi and the getenv + strcmp
// readers before session 25 took a prefix, 0 or the default: the scalar family's
// part_state (bf16, D = 128, gates: the tensor-core route) under each knob that call reads,
// and the delta rule's 0/1 switches through forward_kept_floats. The parser's own cases
// are tests/cpp/test_env_knob.cpp (no device needed).
#include <gtest/gtest.h>

#include <string>

#include "../expect_error.h"
#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "delta_rule/delta_backend.h"
#include "walking_passes.h"

namespace lasp2::testing {
namespace {

struct KnobValue {
  const char* name;
  const char* value;
};

TEST(CudaEnvKnobs, MalformedScalarKnobsAreErrors) {
  LASP2_SKIP_WITHOUT_CUDA();
  const OpCase c = whole_sequence_case("knob_bad", DecayMode::kGate, 128, 128, 640, 0);
  const Problem<double> pr = make_problem(c, 7002);
  DeviceProblem dp(pr, c.dtype, c.layout);
  DevBuf<float> st(dp.p.bh() * dp.p.state_elems()), L(dp.p.bh());
  const auto call = [&] { cuda_backend().part_state(dp.p, {0, c.T}, st.p, L.p, nullptr); };
  // atoi read "12x" as 12 and "abc" as 0; PDL took anything but 1 as off, FORCE_GENERIC
  // anything but 0 as on; STATE_FLOOR was clamped to 120
  for (const KnobValue& k : {KnobValue{"LASP2_CUDA_SEG_CHUNKS", "12x"}, KnobValue{"LASP2_CUDA_SEG_CHUNKS", "-1"},
                             KnobValue{"LASP2_CUDA_FORCE_GENERIC", "yes"},
                             KnobValue{"LASP2_CUDA_STATE_SUB_CHUNKS", "abc"},
                             KnobValue{"LASP2_CUDA_STATE_FLOOR", "121"}, KnobValue{"LASP2_CUDA_PDL", "2"}}) {
    const EnvGuard bad(k.name, k.value);
    expect_error_naming(call, std::string(k.name) + "=\"" + k.value + "\"");
  }
  // the well-formed spellings are taken (the same knobs at values the tests use)
  for (const KnobValue& k : {KnobValue{"LASP2_CUDA_SEG_CHUNKS", "4"}, KnobValue{"LASP2_CUDA_FORCE_GENERIC", "1"},
                             KnobValue{"LASP2_CUDA_STATE_SUB_CHUNKS", "3"}, KnobValue{"LASP2_CUDA_STATE_FLOOR", "0"},
                             KnobValue{"LASP2_CUDA_PDL", "0"}}) {
    const EnvGuard good(k.name, k.value);
    EXPECT_NO_THROW(call()) << k.name << "=" << k.value;
  }
  cuda_ok(cudaDeviceSynchronize(), "part_state after the knob errors");
}

// LASP2_CUDA_SUMMARY_KEEP (session 26): 0 keeps nothing from a part summary, 1 (unset) keeps
// its states where the output pass would and its meta, anything else names the knob.
TEST(CudaEnvKnobs, SummaryKeepTakesZeroOrOne) {
  LASP2_SKIP_WITHOUT_CUDA();
  const OpCase c = whole_sequence_case("knob_keep", DecayMode::kGate, 128, 128, 640, 0);
  const Problem<double> pr = make_problem(c, 7003);
  DeviceProblem dp(pr, c.dtype, c.layout);
  const TokenRange all{0, c.T};
  const int64_t n = cuda_backend().saved_states_floats(dp.p, all);
  ASSERT_GT(n, 0) << "one segment: nothing to keep";
  DevBuf<float> st(dp.p.bh() * dp.p.state_elems()), L(dp.p.bh()), kept(n);
  const auto keeps = [&] {
    return cuda_backend().part_state_keeping(dp.p, all, st.p, L.p, kept.p, nullptr) != nullptr;
  };
  EXPECT_TRUE(keeps()) << "unset";
  {
    const EnvGuard off("LASP2_CUDA_SUMMARY_KEEP", "0");
    EXPECT_FALSE(keeps());
  }
  {
    const EnvGuard on("LASP2_CUDA_SUMMARY_KEEP", "1");
    EXPECT_TRUE(keeps());
  }
  {
    const EnvGuard bad("LASP2_CUDA_SUMMARY_KEEP", "no");
    expect_error_naming(keeps, "LASP2_CUDA_SUMMARY_KEEP=\"no\"");
  }
  cuda_ok(cudaDeviceSynchronize(), "part_state_keeping after the knob error");
}

TEST(CudaEnvKnobs, DeltaSwitchesTakeZeroOrOne) {
  LASP2_SKIP_WITHOUT_CUDA();
  delta::DeltaParams kda;  // bf16, d = 64, per-key gates: every switch of keeps_forward_params is read
  kda.batch = 1;
  kda.heads = 2;
  kda.seqlen = 100;
  kda.dim_k = kda.dim_v = 64;
  kda.dtype = ScalarType::kBFloat16;
  kda.gate_kind = delta::GateKind::kPerKey;
  const delta::DeltaKernelBackend& cuda = delta::delta_backend_for(Device::kCUDA);
  const int64_t unset = cuda.forward_kept_floats(kda, {0, 100});
  for (const char* name : {"LASP2_DELTA_CHUNKED", "LASP2_DELTA_KEEP_FORWARD", "LASP2_DELTA_KDA_KEEP_FORWARD",
                           "LASP2_DELTA_KDA_CHUNKED", "LASP2_DELTA_KDA_CHUNKED_BWD"}) {
    SCOPED_TRACE(name);
    {
      const EnvGuard on(name, "1");
      EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), unset);
    }
    {
      const EnvGuard off(name, "0");
      EXPECT_EQ(cuda.forward_kept_floats(kda, {0, 100}), 0);
    }
    // a leading '0' was off and anything else on before session 25
    for (const char* bad : {"00", "off", "true"}) {
      const EnvGuard g(name, bad);
      expect_error_naming([&] { cuda.forward_kept_floats(kda, {0, 100}); }, std::string(name) + "=\"" + bad + "\"");
    }
  }
}

}  // namespace
}  // namespace lasp2::testing
