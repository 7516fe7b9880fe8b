// The input element types of the CUDA kernels, as host code names them: one enum for
// both kernel families (launch.h, delta_rule/cuda/delta_launch.h), so that their
// launchers share one dtype mapping (route.h: elem_of) and one dispatch to the kernels'
// C++ types (elem_dispatch.cuh). Host and device code.
#pragma once

namespace lasp2::cuda {

enum class Elem : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

}  // namespace lasp2::cuda
