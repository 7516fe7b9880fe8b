// allow_dynamic_smem and allow_max_shared (launch.h): cudaFuncSetAttribute once per
// kernel, device and size.
// The attribute lives on the function in the device's context, so setting it again
// before every launch only costs host time: about 4 us a call on the H200's host, and
// in a synchronized step the host time before the forward's long kernels is GPU idle
// time (docs/kernels.md, "Session 15").
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "launch.h"

namespace lasp2::cuda {

void allow_dynamic_smem(const void* kernel, int bytes) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    // no device to key on: leave it to the call (its error shows at the launch)
    cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    return;
  }
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  const std::lock_guard<std::mutex> lock(mu);
  int& have = allowed[{kernel, dev}];
  if (have >= bytes) return;
  // A failed call is not remembered: the launch then fails and check_launch names it.
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes) ==
      cudaSuccess) {
    have = bytes;
  }
}

cudaError_t allow_max_shared(const void* kernel, int bytes) {
  auto set = [&] {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    return e;
  };
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return set();  // no device to key on: the call reports it
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  const std::lock_guard<std::mutex> lock(mu);
  int& have = allowed[{kernel, dev}];
  if (have >= bytes) return cudaSuccess;
  const cudaError_t e = set();
  if (e == cudaSuccess) have = bytes;  // a failure is not remembered: the next launch tries again
  return e;
}

}  // namespace lasp2::cuda
