// The host side of pdl.cuh's launch_kernel (host compiler; pdl.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lasp2::cuda {

// Whether launch_kernel sets the programmatic-serialization attribute on `kernel`:
// LASP2_CUDA_PDL=1 (read at every launch, like the other LASP2_CUDA_* knobs, so that a test
// can compare both in one process; unset or anything else: off), an sm_90+ device, and the
// kernel's code there compiled for sm_90+ (the code with the griddepcontrol instructions: a
// kernel run from the compute_80 PTX has none, so it must not start early).
// Decides for one launch; each `true` is counted.
bool pdl_launch_attribute(const void* kernel);

// The launches given the attribute so far in this process (tests: the knob did take effect
// on an sm_90 device, and did not with it off).
int64_t pdl_attributed_launches();

// Throws lasp2::Error naming `what` if `launched` (a launch's return) is an error, else
// check_launch(what).
void check_launch(const char* what, cudaError_t launched);

}  // namespace lasp2::cuda
