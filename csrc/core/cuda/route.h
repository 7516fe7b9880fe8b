// Host-side planning shared by every pass of the CUDA backend: the device's limits,
// argument checks, the route (tensor cores or generic FMA kernels) and how a part is
// cut into segments. Host code only (compiled by the host compiler).
#pragma once

#include <cuda_runtime.h>

#include <initializer_list>
#include <mutex>
#include <unordered_map>

#include "launch.h"
#include "lasp2/params.h"

namespace lasp2::cuda {

// Throws lasp2::Error naming `what` when e is not cudaSuccess.
void cuda_check(cudaError_t e, const char* what);

struct DeviceInfo {
  int sms = 1;
  int smem_optin = 48 * 1024;  // opt-in shared memory per block
  bool pools = false;          // stream-ordered allocator (cudaMallocAsync) supported
  int cc_major = 0;            // compute capability (pdl.cpp: PDL from sm_90)
};
// The current device's limits (cached per device).
const DeviceInfo& device_info();

// make(device) for the current device, made once per device and kept (thread-safe). Each
// call site's lambda is a type of its own, so each has its own cache.
template <typename Make>
auto& per_device(Make make) {
  using T = decltype(make(0));
  static std::mutex mu;
  static std::unordered_map<int, T> cache;  // its elements stay where they are as it grows
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it == cache.end()) it = cache.emplace(dev, make(dev)).first;
  return it->second;
}

// LASP2_CUDA_SEG_CHUNKS: chunks per segment of the scalar family's passes, 0 (or unset) =
// the backend's choice (make_geom); read per call. Anything but a whole number >= 0 is a
// lasp2::Error (env_knob.h).
int seg_chunks_knob();

// The kernels' element type of t; for any other dtype throws lasp2::Error saying that
// `inputs` (the family and its tensors) must be float32, float16 or bfloat16.
Elem elem_of(ScalarType t, const char* inputs = "lasp2 (CUDA): inputs");
View view_of(ConstView v);
View view_of(MutView v);

// Throws lasp2::Error for inputs the CUDA kernels do not take.
void check_params(const AttentionParams& p, TokenRange part);

// 0 = generic, else the tile dimension D (64 or 128) of the tensor-core kernels:
// 16-bit inputs, dims <= 128 and multiples of 8, 16-byte aligned views whose strides
// are multiples of 8 elements, and the kernel's shared memory within the device's limit.
int tc_dim(const AttentionParams& p, std::initializer_list<View> views, int smem_needed_64,
           int smem_needed_128);
// The route of a segment-state pass over (a, b).
int state_dim(const AttentionParams& p, View a, View b);

// The part cut into 64-token chunks and segments of about one wave of blocks.
// D: tile dimension of the tensor-core kernels (64 or 128), 0 for the generic path.
Geom make_geom(const AttentionParams& p, TokenRange part, int D);

}  // namespace lasp2::cuda
