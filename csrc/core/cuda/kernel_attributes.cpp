// allow_dynamic_smem and allow_max_shared (launch.h): cudaFuncSetAttribute once per
// kernel, device and size.
// The attribute lives on the function in the device's context, so setting it again
// before every launch only costs host time: about 4 us a call on the H200's host, and
// in a synchronized step the host time before the forward's long kernels is GPU idle
// time (docs/history/kernels-log.md, "Session 15").
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "launch.h"

namespace lasp2::cuda {

namespace {

// Runs set() (which returns the first failing cudaFuncSetAttribute's error) unless it
// already succeeded for this kernel on the current device with at least `bytes`. The
// cache is per instantiation, so one per caller (each passes its own lambda type):
// allow_max_shared must still set its carveout on a kernel that allow_dynamic_smem has seen. A failure is not remembered: the next launch tries
// again (and its own error shows).
template <typename Set>
cudaError_t set_once(const void* kernel, int bytes, Set set) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return set();  // no device to key on: the call reports it
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, int> allowed;  // (kernel, device) -> bytes
  const std::lock_guard<std::mutex> lock(mu);
  int& have = allowed[{kernel, dev}];
  if (have >= bytes) return cudaSuccess;
  const cudaError_t e = set();
  if (e == cudaSuccess) have = bytes;
  return e;
}

}  // namespace

void allow_dynamic_smem(const void* kernel, int bytes) {
  // a failure shows at the launch, which check_launch names
  set_once(kernel, bytes,
           [&] { return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes); });
}

cudaError_t allow_max_shared(const void* kernel, int bytes) {
  return set_once(kernel, bytes, [&] {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
    if (e == cudaSuccess)
      e = cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared);
    return e;
  });
}

}  // namespace lasp2::cuda
