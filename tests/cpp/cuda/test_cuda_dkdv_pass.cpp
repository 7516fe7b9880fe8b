// The dk / dv pass of the scalar family's CUDA kernels (tc_dkdv.cu): its row tiles' edge
// cases, its two copy paths and its staged stores, against the CPU backend and bit for bit
// against each other.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "cuda_op_case.h"
#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/kernel_backend.h"
#include "../problem.h"

// csrc/core/cuda/launch.h (not a public header): which dk/dv kernel ran last, 0 cp.async,
// 1 tensor-map copies, 2 those with the staged dk / dv stores (StagedStoreSameBits)
namespace lasp2::cuda {
int tc_dkdv_last_kernel();
}  // namespace lasp2::cuda

namespace lasp2::testing {
namespace {

// ---- the dk/dv kernel's 32-row warps at tile D = 128 (tc_dkdv.cu RM = 2) ----------------
// Edge cases of its row tiles against the CPU backend in float64, run twice (bitwise
// reproducible): the tile's full width and forced 2-chunk segments with documents, a
// partial last chunk, dims below the tile (dk = 72: a warp whose second m16 tile lies
// past dk; dv = 40 and 64: warps with no dv row), fixed and no decay, fp16, the backend's
// own segments at T = 4109 and a [T, B, H, D] view with padded heads. q.dq is random (the
// pass only reads it). On an H200 (session 12) these cases also gave dk, dv and dg equal
// bit for bit to the 16-row-warp kernel of sessions 4-11, which was then removed.
// cp_async_too: also run with LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernel, the
// fallback of the default tensor-map copies, session 16), whose dk, dv and dg must equal
// the default's bit for bit and, like it, the CPU's.
// One dk/dv pass problem (tests below): the inputs on the device, the CPU backend's
// float64 dk, dv and dg for them, and run(), the CUDA backend's pass under one knob
// setting. seed: the problem's (make_problem), vec_seed: the first of the three random
// vectors' (the entering dS state, the dg offsets, q.dq: random, the pass only reads it).
struct DkdvRun {
  struct Out {
    DevTensor dk, dv;
    DevBuf<float> dg;
    int kernel;  // tc_dkdv_last_kernel() after the launch
  };

  DkdvRun(const OpCase& c, uint32_t seed, uint64_t vec_seed)
      : c(c), pr(make_problem(c, seed + static_cast<uint32_t>(c.T))), dp(pr, c.dtype, c.layout),
        part{c.begin, c.end}, scalars(c.B * c.T * c.H) {
    const AttentionParams pc = pr.params();
    const std::vector<double> d0 = random_vec(pc.bh() * pc.state_elems(), vec_seed, 0.5),
                              off = random_vec(pc.bh(), vec_seed + 1, 1.0),
                              qdq = random_vec(scalars, vec_seed + 2, 1.0);
    D0.assign(d0.begin(), d0.end());
    dgoff.assign(off.begin(), off.end());
    const std::vector<float> qdqf(qdq.begin(), qdq.end());
    D0d = to_device_f32(D0);
    dgoffd = to_device_f32(dgoff);
    qdqd = to_device_f32(qdqf);
    want_dk = pr.zeros_like_k();
    want_dv = pr.zeros_like_v();
    want_dg.assign(scalars, 0.0);
    cpu_backend().chunk_backward_dkdv(pc, part, pr.dout_view(), D0.data(), {want_dk.data(), pr.strides(c.dk)},
                                      {want_dv.data(), pr.strides(c.dv)}, qdq.data(), dgoff.data(),
                                      want_dg.data(), nullptr);
  }

  Out run(const char* knob, const char* value) const {
    EnvGuard k(knob, value);
    Out o{dp.like_k(), dp.like_v(), DevBuf<float>(scalars), -1};
    o.dg.poison();  // dk, dv come poisoned: elements the stores miss fail expect_rows
    cuda_backend().chunk_backward_dkdv(dp.p, part, dp.dout.cview(), D0d.p, o.dk.mview(), o.dv.mview(), qdqd.p,
                                       dgoffd.p, o.dg.p, nullptr);
    cuda_ok(cudaDeviceSynchronize(), "dkdv");
    o.kernel = lasp2::cuda::tc_dkdv_last_kernel();
    return o;
  }

  // b's dk, dv and dg bit for bit a's (what: the setting that gave b)
  static void expect_same_bits(const Out& a, const Out& b, const std::string& what) {
    EXPECT_EQ(b.dk.buf.download(), a.dk.buf.download()) << "dk: " << what;
    EXPECT_EQ(b.dv.buf.download(), a.dv.buf.download()) << "dv: " << what;
    EXPECT_EQ(float_bits(b.dg.download()), float_bits(a.dg.download())) << "dg: " << what;
  }

  void expect_matches_cpu(const Out& r, const std::string& tag) const {
    const double tol = tol_of(c.dtype);
    expect_rows(c, ("dk_" + tag).c_str(), r.dk, want_dk, tol);
    expect_rows(c, ("dv_" + tag).c_str(), r.dv, want_dv, tol);
    expect_scalars(c, ("dg_" + tag).c_str(), r.dg, want_dg, tol_dg(c.dtype, c.end - c.begin));
  }

  OpCase c;
  Problem<double> pr;
  DeviceProblem dp;
  TokenRange part;
  int64_t scalars;
  std::vector<float> D0, dgoff;
  DevBuf<float> D0d, dgoffd, qdqd;
  std::vector<double> want_dk, want_dv, want_dg;
};

void run_dkdv_rows_case(const OpCase& c, bool cp_async_too = false) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  const DkdvRun r(c, 3000, 31);
  // the default copy path (tensor maps on sm_90), the knob explicitly unset
  const DkdvRun::Out a = r.run("LASP2_CUDA_TILE_COPY", ""), b = r.run("LASP2_CUDA_TILE_COPY", "");
  DkdvRun::expect_same_bits(a, b, "not reproducible");
  r.expect_matches_cpu(a, "rows32");
  if (cp_async_too) {
    const DkdvRun::Out o = r.run("LASP2_CUDA_TILE_COPY", "cp_async");
    DkdvRun::expect_same_bits(a, o, "LASP2_CUDA_TILE_COPY=cp_async differs");
    r.expect_matches_cpu(o, "rows32_cp_async");
  }
}

TEST(CudaDkdvKernel, Rows32EdgeCasesMatchCpu) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  std::vector<OpCase> cases = {make("r32_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               make("r32_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128),
                               make("r32_bf16_none_dk72_dv40", ScalarType::kBFloat16, DecayMode::kNone, 72, 40),
                               make("r32_fp16_gate_dk128_dv64", ScalarType::kFloat16, DecayMode::kGate, 128, 64),
                               make("r32_bf16_gate_dk96_dv128", ScalarType::kBFloat16, DecayMode::kGate, 96, 128)};
  OpCase c = make("r32_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back(with_auto_segments(c));
  cases.push_back(
      as_padded_tbhd(make("r32_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128)));
  for (const OpCase& x : cases) run_dkdv_rows_case(x);
}

// tc_dkdv_kernel's two copy paths (session 16): the default (tensor-map copies on sm_90)
// against LASP2_CUDA_TILE_COPY=cp_async (the cp.async kernel), bit for bit, and both
// against the CPU backend: tile widths 128 and 64, gates with documents, fixed decay, the
// partial last chunk of part [37, 1000), dims below the tile (zero-filled columns), a
// [T, B, H, D] view with padded heads (row stride not H * D), and the backend's own
// segments at T = 4109 (full chunks: the cp.async kernel's fast copy path). Without an
// sm_90 device both runs take the cp.async kernel and the comparison holds trivially; the
// CPU comparisons still run.
TEST(CudaDkdvKernel, TmaCopySameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  std::vector<OpCase> cases = {make("cv_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128),
                               make("cv_bf16_fixed_D128", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128),
                               make("cv_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128),
                               make("cv_bf16_gate_D64_docs", ScalarType::kBFloat16, DecayMode::kGate, 64, 64),
                               make("cv_bf16_fixed_D64", ScalarType::kBFloat16, DecayMode::kFixed, 64, 64),
                               make("cv_bf16_gate_dk96_dv72", ScalarType::kBFloat16, DecayMode::kGate, 96, 72)};
  OpCase c = make("cv_bf16_fixed_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128);
  cases.push_back(with_auto_segments(c));
  c = make("cv_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back(with_auto_segments(c));
  c = make("cv_bf16_gate_D64_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 64, 64);
  cases.push_back(with_auto_segments(c));
  cases.push_back(
      as_padded_tbhd(make("cv_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128)));
  for (const OpCase& x : cases)
    if (selected_by_env(x)) run_dkdv_rows_case(x, true);
}

// ---- the dk/dv pass's staged tensor-map stores (tc_dkdv.cu kStore, session 17) ----------
// The default (each chunk's dk and dv tiles staged in shared memory by stmatrix.trans and
// written by one tensor-map store each, the copy engine clipping them to the part's tokens
// and the view's dims; D = 128 tiles only) against LASP2_CUDA_DKDV_STORE=direct (per-thread
// movmatrix + stores), bit for bit in dk, dv and dg (the same values, only how they reach
// memory differs), and against the CPU backend (float64). On an sm_90 device the test also
// checks which kernel ran: the staged one at tile D = 128 by default, the direct tensor-map
// kernel at D = 64 (no staged form there) and under the knob. The cases: parts [37, 1000)
// (the last chunk partial: the store must clip its rows; 2-chunk segments, so several stores
// in flight per block over the walk), gates with documents, fixed and no decay, fp16, dk != dv
// (96 / 72: both maps clip columns; 128 / 64 and 72 / 40: warps that stage no dv rows, their
// rows of the staging tile stale and outside the map), the backend's own segments at
// T = 4109 (full chunks, many chunks per block) and a [T, B, H, D] view with padded heads
// (row stride not H * D). Without an sm_90 device every run takes the cp.async kernel.
void run_dkdv_store_case(const OpCase& c, int tile_d) {
  SCOPED_TRACE(c.name);
  const CaseKnobs knobs(c);
  EnvGuard copy("LASP2_CUDA_TILE_COPY", "");
  const DkdvRun r(c, 4000, 41);
  const DkdvRun::Out a = r.run("LASP2_CUDA_DKDV_STORE", "direct"), s = r.run("LASP2_CUDA_DKDV_STORE", "");
  int dev = 0, major = 0;
  cuda_ok(cudaGetDevice(&dev), "device");
  cuda_ok(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev), "compute capability");
  if (major == 9) {
    EXPECT_EQ(a.kernel, 1) << "LASP2_CUDA_DKDV_STORE=direct: not the tensor-map kernel";
    EXPECT_EQ(s.kernel, tile_d == 128 ? 2 : 1) << "default: unexpected kernel";
  }
  DkdvRun::expect_same_bits(a, s, "the staged stores differ from the direct ones");
  r.expect_matches_cpu(a, "direct");
  r.expect_matches_cpu(s, "staged");
}

TEST(CudaDkdvKernel, StagedStoreSameBits) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto make = walking_edge_case;
  struct Case {
    OpCase c;
    int tile_d;
  };
  std::vector<Case> cases = {{make("st_bf16_gate_D128_docs", ScalarType::kBFloat16, DecayMode::kGate, 128, 128), 128},
                             {make("st_bf16_fixed_D128", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128), 128},
                             {make("st_fp16_fixed_D128", ScalarType::kFloat16, DecayMode::kFixed, 128, 128), 128},
                             {make("st_bf16_gate_dk96_dv72", ScalarType::kBFloat16, DecayMode::kGate, 96, 72), 128},
                             {make("st_fp16_gate_dk128_dv64", ScalarType::kFloat16, DecayMode::kGate, 128, 64), 128},
                             {make("st_bf16_none_dk72_dv40", ScalarType::kBFloat16, DecayMode::kNone, 72, 40), 128},
                             {make("st_bf16_gate_D64_docs", ScalarType::kBFloat16, DecayMode::kGate, 64, 64), 64}};
  OpCase c = make("st_bf16_gate_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kGate, 128, 128);
  cases.push_back({with_auto_segments(c), 128});
  c = make("st_bf16_fixed_D128_T4109_auto", ScalarType::kBFloat16, DecayMode::kFixed, 128, 128);
  cases.push_back({with_auto_segments(c), 128});
  cases.push_back(
      {as_padded_tbhd(make("st_bf16_gate_D128_TBHD_pad8", ScalarType::kBFloat16, DecayMode::kGate, 128, 128)), 128});
  for (const Case& x : cases)
    if (selected_by_env(x.c)) run_dkdv_store_case(x.c, x.tile_d);
}

}  // namespace
}  // namespace lasp2::testing
