// dispatch_elem(e, f) calls f(T{}) with T the C++ type of the element type e (float,
// __half, __nv_bfloat16), so that a launcher instantiates its kernel templates once
// per input dtype and picks the one of the call. nvcc only (the 16-bit types).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "elem.h"

namespace lasp2::cuda {

template <typename F>
void dispatch_elem(Elem e, F&& f) {
  switch (e) {
    case Elem::kF32:
      f(float{});
      return;
    case Elem::kF16:
      f(__half{});
      return;
    case Elem::kBF16:
      f(__nv_bfloat16{});
      return;
  }
}

}  // namespace lasp2::cuda
