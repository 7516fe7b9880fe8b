// The registry of kernel backends: which KernelBackend runs on which device.
#include "lasp2/kernel_backend.h"

namespace lasp2 {

const KernelBackend& backend_for(Device device) {
  if (device == Device::kCPU) return cpu_backend();
#ifdef LASP2_WITH_CUDA
  return cuda_backend();
#else
  fail("lasp2: this build has no CUDA kernels; rebuild with CUDA to run on GPU tensors");
#endif
}

}  // namespace lasp2
