// Programmatic dependent launch (PDL, sm_90's griddepcontrol) for the scalar family's
// kernels, behind LASP2_CUDA_PDL (off unless 1; docs/kernels.md, "What runs where").
//
// One fwd + bwd runs a dozen kernels back to back on one stream; with PDL the next kernel's
// blocks are launched (and ramp up: block scheduling, shared-memory carve-out, their
// prologue) while the current one's last blocks still run, instead of after its end.
//
// The rule that keeps this safe: every kernel launched by launch_kernel calls pdl_wait()
// first, before touching global memory (reads and writes: a write after the previous
// kernel's read is a hazard too), and pdl_launch_dependents() only after that wait. So
// kernel N is launched only once N - 1 passed its own wait (N - 2 finished), and N reads or
// writes memory only once N - 1 finished and its writes are visible. A kernel launched
// without the attribute (any other library's, or every kernel with the knob off) waits
// for the whole previous kernel as always, and the instructions are no-ops in it.
#pragma once

#include <cuda_runtime.h>

#include <utility>

#include "launch.h"
#include "pdl.h"

namespace lasp2::cuda {

// griddepcontrol.wait: returns once every grid this one depends on programmatically has
// completed and its memory is visible (at once without such a dependency). The memory
// clobber keeps the compiler from moving any load or store above it.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// griddepcontrol.launch_dependents: the next kernel on the stream may be launched once
// every block of this one has called it (or exited). Only ever after pdl_wait().
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// kernel<<<grid, block, smem, s>>>(args...), with the PDL attribute where
// pdl_launch_attribute allows it (cudaLaunchKernelEx), then the launch checked. With the
// knob off this is the plain launch of before.
template <typename... Params, typename... Args>
void launch_kernel(const char* what, void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem,
                   cudaStream_t s, Args&&... args) {
  if (!pdl_launch_attribute(reinterpret_cast<const void*>(kernel))) {
    kernel<<<grid, block, smem, s>>>(std::forward<Args>(args)...);
    check_launch(what);
    return;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = s;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = 1;
  check_launch(what, cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...));
}

}  // namespace lasp2::cuda
