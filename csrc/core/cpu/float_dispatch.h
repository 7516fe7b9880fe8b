// The CPU backends' element-type switch: the host kernels are templates over float
// and double; half precisions are converted by the caller (the binding).
#pragma once

#include <string>

#include "lasp2/types.h"

namespace lasp2 {

// Calls f(float{}) or f(double{}) for `type`; any other type fails with a message
// naming `kernels` (which CPU kernels refused it).
template <typename F>
void dispatch_cpu_float(ScalarType type, const char* kernels, F&& f) {
  switch (type) {
    case ScalarType::kFloat32:
      f(float{});
      return;
    case ScalarType::kFloat64:
      f(double{});
      return;
    default:
      fail(std::string("lasp2: the ") + kernels + " take float32 or float64 inputs, got " + to_string(type) +
           " (convert half precisions before the call)");
  }
}

}  // namespace lasp2
