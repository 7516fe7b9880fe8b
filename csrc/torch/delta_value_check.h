// The value checks of the delta rule's gates and betas (g <= 0, beta in [0, 1], no NaN)
// as one reduction over each, read on the host without draining the stream: the op
// starts them, launches its kernels, and only then waits for the three numbers (the
// kernels are safe on any values; a bad call raises after them and its outputs are
// dropped). So the GPU never idles while the host waits for the check.
#pragma once

#include <torch/extension.h>

namespace lasp2::torch_binding {

// Adds delta_value_stats(g, beta) -> PendingValueStats (with .wait()) to the module.
void register_delta_value_check(pybind11::module_& m);

}  // namespace lasp2::torch_binding
