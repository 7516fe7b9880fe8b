// Pins the wgmma operand forms the sm_90a kernels use (no-swizzle core-matrix
// layouts, K-major and MN-major A and B from shared memory, A from registers)
// against a CPU product, with the descriptor's LBO/SBO as wgmma.cuh defines them.
// (H200, 2026-12-02: every form matches to 8e-8; with LBO and SBO exchanged the
// K-major form is wrong and the MN-major one reads out of bounds.)
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc/core/cuda \
//        benchmarks/kernel/wgmma_probe.cu -o wgmma_probe && ./wgmma_probe
// Prints one line per form: max |D - ref| / max |ref|; exit 1 if a form fails.
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <vector>

#include "wgmma.cuh"

using namespace lasp2::cuda;
using bf16 = __nv_bfloat16;

constexpr int M = 64, N = 128, K = 64;

// form: 0 A K / B K, 1 A MN / B MN, 2 A K / B MN, 3 A regs / B MN, 4 A regs / B K,
// 5 n64: A K / B K (first 64 columns of B)
__global__ void probe(const float* A, const float* B, float* D, int form, int swap) {
  __shared__ __align__(128) bf16 As[M * K];
  __shared__ __align__(128) bf16 Bs[K * N];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const bool amn = form == 1, bmn = form == 1 || form == 2 || form == 3;
  for (int i = tid; i < M * K; i += 128) {
    const int m = i / K, k = i % K;
    const int off = amn ? cm_offset(k, m, M) : cm_offset(m, k, K);
    As[off / 2] = __float2bfloat16(A[i]);
  }
  for (int i = tid; i < K * N; i += 128) {
    const int k = i / N, n = i % N;
    const int off = bmn ? cm_offset(k, n, N) : cm_offset(n, k, K);
    Bs[off / 2] = __float2bfloat16(B[i]);
  }
  fence_proxy_async();
  __syncthreads();
  float d[64];
  float d64[32];
  for (int i = 0; i < 64; ++i) d[i] = 0.f;
  for (int i = 0; i < 32; ++i) d64[i] = 0.f;
  // K step (LBO) and M/N step (SBO) in bytes, per operand
  const uint32_t a_lbo = amn ? (M / 8) * 128 : 128, a_sbo = amn ? 128 : (K / 8) * 128;
  const uint32_t b_lbo = bmn ? (N / 8) * 128 : 128, b_sbo = bmn ? 128 : (K / 8) * 128;
  wg_fence();
  for (int kk = 0; kk < K / 16; ++kk) {
    const char* ap = reinterpret_cast<const char*>(As) + 2 * kk * a_lbo;
    const char* bp = reinterpret_cast<const char*>(Bs) + 2 * kk * b_lbo;
    const uint64_t da = swap ? wg_desc(ap, a_sbo, a_lbo) : wg_desc(ap, a_lbo, a_sbo);
    const uint64_t db = swap ? wg_desc(bp, b_sbo, b_lbo) : wg_desc(bp, b_lbo, b_sbo);
    if (form == 0) Wgmma<bf16, 128>::ss<0, 0>(d, da, db, 1);
    else if (form == 1) Wgmma<bf16, 128>::ss<1, 1>(d, da, db, 1);
    else if (form == 2) Wgmma<bf16, 128>::ss<0, 1>(d, da, db, 1);
    else if (form == 5) Wgmma<bf16, 64>::ss<0, 0>(d64, da, db, 1);
    else {
      uint32_t a[4];
      const int r = 16 * warp + (lane >> 2), c = 16 * kk + 2 * (lane & 3);
      a[0] = pack2<bf16>(A[r * K + c], A[r * K + c + 1]);
      a[1] = pack2<bf16>(A[(r + 8) * K + c], A[(r + 8) * K + c + 1]);
      a[2] = pack2<bf16>(A[r * K + c + 8], A[r * K + c + 9]);
      a[3] = pack2<bf16>(A[(r + 8) * K + c + 8], A[(r + 8) * K + c + 9]);
      if (form == 3) Wgmma<bf16, 128>::rs<1>(d, a, db, 1);
      else Wgmma<bf16, 128>::rs<0>(d, a, db, 1);
    }
  }
  wg_commit();
  wg_wait<0>();
  const int nn = form == 5 ? 64 : 128;
  for (int j = 0; j < nn / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int r = 16 * warp + (lane >> 2) + 8 * (e >> 1), c = 8 * j + 2 * (lane & 3) + (e & 1);
      D[r * N + c] = form == 5 ? d64[4 * j + e] : d[4 * j + e];
    }
}

int main() {
  std::vector<float> A(M * K), B(K * N), D(M * N), R(M * N);
  srand(7);
  for (auto& x : A) x = __bfloat162float(__float2bfloat16(static_cast<float>(rand()) / RAND_MAX * 2.f - 1.f));
  for (auto& x : B) x = __bfloat162float(__float2bfloat16(static_cast<float>(rand()) / RAND_MAX * 2.f - 1.f));
  for (int m = 0; m < M; ++m)
    for (int n = 0; n < N; ++n) {
      double s = 0;
      for (int k = 0; k < K; ++k) s += static_cast<double>(A[m * K + k]) * B[k * N + n];
      R[m * N + n] = static_cast<float>(s);
    }
  float *dA, *dB, *dD;
  cudaMalloc(&dA, A.size() * 4);
  cudaMalloc(&dB, B.size() * 4);
  cudaMalloc(&dD, D.size() * 4);
  cudaMemcpy(dA, A.data(), A.size() * 4, cudaMemcpyHostToDevice);
  cudaMemcpy(dB, B.data(), B.size() * 4, cudaMemcpyHostToDevice);
  const char* names[] = {"A K  / B K ", "A MN / B MN", "A K  / B MN", "A reg/B MN ", "A reg/B K  ",
                         "n64 A K/B K"};
  int bad = 0;
  for (int form = 0; form < 6; ++form)
    for (int swap = 0; swap < 1; ++swap) {
      cudaMemset(dD, 0xFF, D.size() * 4);
      probe<<<1, 128>>>(dA, dB, dD, form, swap);
      cudaError_t e = cudaDeviceSynchronize();
      if (e != cudaSuccess) {
        printf("form %d swap %d: CUDA error %s\n", form, swap, cudaGetErrorString(e));
        return 2;
      }
      cudaMemcpy(D.data(), dD, D.size() * 4, cudaMemcpyDeviceToHost);
      const int nn = form == 5 ? 64 : 128;
      double err = 0, ref = 0;
      for (int m = 0; m < M; ++m)
        for (int n = 0; n < nn; ++n) {
          const double x = D[m * N + n], y = R[m * N + n];
          err = std::fmax(err, std::isfinite(x) ? std::fabs(x - y) : 1e30);
          ref = std::fmax(ref, std::fabs(y));
        }
      const double rel = err / ref;
      const bool ok = rel < 1e-5;
      printf("wgmma probe %s: rel err %.2e %s\n", names[form], rel, ok ? "ok" : "WRONG");
      if (!swap && !ok) ++bad;
    }
  return bad ? 1 : 0;
}
