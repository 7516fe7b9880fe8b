// The output and dq passes (cuda_backend().chunk_forward / chunk_backward_dq) at a
// benchmark's size with the kernel variants of LASP2_CUDA_FWD_KERNEL (read per launch)
// alternating inside one process: an A/B of tc_fwd_kernel's variants in one ncu run
// (`ncu -k regex:tc_fwd_kernel --metrics gpu__time_duration.sum`: each row names its
// variant) or by CUDA events (printed), without a process start per measurement.
// Skipped unless LASP2_FWD_TIMING_T=<tokens> is set. Knobs: LASP2_FWD_TIMING_DECAY = gate
// (default) | fixed | none; LASP2_FWD_TIMING_KNOBS = comma-separated values of
// LASP2_CUDA_FWD_KERNEL, an empty one the default (default ",v10": the default, variant 16
// for the output pass and 10 for dq, against variant 10 for both);
// LASP2_FWD_TIMING_ROUNDS (default 3). B = 1, H = 16, D = 128, bf16, the whole sequence
// as one part with the backend's segments. The assertion: every knob's o, dq and q.dq
// equal the first knob's bit for bit (the variants' equality at full size).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cuda_test_util.h"
#include "lasp2/kernel_backend.h"

namespace lasp2::testing {
namespace {

// bf16 bits of uniform values in [-a, a) from a 64-bit LCG (fast at 134 M elements, where
// the tests' float64 normal draws would take minutes)
void fill_bf16(DevTensor& t, uint64_t seed, float a) {
  std::vector<uint16_t> h(t.elems);
  uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
  for (auto& e : h) {
    s = s * 6364136223846793005ull + 1442695040888963407ull;
    const float u = static_cast<float>(s >> 40) * (1.f / 16777216.f);  // [0, 1)
    const float x = a * (2.f * u - 1.f);
    uint32_t bits;
    std::memcpy(&bits, &x, 4);
    e = static_cast<uint16_t>((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);  // round to nearest even
  }
  cuda_ok(cudaMemcpy(t.buf.p, h.data(), h.size() * 2, cudaMemcpyHostToDevice), "upload");
}

std::vector<std::string> split_knobs(const std::string& s) {
  std::vector<std::string> out;
  size_t b = 0;
  for (;;) {
    const size_t e = s.find(',', b);
    out.push_back(s.substr(b, e == std::string::npos ? std::string::npos : e - b));
    if (e == std::string::npos) return out;
    b = e + 1;
  }
}

TEST(CudaFwdTiming, VariantsAlternating) {
  LASP2_SKIP_WITHOUT_CUDA();
  const char* tenv = std::getenv("LASP2_FWD_TIMING_T");
  if (tenv == nullptr) GTEST_SKIP() << "LASP2_FWD_TIMING_T unset";
  const int64_t T = std::atoll(tenv), H = 16, D = 128;
  const char* denv = std::getenv("LASP2_FWD_TIMING_DECAY");
  const std::string decay = denv != nullptr ? denv : "gate";
  const char* kenv = std::getenv("LASP2_FWD_TIMING_KNOBS");
  const std::vector<std::string> knobs = split_knobs(kenv != nullptr ? kenv : ",v10");
  const char* renv = std::getenv("LASP2_FWD_TIMING_ROUNDS");
  const int rounds = renv != nullptr ? std::max(1, std::atoi(renv)) : 3;
  const ScalarType type = ScalarType::kBFloat16;
  const Layout lay{};
  DevTensor q(1, T, H, D, type, lay), k(1, T, H, D, type, lay), v(1, T, H, D, type, lay), dout(1, T, H, D, type, lay);
  fill_bf16(q, 1, 1.f);
  fill_bf16(k, 2, 1.f / std::sqrt(static_cast<float>(D)));
  fill_bf16(v, 3, 1.f);
  fill_bf16(dout, 4, 1.f);
  // gates: log gates in [-0.1, 0); fixed: bench_lasp2's -0.01 (h + 1)
  std::vector<float> gate_h(T * H), fixed_h(H);
  {
    uint64_t s = 5;
    for (auto& g : gate_h) {
      s = s * 6364136223846793005ull + 1442695040888963407ull;
      g = -0.1f * static_cast<float>(s >> 40) * (1.f / 16777216.f);
    }
    for (int64_t h = 0; h < H; ++h) fixed_h[h] = -0.01f * static_cast<float>(h + 1);
  }
  DevBuf<float> gate(gate_h.size()), fixed(fixed_h.size());
  gate.upload(gate_h);
  fixed.upload(fixed_h);

  AttentionParams p;
  p.batch = 1;
  p.seqlen = T;
  p.heads = H;
  p.dim_k = D;
  p.dim_v = D;
  p.dtype = type;
  p.q = q.cview();
  p.k = k.cview();
  p.v = v.cview();
  p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  p.decay.dtype = ScalarType::kFloat32;
  if (decay == "gate") {
    p.decay.mode = DecayMode::kGate;
    p.decay.gate = gate.p;
    p.decay.gate_stride = BTHStrides{T * H, H, 1};
  } else if (decay == "fixed") {
    p.decay.mode = DecayMode::kFixed;
    p.decay.log_decay = fixed.p;
  }
  const TokenRange part{0, T};

  // one o, dq, q.dq per knob (the bitwise comparison after the timed rounds)
  std::vector<DevTensor> o, dq;
  std::vector<DevBuf<float>> qdq;
  o.reserve(knobs.size());
  dq.reserve(knobs.size());
  qdq.reserve(knobs.size());
  for (size_t i = 0; i < knobs.size(); ++i) {
    o.emplace_back(1, T, H, D, type, lay);
    dq.emplace_back(1, T, H, D, type, lay);
    qdq.emplace_back(static_cast<size_t>(T * H));
  }
  const int nev = 3 * (rounds + 1) * static_cast<int>(knobs.size());
  std::vector<cudaEvent_t> ev(nev);
  for (auto& e : ev) cuda_ok(cudaEventCreate(&e), "event");
  // round 0 is a warm-up (attributes, scratch); rounds 1.. are timed; all enqueued
  // without a host wait, so the host's per-call work (tensor maps) stays ahead of the GPU
  int e = 0;
  for (int r = 0; r <= rounds; ++r) {
    for (size_t i = 0; i < knobs.size(); ++i) {
      EnvGuard g("LASP2_CUDA_FWD_KERNEL", knobs[i]);
      cuda_ok(cudaEventRecord(ev[e]), "record");
      cuda_backend().chunk_forward(p, part, nullptr, o[i].mview(), nullptr);
      cuda_ok(cudaEventRecord(ev[e + 1]), "record");
      cuda_backend().chunk_backward_dq(p, part, dout.cview(), nullptr, dq[i].mview(), qdq[i].p, nullptr);
      cuda_ok(cudaEventRecord(ev[e + 2]), "record");
      e += 3;
    }
  }
  cuda_ok(cudaDeviceSynchronize(), "sync");
  std::printf("[ timing ] T=%lld H=16 D=128 bf16 %s, chunk_forward / chunk_backward_dq ms per round:\n",
              static_cast<long long>(T), decay.c_str());
  for (size_t i = 0; i < knobs.size(); ++i) {
    std::vector<float> f, b;
    for (int r = 1; r <= rounds; ++r) {
      const int x = 3 * (r * static_cast<int>(knobs.size()) + static_cast<int>(i));
      float a = 0, c = 0;
      cuda_ok(cudaEventElapsedTime(&a, ev[x], ev[x + 1]), "elapsed");
      cuda_ok(cudaEventElapsedTime(&c, ev[x + 1], ev[x + 2]), "elapsed");
      f.push_back(a);
      b.push_back(c);
    }
    std::string line = "[ timing ]   knob '" + knobs[i] + "': fwd";
    char buf[32];
    for (float x : f) std::snprintf(buf, sizeof buf, " %.4f", x), line += buf;
    line += " | dq";
    for (float x : b) std::snprintf(buf, sizeof buf, " %.4f", x), line += buf;
    std::sort(f.begin(), f.end());
    std::sort(b.begin(), b.end());
    std::snprintf(buf, sizeof buf, " | min %.4f", f[0]), line += buf;
    std::snprintf(buf, sizeof buf, " / %.4f", b[0]), line += buf;
    std::printf("%s\n", line.c_str());
  }
  for (auto& x : ev) cudaEventDestroy(x);
  const std::vector<unsigned char> o0 = o[0].buf.download(), dq0 = dq[0].buf.download();
  const std::vector<float> s0 = qdq[0].download();
  for (size_t i = 1; i < knobs.size(); ++i) {
    EXPECT_TRUE(o[i].buf.download() == o0) << "o: knob '" << knobs[i] << "' differs from '" << knobs[0] << "'";
    EXPECT_TRUE(dq[i].buf.download() == dq0) << "dq: knob '" << knobs[i] << "' differs";
    const std::vector<float> si = qdq[i].download();
    EXPECT_EQ(std::memcmp(si.data(), s0.data(), s0.size() * sizeof(float)), 0)
        << "q.dq: knob '" << knobs[i] << "' differs";
  }
  // and not trivially: o and dq are all finite (bf16 exponent not all ones) and not all zero
  for (const auto* x : {&o0, &dq0}) {
    int64_t nonfinite = 0, nonzero = 0;
    for (size_t j = 0; j + 1 < x->size(); j += 2) {
      const uint16_t b = static_cast<uint16_t>((*x)[j] | ((*x)[j + 1] << 8));
      nonfinite += (b & 0x7F80u) == 0x7F80u;
      nonzero += (b & 0x7FFFu) != 0;
    }
    EXPECT_EQ(nonfinite, 0);
    EXPECT_GT(nonzero, static_cast<int64_t>(x->size() / 4));
  }
}

}  // namespace
}  // namespace lasp2::testing
