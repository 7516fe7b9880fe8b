// The fused L2 norm's CUDA kernels (lasp2/qk_l2norm.h, cuda/l2norm_kernels.cu) against
// the formula in long double on the same (rounded) inputs: every dtype, head dims that
// take each kernel (16-byte vectors with groups of 4..32 lanes, single elements, the
// two-pass loop past the registers), q and k in different layouts (contiguous,
// Megatron's [T, B, H, D] order, padded rows that break the 16-byte alignment), zero
// rows, padding left untouched. With LASP2_L2NORM_BENCH=1, also the time of one fused
// forward and backward at B = 1, T = 64K, H = 16, D = 128 bf16 against a device copy of
// the same bytes (the memory floor).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "lasp2/qk_l2norm.h"

namespace lasp2 {
namespace {

bool has_gpu() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

void ok(cudaError_t e, const char* what) { ASSERT_EQ(e, cudaSuccess) << what << ": " << cudaGetErrorString(e); }

size_t esize(ScalarType t) { return t == ScalarType::kFloat64 ? 8 : t == ScalarType::kFloat32 ? 4 : 2; }

void encode(ScalarType t, double v, unsigned char* p) {
  switch (t) {
    case ScalarType::kFloat64: std::memcpy(p, &v, 8); return;
    case ScalarType::kFloat32: { const float f = static_cast<float>(v); std::memcpy(p, &f, 4); return; }
    case ScalarType::kFloat16: { const __half h = __float2half_rn(static_cast<float>(v)); std::memcpy(p, &h, 2); return; }
    case ScalarType::kBFloat16: {
      const __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(v));
      std::memcpy(p, &h, 2);
      return;
    }
  }
}

double decode(ScalarType t, const unsigned char* p) {
  switch (t) {
    case ScalarType::kFloat64: { double v; std::memcpy(&v, p, 8); return v; }
    case ScalarType::kFloat32: { float v; std::memcpy(&v, p, 4); return v; }
    case ScalarType::kFloat16: { __half h; std::memcpy(&h, p, 2); return __half2float(h); }
    case ScalarType::kBFloat16: { __nv_bfloat16 h; std::memcpy(&h, p, 2); return __bfloat162float(h); }
  }
  return 0;
}

// A [B, S, H, D] device tensor: tbhd memory order or not, `pad` elements after each row,
// `shift` elements before the first (both break 16-byte vectors). Poisoned with 0xFF.
struct DevT {
  ScalarType t;
  int64_t B, S, H, D, shift;
  BTHStrides st;
  size_t bytes;
  unsigned char* p = nullptr;
  DevT(ScalarType type, int64_t b, int64_t s, int64_t h, int64_t d, bool tbhd, int pad, int sh)
      : t(type), B(b), S(s), H(h), D(d), shift(sh) {
    const int64_t dp = d + pad;
    st = tbhd ? BTHStrides{h * dp, b * h * dp, dp} : BTHStrides{s * h * dp, h * dp, dp};
    bytes = static_cast<size_t>(b * s * h * dp + sh) * esize(t);
    if (cudaMalloc(&p, bytes) != cudaSuccess) p = nullptr;
    if (p) cudaMemset(p, 0xFF, bytes);
  }
  ~DevT() {
    if (p) cudaFree(p);
  }
  void* base() const { return p + shift * esize(t); }
  size_t at(int64_t b, int64_t s, int64_t h, int64_t d) const {
    return static_cast<size_t>(shift + st.offset(b, s, h) + d) * esize(t);
  }
  void upload(const std::vector<double>& v) {  // v in BSHD order
    std::vector<unsigned char> host(bytes, 0xFF);
    for (int64_t i = 0, b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d, ++i) encode(t, v[i], &host[at(b, s, h, d)]);
    cudaMemcpy(p, host.data(), bytes, cudaMemcpyHostToDevice);
  }
  // values in BSHD order; `untouched` counts non-row bytes that are no longer poison
  std::vector<double> download(int64_t* untouched) const {
    std::vector<unsigned char> host(bytes);
    cudaMemcpy(host.data(), p, bytes, cudaMemcpyDeviceToHost);
    std::vector<double> v;
    std::vector<char> row(bytes, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d) {
            v.push_back(decode(t, &host[at(b, s, h, d)]));
            for (size_t k = 0; k < esize(t); ++k) row[at(b, s, h, d) + k] = 1;
          }
    *untouched = 0;
    for (size_t i = 0; i < bytes; ++i) *untouched += !row[i] && host[i] != 0xFF;
    return v;
  }
};

std::vector<double> random_values(ScalarType t, size_t n, unsigned seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> dist(0.0, scale);
  std::vector<double> v(n);
  unsigned char buf[8];
  for (double& x : v) {
    encode(t, dist(gen), buf);
    x = decode(t, buf);  // representable in t: the reference sees what the kernel sees
  }
  return v;
}

struct Tol {
  double y, dx;
};

Tol tol_of(ScalarType t) {
  switch (t) {
    case ScalarType::kFloat64: return {1e-14, 1e-12};
    case ScalarType::kFloat32: return {1e-6, 1e-5};
    case ScalarType::kFloat16: return {1e-3, 4e-3};
    case ScalarType::kBFloat16: return {8e-3, 3e-2};
  }
  return {0, 0};
}

void run_case(ScalarType type, int64_t D, int layout) {
  const int64_t B = 2, S = 5, H = 3, rows = B * S * H;
  const size_t n = static_cast<size_t>(rows * D);
  const std::string what = std::string(to_string(type)) + " D=" + std::to_string(D) + " layout=" +
                           std::to_string(layout);
  // layout 0: both contiguous; 1: q tbhd, k padded; 2: q shifted by one element, k tbhd
  DevT q(type, B, S, H, D, layout == 1, 0, layout == 2 ? 1 : 0), k(type, B, S, H, D, layout == 2, layout == 1 ? 1 : 0, 0);
  DevT yq(type, B, S, H, D, layout == 2, 0, 0), yk(type, B, S, H, D, false, layout == 1 ? 3 : 0, 0);
  DevT dyq(type, B, S, H, D, false, 0, 0), dyk(type, B, S, H, D, layout == 1, 0, layout == 2 ? 1 : 0);
  DevT dq(type, B, S, H, D, layout == 1, 0, 0), dk(type, B, S, H, D, false, layout == 2 ? 2 : 0, 0);
  const size_t acc = type == ScalarType::kFloat64 ? 8 : 4;
  void *rq = nullptr, *rk = nullptr;
  ok(cudaMalloc(&rq, rows * acc), "rstd");
  ok(cudaMalloc(&rk, rows * acc), "rstd");
  std::vector<double> hq = random_values(type, n, 11 + static_cast<unsigned>(D), 1.0);
  std::vector<double> hk = random_values(type, n, 12 + static_cast<unsigned>(D), 3.0);
  for (int64_t d = 0; d < D; ++d) hq[static_cast<size_t>(7 * D + d)] = 0;  // a zero row
  std::vector<double> hdq = random_values(type, n, 13, 1.0), hdk = random_values(type, n, 14, 1.0);
  q.upload(hq);
  k.upload(hk);
  dyq.upload(hdq);
  dyk.upload(hdk);

  L2NormForwardArgs f;
  f.shape = {type, B, S, H, D};
  f.eps = 1e-6;
  f.count = 2;
  f.t[0] = {{q.base(), q.st}, {yq.base(), yq.st}, rq};
  f.t[1] = {{k.base(), k.st}, {yk.base(), yk.st}, rk};
  l2norm_forward(Device::kCUDA, f, nullptr);
  L2NormBackwardArgs g;
  g.shape = f.shape;
  g.count = 2;
  g.t[0] = {{dyq.base(), dyq.st}, {yq.base(), yq.st}, rq, {dq.base(), dq.st}};
  g.t[1] = {{dyk.base(), dyk.st}, {yk.base(), yk.st}, rk, {dk.base(), dk.st}};
  l2norm_backward(Device::kCUDA, g, nullptr);
  ok(cudaDeviceSynchronize(), "kernels");

  const Tol tol = tol_of(type);
  struct Side {
    const std::vector<double>& x;
    const std::vector<double>& dy;
    DevT& y;
    DevT& dx;
    void* r;
  };
  for (Side s : {Side{hq, hdq, yq, dq, rq}, Side{hk, hdk, yk, dk, rk}}) {
    int64_t clobbered = 0, c2 = 0;
    const std::vector<double> y = s.y.download(&clobbered), dx = s.dx.download(&c2);
    EXPECT_EQ(clobbered + c2, 0) << what << ": bytes outside the rows written";
    std::vector<unsigned char> rh(rows * acc);
    cudaMemcpy(rh.data(), s.r, rows * acc, cudaMemcpyDeviceToHost);
    double err_y = 0, err_dx = 0, err_r = 0;
    for (int64_t row = 0; row < rows; ++row) {
      long double ss = 0, dot = 0;
      for (int64_t d = 0; d < D; ++d) {
        const long double x = s.x[row * D + d];
        ss += x * x;
        dot += x * static_cast<long double>(s.dy[row * D + d]);
      }
      const long double eps = type == ScalarType::kFloat64 ? 1e-6L : static_cast<long double>(1e-6f);
      const long double r = 1.0L / std::sqrt(ss + eps);
      const double got_r = acc == 8 ? decode(ScalarType::kFloat64, &rh[row * 8]) : decode(ScalarType::kFloat32, &rh[row * 4]);
      err_r = std::max(err_r, static_cast<double>(std::fabs(got_r - r) / r));
      long double scale = 0;
      for (int64_t d = 0; d < D; ++d) scale = std::max(scale, std::fabs(r * s.dy[row * D + d]));
      for (int64_t d = 0; d < D; ++d) {
        const size_t i = static_cast<size_t>(row * D + d);
        const long double x = s.x[i];
        const long double want_dx = r * s.dy[i] - r * r * r * x * dot;
        err_y = std::max(err_y, static_cast<double>(std::fabs(y[i] - x * r)));
        err_dx = std::max(err_dx, static_cast<double>(std::fabs(dx[i] - want_dx) / scale));
      }
    }
    EXPECT_LT(err_y, tol.y) << what << ": y";
    EXPECT_LT(err_dx, tol.dx) << what << ": dx (relative to rstd |dy|)";
    EXPECT_LT(err_r, type == ScalarType::kFloat64 ? 1e-14 : 1e-6) << what << ": rstd";
  }
  cudaFree(rq);
  cudaFree(rk);
}

TEST(QkL2NormCuda, MatchesFormula) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  for (ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat16, ScalarType::kFloat32, ScalarType::kFloat64})
    for (int64_t D : {1, 7, 16, 64, 128, 256, 300, 520})
      for (int layout : {0, 1, 2}) run_case(t, D, layout);
}

TEST(QkL2NormCuda, Timing) {
  if (!has_gpu()) GTEST_SKIP() << "no CUDA device";
  if (!std::getenv("LASP2_L2NORM_BENCH")) GTEST_SKIP() << "set LASP2_L2NORM_BENCH=1";
  const int64_t T = 65536, H = 16, D = 128, n = T * H * D;
  const ScalarType bf16 = ScalarType::kBFloat16;
  std::vector<void*> buf(8);
  for (void*& p : buf) ok(cudaMalloc(&p, n * 2), "alloc");
  void *rq, *rk;
  ok(cudaMalloc(&rq, T * H * 4), "alloc");
  ok(cudaMalloc(&rk, T * H * 4), "alloc");
  for (void* p : buf) cudaMemset(p, 0x3C, n * 2);  // bf16 0x3C3C ~ 0.0115: finite rows
  const BTHStrides st{T * H * D, H * D, D};
  L2NormForwardArgs f;
  f.shape = {bf16, 1, T, H, D};
  f.count = 2;
  f.t[0] = {{buf[0], st}, {buf[2], st}, rq};
  f.t[1] = {{buf[1], st}, {buf[3], st}, rk};
  L2NormBackwardArgs g;
  g.shape = f.shape;
  g.count = 2;
  g.t[0] = {{buf[4], st}, {buf[2], st}, rq, {buf[6], st}};
  g.t[1] = {{buf[5], st}, {buf[3], st}, rk, {buf[7], st}};
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  auto time = [&](auto&& fn) {
    for (int i = 0; i < 3; ++i) fn();
    cudaEventRecord(a);
    const int reps = 20;
    for (int i = 0; i < reps; ++i) fn();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    return ms / reps;
  };
  const double mib = static_cast<double>(n) * 2 / (1 << 20);  // one tensor
  const float fwd = time([&] { l2norm_forward(Device::kCUDA, f, nullptr); });
  const float bwd = time([&] { l2norm_backward(Device::kCUDA, g, nullptr); });
  // the floor: a device copy of 2 tensors (reads 2, writes 2: the forward's traffic)
  const float copy = time([&] {
    cudaMemcpyAsync(buf[2], buf[0], n * 2, cudaMemcpyDeviceToDevice);
    cudaMemcpyAsync(buf[3], buf[1], n * 2, cudaMemcpyDeviceToDevice);
  });
  ok(cudaGetLastError(), "timing");
  const double fwd_gb = 4 * mib / 1024 / (fwd / 1e3), bwd_gb = 6 * mib / 1024 / (bwd / 1e3);
  const double copy_gb = 4 * mib / 1024 / (copy / 1e3);
  std::printf("L2NORM_BENCH B=1 T=%lld H=%lld D=%lld bf16 q+k: forward %.3f ms (%.0f GiB/s moved), backward %.3f ms "
              "(%.0f GiB/s), device copy of q+k %.3f ms (%.0f GiB/s)\n",
              static_cast<long long>(T), static_cast<long long>(H), static_cast<long long>(D), fwd, fwd_gb, bwd,
              bwd_gb, copy, copy_gb);
  for (void* p : buf) cudaFree(p);
  cudaFree(rq);
  cudaFree(rk);
}

}  // namespace
}  // namespace lasp2
