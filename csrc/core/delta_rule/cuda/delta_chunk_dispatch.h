// Host-side launch helpers shared by the chunked delta-rule kernels (delta_chunk_launch.cuh,
// delta_chunk_bwd.cu, delta_chunk_docs.cu, kda_chunk.cu, kda_chunk_bwd.cu): the CUDA
// error check, the dynamic shared-memory opt-in and the dispatch over the 16-bit element
// type and the head dim. Each caller passes its own message prefix (`who`, e.g. "lasp2
// (CUDA KDA, chunked)"), so that errors still name the kernel family. Included by .cu
// files only (nvcc compiles the kernel templates the dispatch instantiates).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <string>
#include <type_traits>

#include "cuda/launch.h"  // allow_max_shared
#include "delta_rule/cuda/delta_launch.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// Fails with "who: what: <CUDA error>" unless e is cudaSuccess.
inline void chunk_check(cudaError_t e, const char* who, const char* what) {
  if (e != cudaSuccess) ::lasp2::fail(std::string(who) + ": " + what + ": " + cudaGetErrorString(e));
}

// Raises kernel's dynamic shared-memory limit to `bytes` where that is above the
// default 48 KiB.
template <typename Kernel>
void chunk_allow_smem(Kernel kernel, int bytes, const char* who, const char* what) {
  if (bytes > 48 * 1024)
    chunk_check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), who, what);
}

// Sets kernel's dynamic shared memory to `bytes` and the SM's whole shared memory as
// shared memory (so that two large blocks fit an SM), once per kernel, device and size
// (lasp2::cuda::allow_max_shared), not at every launch.
template <typename Kernel>
void chunk_allow_max_shared(Kernel kernel, int bytes, const char* who, const char* what) {
  chunk_check(::lasp2::cuda::allow_max_shared(reinterpret_cast<const void*>(kernel), bytes), who, what);
}

// f(T{}, std::integral_constant<int, D>{}) for p's 16-bit element type (bf16, fp16) and
// d = 64 or 128: d_k alone, or with kSquare d_k = d_v; else fails with who's message
// (the element type checked first).
template <bool kSquare, typename F>
void chunk_dispatch(const Problem& p, const char* who, F&& f) {
  auto by_dim = [&](auto tag) {
    if (p.dk == 64 && (!kSquare || p.dv == 64)) {
      f(tag, std::integral_constant<int, 64>{});
    } else if (p.dk == 128 && (!kSquare || p.dv == 128)) {
      f(tag, std::integral_constant<int, 128>{});
    } else {
      ::lasp2::fail(std::string(who) + ": d_k = d_v must be 64 or 128");
    }
  };
  if (p.elem == Elem::kBF16) {
    by_dim(__nv_bfloat16{});
  } else if (p.elem == Elem::kF16) {
    by_dim(__half{});
  } else {
    ::lasp2::fail(std::string(who) + ": 16-bit inputs only");
  }
}

}  // namespace
}  // namespace lasp2::delta::gpu
