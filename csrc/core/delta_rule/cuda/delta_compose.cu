// The segment composition and the map combines of the delta-rule CUDA backend (see
// delta_launch.h): fp32 products of the [dk][dk] segment maps A with [dk][dv] states or
// map columns, chaining the segments of a part (prefix, suffix, summary) after the
// recurrent walks (delta_recurrent.cu) have summarised each one, and two combines of
// fp32 state arrays (apply_map: out = A x + y or out += A^T x; add: dst += src).
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "delta_rule/cuda/delta_documents.cuh"
#include "delta_rule/cuda/delta_launch.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- composition over segments --------------------------------------------------------------
constexpr int kComposeCols = 32, kComposeThreads = 256;
constexpr int kComposeRows = kMaxDim / (kComposeThreads / kComposeCols);  // rows per thread

__global__ void __launch_bounds__(kComposeThreads) compose_kernel(Problem p, ComposeArgs a) {
  __shared__ float X[kMaxDim][kComposeCols];
  const int c = threadIdx.x % kComposeCols, rb = threadIdx.x / kComposeCols;
  constexpr int RS = kComposeThreads / kComposeCols;  // row stride
  const int dk = p.dk, dv = p.dv;
  const bool summary = a.mode == ComposeMode::kSummary;
  const int ncols = summary ? dk + dv : dv;
  const int col = blockIdx.x * kComposeCols + c;
  const bool valid = col < ncols;
  const int64_t bhi = blockIdx.y, bh = p.bh();
  const int b = static_cast<int>(bhi / p.heads), h = static_cast<int>(bhi % p.heads);
  const int64_t me = static_cast<int64_t>(dk) * dk, se = static_cast<int64_t>(dk) * dv;
  const bool is_map = summary && col < dk;
  const int mcol = summary ? col - dk : col;  // column in a [dk][dv] array

  for (int k = 0; k < kComposeRows; ++k) {
    const int i = rb + RS * k;
    if (i >= dk) break;
    float x = 0.f;
    if (summary) {
      x = (is_map && i == col) ? 1.f : 0.f;
    } else if (a.init != nullptr && valid) {
      x = a.init[bhi * se + static_cast<int64_t>(i) * dv + col];
    }
    X[i][c] = x;
  }
  __syncthreads();

  // acc = Op X (+ add): Op = A (rows i) or A^T; add a [dk][dv] array at column mcol.
  auto apply = [&](const float* A, bool transposed, const float* add, float (&acc)[kComposeRows]) {
    for (int k = 0; k < kComposeRows; ++k) {
      const int i = rb + RS * k;
      if (i >= dk) break;
      float s0 = 0.f, s1 = 0.f;
      if (transposed) {
        for (int m = 0; m < dk; m += 2) {
          s0 += A[static_cast<int64_t>(m) * dk + i] * X[m][c];
          if (m + 1 < dk) s1 += A[static_cast<int64_t>(m + 1) * dk + i] * X[m + 1][c];
        }
      } else {
        const float* row = A + static_cast<int64_t>(i) * dk;
        for (int m = 0; m < dk; m += 2) {
          s0 += row[m] * X[m][c];
          if (m + 1 < dk) s1 += row[m + 1] * X[m + 1][c];
        }
      }
      float s = s0 + s1;
      if (add != nullptr && valid && !is_map && mcol >= 0 && mcol < dv)
        s += add[static_cast<int64_t>(i) * dv + mcol];
      acc[k] = s;
    }
  };
  auto write = [&](float* base, int ld, int column, const float (&v)[kComposeRows]) {
    for (int k = 0; k < kComposeRows; ++k) {
      const int i = rb + RS * k;
      if (i >= dk) break;
      base[static_cast<int64_t>(i) * ld + column] = v[k];
    }
  };
  auto write_x = [&](float* base, int ld, int column) {
    for (int k = 0; k < kComposeRows; ++k) {
      const int i = rb + RS * k;
      if (i >= dk) break;
      base[static_cast<int64_t>(i) * ld + column] = X[i][c];
    }
  };
  auto update = [&](const float (&acc)[kComposeRows]) {
    __syncthreads();  // every read of X is done
    for (int k = 0; k < kComposeRows; ++k) {
      const int i = rb + RS * k;
      if (i >= dk) break;
      X[i][c] = acc[k];
    }
    __syncthreads();
  };

  float acc[kComposeRows], acc2[kComposeRows];
  if (a.mode == ComposeMode::kPrefix) {
    for (int s = 0; s < p.nseg; ++s) {
      const int64_t slot = s * bh + bhi;
      if (valid) write_x(a.seg_out + slot * se, dv, col);
      apply(a.segA + slot * me, false, a.segM + slot * se, acc);
      update(acc);
    }
  } else if (a.mode == ComposeMode::kSuffix) {
    for (int s = p.nseg - 1; s >= 0; --s) {
      const int64_t slot = s * bh + bhi;
      if (valid && a.seg_out != nullptr) write_x(a.seg_out + slot * se, dv, col);
      apply(a.segA + slot * me, true, a.E + slot * se, acc);
      update(acc);
    }
    if (valid && a.final_out != nullptr) write_x(a.final_out + bhi * se, dv, col);
  } else {
    bool seen = false;
    for (int s = 0; s < p.nseg; ++s) {
      const int64_t slot = s * bh + bhi;
      const int f = a.firsts[b * p.nseg + s];
      apply(a.segA + slot * me, false, a.segM + slot * se, acc);
      if (f >= 0) {  // a document start in this segment: its head ends a document
        apply(a.seg_head_A + slot * me, false, a.seg_head_M + slot * se, acc2);
        if (valid) {
          if (!seen) {
            if (is_map) {
              write(a.head_A + bhi * me, dk, col, acc2);
            } else {
              write(a.head_M + bhi * se, dv, mcol, acc2);
            }
          } else if (a.finals != nullptr && !is_map) {
            const int64_t d = doc_of(p, b, p.begin + f - 1);
            write(a.finals + (d * p.heads + h) * se, dv, mcol, acc2);
          }
        }
        seen = true;
      }
      update(acc);
    }
    if (valid) {
      if (is_map) {
        write_x(a.A + bhi * me, dk, col);
        if (!seen) write_x(a.head_A + bhi * me, dk, col);
      } else {
        write_x(a.M + bhi * se, dv, mcol);
        if (!seen) write_x(a.head_M + bhi * se, dv, mcol);
      }
    }
  }
}

// ---- combines ------------------------------------------------------------------------------
constexpr int kMapThreads = 256;
constexpr int kMapPerThread = kMaxDim * kMaxDim / kMapThreads;

__global__ void __launch_bounds__(kMapThreads)
    apply_map_kernel(const float* A, const float* x, const float* y, int dk, int dv,
                     bool transposed_add, float* out) {
  const int64_t r = blockIdx.x;
  const float* a = A + r * dk * dk;
  const float* xs = x + r * dk * dv;
  float acc[kMapPerThread];
#pragma unroll
  for (int c = 0; c < kMapPerThread; ++c) {
    const int e = threadIdx.x + c * kMapThreads;
    acc[c] = 0.f;
    if (e < dk * dv) {
      const int i = e / dv, j = e % dv;
      float s = 0.f;
      if (transposed_add) {
        for (int m = 0; m < dk; ++m) s += a[m * dk + i] * xs[m * dv + j];
        s += out[r * dk * dv + e];
      } else {
        for (int m = 0; m < dk; ++m) s += a[i * dk + m] * xs[m * dv + j];
        if (y != nullptr) s += y[r * dk * dv + e];
      }
      acc[c] = s;
    }
  }
  __syncthreads();  // every read of this (b, h) before any write: out may alias x or y
#pragma unroll
  for (int c = 0; c < kMapPerThread; ++c) {
    const int e = threadIdx.x + c * kMapThreads;
    if (e < dk * dv) out[r * dk * dv + e] = acc[c];
  }
}

__global__ void add_kernel(float* dst, const float* src, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

}  // namespace

void launch_compose(const Problem& p, const ComposeArgs& a, cudaStream_t s) {
  const int ncols = a.mode == ComposeMode::kSummary ? p.dk + p.dv : p.dv;
  compose_kernel<<<dim3(static_cast<unsigned>((ncols + kComposeCols - 1) / kComposeCols),
                        static_cast<unsigned>(p.bh())),
                   kComposeThreads, 0, s>>>(p, a);
  check_launch("segment composition kernel");
}

void launch_apply_map(const float* A, const float* x, const float* y, int64_t bh, int dk, int dv,
                      bool transposed_add, float* out, cudaStream_t s) {
  if (bh == 0) return;
  apply_map_kernel<<<static_cast<unsigned>(bh), kMapThreads, 0, s>>>(A, x, y, dk, dv,
                                                                      transposed_add, out);
  check_launch("apply_map kernel");
}

void launch_add(float* dst, const float* src, int64_t count, cudaStream_t s) {
  if (count <= 0) return;
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4096);
  add_kernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(dst, src, count);
  check_launch("add kernel");
}

}  // namespace lasp2::delta::gpu
