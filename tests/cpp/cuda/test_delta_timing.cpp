// GDN timings on one device at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16:
// the backend's calls, the chunked kernels one by one, prep and rprep old against new,
// the state-pass families side by side and packed documents with their own states
// (printed; the assertions check that the outputs are finite).
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <sstream>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cuda_test_util.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/delta_backend.h"
#include "delta_test_util.h"
#include "gdn_layer.h"

namespace lasp2::testing::delta_cuda {
namespace {

int64_t env_or(const char* name, int64_t fallback) {
  const char* s = std::getenv(name);
  return (s != nullptr && *s != '\0') ? std::atoll(s) : fallback;
}

// The forward walk's output argument writing o.
delta::gpu::ForwardOut forward_out(DevTensor& o) {
  const MutView m = o.mview();
  delta::gpu::ForwardOut fo;
  fo.o = m.data;
  fo.osb = m.stride.batch;
  fo.ost = m.stride.seq;
  fo.osh = m.stride.head;
  return fo;
}

// Milliseconds of `launch` on the default stream: the median of runs 2..reps (the
// first warms up; reps = 1: that one).
class LaunchTimer {
 public:
  LaunchTimer() {
    cuda_ok(cudaEventCreate(&e0_), "event");
    cuda_ok(cudaEventCreate(&e1_), "event");
  }
  ~LaunchTimer() {
    cudaEventDestroy(e0_);
    cudaEventDestroy(e1_);
  }
  LaunchTimer(const LaunchTimer&) = delete;
  LaunchTimer& operator=(const LaunchTimer&) = delete;

  float median_ms(const std::function<void()>& launch, int reps) {
    std::vector<float> ms;
    for (int rep = 0; rep < reps; ++rep) {
      cuda_ok(cudaEventRecord(e0_), "record");
      launch();
      cuda_ok(cudaEventRecord(e1_), "record");
      cuda_ok(cudaEventSynchronize(e1_), "sync");
      float t = 0;
      cuda_ok(cudaEventElapsedTime(&t, e0_, e1_), "elapsed");
      if (rep > 0 || reps == 1) ms.push_back(t);
    }
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
  }

 private:
  cudaEvent_t e0_, e1_;
};

// One GDN layer at T = 64K, H = 16, D = 128, bf16 on one device: the time of the
// one-device schedule's calls (printed; the assertions only check that every output
// is finite). LASP2_DELTA_TIMING_T=<tokens> changes T.
TEST(DeltaCudaTiming, GdnOneDevice) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{}), o(1, T, H, D, type, Layout{}), dq(1, T, H, D, type, Layout{}),
      dk(1, T, H, D, type, Layout{}), dv(1, T, H, D, type, Layout{});
  {
    std::mt19937 rng(1);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<double> x(T * H * D);
    for (DevTensor* t : {&q, &k, &v, &dout}) {
      for (auto& e : x) e = normal(rng) * (t == &k ? 1.0 / std::sqrt(double(D)) : 1.0);
      t->upload(x);
    }
  }
  std::mt19937 gate_rng(2);
  const GatesBetas gb = random_gates(gate_rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  const int64_t S = H * D * D;
  DevBuf<float> A(H * D * D), M(S), hA(H * D * D), hM(S), dE(S), dg(T * H), db(T * H);
  const TokenRange all{0, T};
  cudaEvent_t e0, e1, e2, e3;
  for (auto* e : {&e0, &e1, &e2, &e3}) cuda_ok(cudaEventCreate(e), "event");
  for (int rep = 0; rep < 2; ++rep) {  // the second is timed
    cuda_ok(cudaEventRecord(e0), "record");
    be.part_summary(p, all, {}, A.p, M.p, hA.p, hM.p, nullptr);
    cuda_ok(cudaEventRecord(e1), "record");
    be.forward(p, all, nullptr, {}, o.mview(), nullptr);
    cuda_ok(cudaEventRecord(e2), "record");
    be.entering_dstate(p, all, dout.cview(), dE.p, nullptr);
    be.backward(p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(), dv.mview(), dg.p,
                db.p, nullptr, nullptr);
    cuda_ok(cudaEventRecord(e3), "record");
    cuda_ok(cudaEventSynchronize(e3), "sync");
  }
  float summary_ms = 0, forward_ms = 0, backward_ms = 0;
  cuda_ok(cudaEventElapsedTime(&summary_ms, e0, e1), "elapsed");
  cuda_ok(cudaEventElapsedTime(&forward_ms, e1, e2), "elapsed");
  cuda_ok(cudaEventElapsedTime(&backward_ms, e2, e3), "elapsed");
  std::printf("[ timing ] GDN T=%lld H=16 D=128 bf16: part_summary %.2f ms, forward %.2f ms, "
              "entering_dstate + backward %.2f ms\n",
              static_cast<long long>(T), summary_ms, forward_ms, backward_ms);
  // One device as the schedule runs it (forward, then backward alone), recomputing and
  // with the forward's kept buffer (forward_keeping, backward_reusing reading it).
  {
    DevBuf<float> kept(be.forward_kept_floats(p, all));
    float ms[2][2] = {};
    for (int rep = 0; rep < 3; ++rep) {  // recompute, keep, recompute, keep, ...: the last two timed
      for (int keep = 0; keep < 2; ++keep) {
        cuda_ok(cudaEventRecord(e0), "record");
        if (keep) {
          be.forward_keeping(p, all, nullptr, {}, o.mview(), kept.p, nullptr);
        } else {
          be.forward(p, all, nullptr, {}, o.mview(), nullptr);
        }
        cuda_ok(cudaEventRecord(e1), "record");
        be.backward_reusing(nullptr, p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(), dv.mview(),
                            dg.p, db.p, nullptr, nullptr, keep ? kept.p : nullptr);
        cuda_ok(cudaEventRecord(e2), "record");
        cuda_ok(cudaEventSynchronize(e2), "sync");
        cuda_ok(cudaEventElapsedTime(&ms[keep][0], e0, e1), "elapsed");
        cuda_ok(cudaEventElapsedTime(&ms[keep][1], e1, e2), "elapsed");
      }
    }
    std::printf("[ timing ] GDN T=%lld one device: recomputing forward %.2f + backward %.2f = %.2f ms; "
                "forward kept (%.1f MiB) forward %.2f + backward %.2f = %.2f ms\n",
                static_cast<long long>(T), ms[0][0], ms[0][1], ms[0][0] + ms[0][1],
                be.forward_kept_floats(p, all) * 4.0 / (1 << 20), ms[1][0], ms[1][1], ms[1][0] + ms[1][1]);
  }
  // Where the chunked kernels' time goes (delta_chunk.h): each launch on its own,
  // the second of two runs timed.
  {
    namespace gpu = delta::gpu;
    const gpu::Problem g = gdn_problem(p);
    const int64_t nck = gpu::chunk_count(g), rows = H * nck * 64;
    DevBuf<float> w(rows * D / 2), u(rows * D / 2), meta(2 * rows), vnew(rows * D / 2), st16(H * nck * D * D / 2),
        dh(H * nck * D * D / 2), tm(rows * 64 / 2);
    const gpu::ChunkPrep prep{w.p, u.p, meta.p};
    gpu::ChunkPrep bprep = prep;  // the backward's prep also keeps T
    bprep.t = tm.p;
    const gpu::ForwardOut fo = forward_out(o);
    gpu::ChunkBackwardArgs ba;
    ba.dout = delta::cuda_route::view_of(dout.cview());
    ba.meta = meta.p;
    ba.v_new = vnew.p;
    ba.states = st16.p;
    ba.dh = dh.p;
    ba.t = tm.p;
    ba.r = u.p;      // rprep's r (the stage before rstates)
    for (auto [t, ptr, sb, st, sh] : {std::tuple{&dq, &ba.dq, &ba.dqsb, &ba.dqst, &ba.dqsh},
                                      {&dk, &ba.dk, &ba.dksb, &ba.dkst, &ba.dksh},
                                      {&dv, &ba.dv, &ba.dvsb, &ba.dvst, &ba.dvsh}}) {
      const MutView m = t->mview();
      *ptr = m.data;
      *sb = m.stride.batch;
      *st = m.stride.seq;
      *sh = m.stride.head;
    }
    ba.dg = dg.p;
    ba.dbeta = db.p;
    const std::vector<std::pair<const char*, std::function<void()>>> stages = {
        {"prep", [&] { gpu::launch_chunk_prep(g, prep, nullptr); }},
        {"prep with T", [&] { gpu::launch_chunk_prep(g, bprep, nullptr); }},
        {"states", [&] {
           gpu::ChunkStatesOut so;
           so.v_new = vnew.p;
           so.states = st16.p;
           gpu::launch_chunk_states(g, prep, so, nullptr);
         }},
        {"output", [&] { gpu::launch_chunk_output(g, prep, vnew.p, st16.p, fo, nullptr); }},
        {"rprep", [&] { gpu::launch_chunk_rprep(g, ba.dout, prep, nullptr); }},
        {"rstates", [&] {
           gpu::ChunkReverseOut ro;
           ro.dh = dh.p;
           gpu::launch_chunk_rstates(g, ba.dout, prep, ro, nullptr);
         }},
        {"chunk backward", [&] { gpu::launch_chunk_backward(g, ba, nullptr); }},
    };
    LaunchTimer timer;
    std::string line;
    for (const auto& [name, launch] : stages) {
      const float ms = timer.median_ms(launch, 2);  // the second of two runs
      char buf[64];
      std::snprintf(buf, sizeof(buf), "%s%s %.2f", line.empty() ? "" : ", ", name, ms);
      line += buf;
    }
    std::printf("[ timing ] chunked stages (ms): %s\n", line.c_str());
    // The chunk backward's variants side by side (LASP2_DELTA_TIMING_BWD_KERNELS, e.g.
    // "lean early lean early" or "ordered ordered/cp_async ...": LASP2_DELTA_CHUNK_BWD_KERNEL
    // (and LASP2_CUDA_TILE_COPY after a slash) set to each in turn): the chunk
    // backward launch alone (the median of 5 after a warm-up) and the one-device backward
    // with the forward kept (forward_keeping, then backward_reusing timed; the median of 3
    // after a warm-up), so that one process's data serve the A/B.
    if (const char* list = std::getenv("LASP2_DELTA_TIMING_BWD_KERNELS"); list != nullptr && *list != '\0') {
      DevBuf<float> kept(be.forward_kept_floats(p, all));
      std::istringstream names(list);
      std::string name;
      while (names >> name) {
        // "ordered/cp_async": the form with LASP2_CUDA_TILE_COPY=cp_async (the cp.async
        // copies instead of the tensor maps); a plain name leaves the copies at the default
        const size_t slash = name.find('/');
        const EnvGuard scope("LASP2_DELTA_CHUNK_BWD_KERNEL", name.substr(0, slash));
        const EnvGuard copy("LASP2_CUDA_TILE_COPY", slash == std::string::npos ? "" : name.substr(slash + 1));
        const float chunk_ms = timer.median_ms([&] { gpu::launch_chunk_backward(g, ba, nullptr); }, 6);
        std::vector<float> bwd;
        for (int rep = 0; rep < 4; ++rep) {
          be.forward_keeping(p, all, nullptr, {}, o.mview(), kept.p, nullptr);
          cuda_ok(cudaEventRecord(e0), "record");
          be.backward_reusing(nullptr, p, all, dout.cview(), nullptr, nullptr, {}, dq.mview(), dk.mview(),
                              dv.mview(), dg.p, db.p, nullptr, nullptr, kept.p);
          cuda_ok(cudaEventRecord(e1), "record");
          cuda_ok(cudaEventSynchronize(e1), "sync");
          float ms = 0;
          cuda_ok(cudaEventElapsedTime(&ms, e0, e1), "elapsed");
          if (rep > 0) bwd.push_back(ms);
        }
        std::sort(bwd.begin(), bwd.end());
        std::printf("[ timing ] chunk backward kernel %s: launch %.3f ms, one-device backward (forward kept) %.3f ms\n",
                    name.c_str(), chunk_ms, bwd[bwd.size() / 2]);
      }
    }
  }
  for (DevTensor* t : {&o, &dq, &dk, &dv}) {
    const auto rb = t->download();
    int64_t bad = 0;
    for (size_t i = 0; i < rb.v.size(); ++i) bad += !std::isfinite(rb.v[i]);
    EXPECT_EQ(bad, 0);
  }
  int64_t bad = 0;
  EXPECT_LT(rel_err_f32(dg.download(), std::vector<float>(T * H, 0.f), &bad), INFINITY);
  EXPECT_EQ(bad, 0);
}

// prep (with and without T) and rprep at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128,
// bf16: the twelfth round's kernels (old) and the defaults (new) alternating, two rounds,
// each the median of 5 launches after a warm-up (printed; the assertion only checks that
// r is finite). LASP2_PREP_TIMING_REPS=1: one launch each (for ncu).
TEST(DeltaCudaPrepTiming, OldVsNew) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);
  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(p);
  const int64_t rows = H * gpu::chunk_count(gp) * 64;
  DevBuf<float> w(rows * D / 2), u(rows * D / 2), r(rows * D / 2), meta(2 * rows), tm(rows * 64 / 2);
  const gpu::ChunkPrep prep{w.p, u.p, meta.p};
  gpu::ChunkPrep tprep = prep;
  tprep.t = tm.p;
  const gpu::View dO = delta::cuda_route::view_of(dout.cview());
  LaunchTimer timer;
  const int reps = static_cast<int>(env_or("LASP2_PREP_TIMING_REPS", 6));  // 1 under ncu: one launch each
  for (int round = 0; round < 2; ++round)
    for (const char* kernel : {"old", "new"}) {
      const EnvGuard a("LASP2_DELTA_PREP_KERNEL", kernel), b("LASP2_DELTA_RPREP_KERNEL", kernel);
      const float p_ms = timer.median_ms([&] { gpu::launch_chunk_prep(gp, prep, nullptr); }, reps);
      const float pt_ms = timer.median_ms([&] { gpu::launch_chunk_prep(gp, tprep, nullptr); }, reps);
      const float r_ms =
          timer.median_ms([&] { gpu::launch_chunk_rprep(gp, dO, gpu::ChunkPrep{w.p, r.p, meta.p}, nullptr); }, reps);
      std::printf("[ timing ] round %d %s T=%lld: prep %.3f ms, prep with T %.3f ms, rprep %.3f ms\n", round, kernel,
                  static_cast<long long>(T), p_ms, pt_ms, r_ms);
    }
  int64_t bad = 0;  // r's bf16 pairs: an all-ones exponent is inf or NaN
  for (float x : r.download()) {
    uint32_t bits = 0;
    std::memcpy(&bits, &x, 4);
    bad += (bits & 0x7F80u) == 0x7F80u || (bits & 0x7F800000u) == 0x7F800000u;
  }
  EXPECT_EQ(bad, 0);
}

// The chunked forward at T = 64K, H = 16, D = 128, bf16 on one device (printed, the
// median of 5 after a warm-up): each kernel on its own, the backend's forward and
// part_summary. LASP2_DELTA_TIMING_T=<tokens>
// changes T. The inputs repeat a 2^20-element random pattern (fast to set up).
TEST(DeltaCudaForwardTiming, GdnChunkedKernels) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      o(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const DeltaParams p = gdn_params(q, k, v, gb);

  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(p);
  const int64_t nck = gpu::chunk_count(gp), rows = H * nck * 64;
  DevBuf<float> w(rows * D / 2), uu(rows * D / 2), meta(2 * rows), vnew(rows * D / 2), st16(H * nck * D * D / 2);
  DevBuf<float> A(H * D * D), M(H * D * D), hA(H * D * D), hM(H * D * D);
  const gpu::ChunkPrep prep{w.p, uu.p, meta.p};
  const gpu::ForwardOut fo = forward_out(o);
  const auto& be = delta::delta_backend_for(Device::kCUDA);
  const std::vector<std::pair<const char*, std::function<void()>>> stages = {
      {"prep", [&] { gpu::launch_chunk_prep(gp, prep, nullptr); }},
      {"states", [&] {
         gpu::ChunkStatesOut so;
         so.v_new = vnew.p;
         so.states = st16.p;
         gpu::launch_chunk_states(gp, prep, so, nullptr);
       }},
      {"output", [&] { gpu::launch_chunk_output(gp, prep, vnew.p, st16.p, fo, nullptr); }},
      {"backend forward", [&] { be.forward(p, {0, T}, nullptr, {}, o.mview(), nullptr); }},
      {"backend part_summary", [&] { be.part_summary(p, {0, T}, {}, A.p, M.p, hA.p, hM.p, nullptr); }},
  };
  LaunchTimer timer;
  std::string line;
  for (const auto& [name, launch] : stages) {
    char buf[80];
    std::snprintf(buf, sizeof(buf), "%s%s %.3f", line.empty() ? "" : ", ", name, timer.median_ms(launch, 6));
    line += buf;
  }
  std::printf("[ timing ] GDN forward T=%lld H=16 D=128 bf16 (ms, median of 5): %s\n", static_cast<long long>(T),
              line.c_str());
  EXPECT_LT(rel_err_f32(M.download(), std::vector<float>(H * D * D, 0.f)), INFINITY) << "M finite";
  EXPECT_LT(rel_err_f32(A.download(), std::vector<float>(H * D * D, 0.f)), INFINITY) << "A finite";
}

// ---- the state passes side by side (gdnstates) -------------------------------------------
// The forward pass (v_new and the 16-bit chunk states), the part summary and the reverse
// pass (16-bit dh) at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16, for each
// kernel family of LASP2_DELTA_STATE_KERNEL named in LASP2_STATE_TIMING_VARIANTS
// (default "tile w8"): the median of the timed launches
// (LASP2_STATE_TIMING_REPS, default 3, the first untimed), and the outputs' max
// difference relative to the first family's (head 0 of v_new, the states and dh over all
// chunks; A and M: the small-problem tests (test_delta_*.cpp) hold each family to
// the recurrent kernels, here the whole 64K chain is compared).
// The first `count` bf16 values of a device buffer.
std::vector<float> decode_bf16(const DevBuf<float>& b, size_t count) {
  std::vector<uint16_t> h(count);
  cuda_ok(cudaMemcpy(h.data(), b.p, 2 * count, cudaMemcpyDeviceToHost), "download");
  std::vector<float> out(count);
  for (size_t i = 0; i < count; ++i) {
    const uint32_t bits = static_cast<uint32_t>(h[i]) << 16;
    std::memcpy(&out[i], &bits, 4);
  }
  return out;
}

TEST(DeltaCudaStateTiming, FamiliesSideBySide) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128;
  const int reps = static_cast<int>(env_or("LASP2_STATE_TIMING_REPS", 3));
  const char* names_env = std::getenv("LASP2_STATE_TIMING_VARIANTS");
  std::vector<std::string> names;
  {
    std::istringstream in(names_env != nullptr && *names_env ? names_env : "tile w8");
    for (std::string w; in >> w;) names.push_back(w);
  }
  ASSERT_FALSE(names.empty());
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      dout(1, T, H, D, type, Layout{});
  std::mt19937 rng(1);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);

  namespace gpu = delta::gpu;
  const gpu::Problem gp = gdn_problem(gdn_params(q, k, v, gb));
  const gpu::View dO = delta::cuda_route::view_of(dout.cview());
  const int64_t nck = gpu::chunk_count(gp), rows = H * nck * 64;
  DevBuf<float> w(rows * D / 2), uu(rows * D / 2), r(rows * D / 2), meta(2 * rows), vnew(rows * D / 2),
      st16(H * nck * D * D / 2), dh(H * nck * D * D / 2), A(H * D * D), M(H * D * D);
  const gpu::ChunkPrep prep{w.p, uu.p, meta.p};
  const gpu::ChunkPrep rprep{w.p, r.p, meta.p};
  gpu::launch_chunk_prep(gp, prep, nullptr);
  gpu::launch_chunk_rprep(gp, dO, rprep, nullptr);
  const std::vector<std::pair<const char*, std::function<void()>>> stages = {
      {"states", [&] {
         gpu::ChunkStatesOut so;
         so.v_new = vnew.p;
         so.states = st16.p;
         gpu::launch_chunk_states(gp, prep, so, nullptr);
       }},
      {"summary", [&] { gpu::launch_chunk_summary(gp, prep, {A.p, M.p, nullptr, nullptr}, nullptr); }},
      {"rstates", [&] {
         gpu::ChunkReverseOut ro;
         ro.dh = dh.p;
         gpu::launch_chunk_rstates(gp, dO, rprep, ro, nullptr);
       }},
  };
  LaunchTimer timer;
  std::vector<std::vector<float>> first;  // the first family's outputs
  for (const std::string& name : names) {
    const EnvGuard family("LASP2_DELTA_STATE_KERNEL", name.c_str());
    std::string line;
    for (const auto& [stage, launch] : stages) {
      char buf[80];
      std::snprintf(buf, sizeof(buf), "%s%s %.3f", line.empty() ? "" : ", ", stage, timer.median_ms(launch, reps));
      line += buf;
    }
    // head 0 of the 16-bit outputs (all chunks), every head of the maps
    const size_t head_rows = static_cast<size_t>(nck) * 64 * D, head_states = static_cast<size_t>(nck) * D * D;
    const std::vector<std::vector<float>> got = {decode_bf16(vnew, head_rows), decode_bf16(st16, head_states),
                                                 decode_bf16(dh, head_states), A.download(), M.download()};
    if (first.empty()) first = got;
    const char* out_names[] = {"v_new", "states", "dh", "A", "M"};
    for (size_t i = 0; i < got.size(); ++i) {
      int64_t bad = 0;
      const double rel = rel_err_f32(got[i], first[i], &bad);
      EXPECT_EQ(bad, 0) << name << " " << out_names[i] << " not finite";
      // 16-bit operands on a 1024-chunk chain, summed in another order: 5e-2 of the max
      EXPECT_LT(rel, 5e-2) << name << " " << out_names[i] << " against " << names[0];
      char buf[64];
      std::snprintf(buf, sizeof(buf), ", %s %.1e", out_names[i], rel);
      line += buf;
    }
    std::printf("[ timing ] state passes T=%lld H=16 D=128 bf16, %s (ms, median; max diff rel. to %s): %s\n",
                static_cast<long long>(T), name.c_str(), names[0].c_str(), line.c_str());
  }
}

// ---- timing: packed documents with their own states, chunked against recurrent --------
// One GDN layer at T = 64K (LASP2_DELTA_TIMING_T), H = 16, D = 128, bf16, documents of
// 1000 tokens (starting inside chunks) with initial states: the forward with them and
// part_summary with them and the end states asked for, on the chunked kernels with
// delta_chunk_docs.h's terms and on the recurrent ones (LASP2_DELTA_CHUNKED=0), the
// backward with initial states, end-state and initial-state gradients likewise, and the
// forward and backward without document states for reference (printed; asserts finite
// outputs).
TEST(DeltaCudaDocStatesTiming, GdnPackedOneDevice) {
  LASP2_SKIP_WITHOUT_CUDA();
  const int64_t T = env_or("LASP2_DELTA_TIMING_T", 65536), H = 16, D = 128, L = 1000;
  const ScalarType type = ScalarType::kBFloat16;
  DevTensor q(1, T, H, D, type, Layout{}), k(1, T, H, D, type, Layout{}), v(1, T, H, D, type, Layout{}),
      o(1, T, H, D, type, Layout{}), dout(1, T, H, D, type, Layout{}), dq(1, T, H, D, type, Layout{}),
      dk(1, T, H, D, type, Layout{}), dv(1, T, H, D, type, Layout{});
  std::mt19937 rng(3);
  upload_pattern(rng, {&q, &k, &v, &dout}, &k);
  const GatesBetas gb = random_gates(rng, T * H);
  const int64_t docs = (T + L - 1) / L;
  std::vector<uint8_t> start(T, 0);
  std::vector<int32_t> id(T, 0);
  for (int64_t t = 0; t < T; ++t) {
    start[t] = t % L == 0 ? 1 : 0;
    id[t] = static_cast<int32_t>(t / L);
  }
  DevBuf<uint8_t> d_start(T);
  DevBuf<int32_t> d_id(T);
  d_start.upload(start);
  d_id.upload(id);
  std::vector<float> init(docs * H * D * D);
  std::normal_distribution<float> normal(0.f, 0.3f);
  for (auto& e : init) e = normal(rng);
  DevBuf<float> d_init = to_device_f32(init), finals = zeroed(docs * H * D * D), d_final = to_device_f32(init),
                d_dinit = zeroed(docs * H * D * D), dg = zeroed(T * H), dbeta = zeroed(T * H);
  DevBuf<float> A(H * D * D), M(H * D * D), hA(H * D * D), hM(H * D * D);
  DeltaParams p = gdn_params(q, k, v, gb);
  p.doc_start = d_start.p;
  p.doc_id = d_id.p;
  p.doc_batch_stride = T;
  const DeltaKernelBackend& gpu = delta::delta_backend_for(Device::kCUDA);
  const TokenRange part{0, T};
  DocStates doc;
  doc.initial = d_init.p;
  DocStates sum_doc = doc;
  sum_doc.finals = finals.p;
  LaunchTimer timer;
  auto time_calls = [&](const char* what) {
    const float fwd = timer.median_ms([&] { gpu.forward(p, part, nullptr, doc, o.mview(), nullptr); }, 4);
    const auto ob = o.download();
    int64_t bad = 0;
    for (double x : ob.v) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": o";
    const float sum = timer.median_ms(
        [&] { gpu.part_summary(p, part, sum_doc, A.p, M.p, hA.p, hM.p, nullptr); }, 4);
    const std::vector<float> m = M.download();
    for (float x : m) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": M";
    DocStates bwd_doc = doc;
    bwd_doc.final_dstate = d_final.p;
    bwd_doc.d_initial = d_dinit.p;
    const float bwd = timer.median_ms(
        [&] {
          gpu.backward(p, part, dout.cview(), nullptr, nullptr, bwd_doc, dq.mview(), dk.mview(), dv.mview(), dg.p,
                       dbeta.p, nullptr, nullptr);
        },
        3);
    for (const DevTensor* t : {&dq})
      for (double x : t->download().v) bad += std::isfinite(x) ? 0 : 1;
    EXPECT_EQ(bad, 0) << what << ": dq";
    std::printf("[doc states T=%lld H=%lld D=%lld, %lld documents] %s: forward %.3f ms, part_summary %.3f ms, "
                "backward %.3f ms\n",
                static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(D),
                static_cast<long long>(docs), what, fwd, sum, bwd);
  };
  time_calls("chunked");
  {
    const EnvGuard off("LASP2_DELTA_CHUNKED", "0");
    time_calls("recurrent");
  }
  const float plain = timer.median_ms([&] { gpu.forward(p, part, nullptr, DocStates{}, o.mview(), nullptr); }, 4);
  const float plain_bwd = timer.median_ms(
      [&] {
        gpu.backward(p, part, dout.cview(), nullptr, nullptr, DocStates{}, dq.mview(), dk.mview(), dv.mview(), dg.p,
                     dbeta.p, nullptr, nullptr);
      },
      3);
  std::printf("[doc states T=%lld] chunked without document states: forward %.3f ms, backward %.3f ms\n",
              static_cast<long long>(T), plain, plain_bwd);
}

}  // namespace
}  // namespace lasp2::testing::delta_cuda
