// GDN's prep and rprep kernels (delta_chunk.h): the defaults against the twelfth round's,
// bit for bit.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_device_problem.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_test_util.h"
#include "gdn_layer.h"

namespace lasp2::testing::delta_cuda {
namespace {

// prep's and rprep's thirteenth-round kernels (the defaults: prep's w and u through
// shared memory in 16-byte stores, the balanced inverse merge, T's copy in pairs; rprep
// with P^T in registers) against the twelfth round's (LASP2_DELTA_PREP_KERNEL=old,
// LASP2_DELTA_RPREP_KERNEL=old): the same products in the same order, so w, u, meta, T
// and r must be equal bit for bit. bf16 and fp16, d = 64 and 128, two batch rows with
// packed documents (one on a chunk's first token) and -inf gates (inside a chunk and on a
// chunk's first token), a part from token 37 to 280 (chunks from 37, 101, 165 and 229;
// the last one partial). The upper triangle of T and the pairs across document starts
// are zero: a tenth of each buffer's words at least must be non-zero.
TEST(DeltaCudaPrep, NewEqualsOld) {
  LASP2_SKIP_WITHOUT_CUDA();
  namespace gpu = delta::gpu;
  for (const ScalarType type : {ScalarType::kBFloat16, ScalarType::kFloat16})
    for (const int d : {64, 128}) {
      SCOPED_TRACE(std::string(dtype_name(type)) + " d=" + std::to_string(d));
      DeltaSpec spec = gdn_spec(d, 300, 2);
      spec.doc_starts = {5, 64, 65, 130, 201, 229};
      DeltaProblem<float> pr(spec, 47);
      forget_at(pr, {120, 165});  // inside chunk 1; chunk 2's first token
      prepare_inputs(pr, type);
      DeltaDeviceProblem dev(pr, type, Layout{});
      gpu::Problem gp = gdn_problem(dev.p);
      gp.batch = static_cast<int>(spec.batch);
      gp.elem = type == ScalarType::kFloat16 ? gpu::Elem::kF16 : gpu::Elem::kBF16;
      gp.doc_start = dev.p.doc_start;
      gp.doc_sb = dev.p.doc_batch_stride;
      gp.begin = 37;
      gp.n = 280 - 37;
      ASSERT_NE(gp.doc_start, nullptr);
      const gpu::View dO = delta::cuda_route::view_of(dev.dout.cview());
      const int64_t rows = gp.bh() * gpu::chunk_count(gp) * 64;
      auto run = [&](const char* prep_kernel, const char* rprep_kernel) {
        const EnvGuard a("LASP2_DELTA_PREP_KERNEL", prep_kernel), b("LASP2_DELTA_RPREP_KERNEL", rprep_kernel);
        DevBuf<float> w(rows * d / 2), u(rows * d / 2), r(rows * d / 2), meta(2 * rows), t(rows * 64 / 2);
        for (DevBuf<float>* x : {&w, &u, &r, &meta, &t}) x->poison();
        gpu::ChunkPrep prep{w.p, u.p, meta.p};
        prep.t = t.p;
        gpu::launch_chunk_prep(gp, prep, nullptr);
        gpu::launch_chunk_rprep(gp, dO, gpu::ChunkPrep{w.p, r.p, meta.p}, nullptr);
        cuda_ok(cudaDeviceSynchronize(), "prep and rprep");
        std::vector<std::vector<float>> out;
        for (DevBuf<float>* x : {&w, &u, &r, &meta, &t}) out.push_back(x->download());
        return out;
      };
      const auto old = run("old", "old");
      for (const char* kernel : {"", "new"}) {  // the default unset and named
        SCOPED_TRACE(*kernel ? kernel : "(default)");
        const auto got = run(kernel, kernel);
        const char* names[] = {"w", "u", "r", "meta", "T"};
        for (size_t i = 0; i < old.size(); ++i) {
          ASSERT_EQ(old[i].size(), got[i].size());
          int64_t differ = 0, written = 0, nonzero = 0;
          for (size_t e = 0; e < old[i].size(); ++e) {
            uint32_t a = 0, b = 0;
            std::memcpy(&a, &old[i][e], 4);
            std::memcpy(&b, &got[i][e], 4);
            differ += a != b;
            written += b != 0xFFFFFFFFu;
            nonzero += b != 0u;
          }
          EXPECT_EQ(differ, 0) << names[i] << ": of " << old[i].size() << " words";
          EXPECT_EQ(written, static_cast<int64_t>(old[i].size())) << names[i] << ": every word written";
          EXPECT_GT(nonzero, static_cast<int64_t>(old[i].size()) / 10) << names[i];
        }
      }
    }
}

}  // namespace
}  // namespace lasp2::testing::delta_cuda
