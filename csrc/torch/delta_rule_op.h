// The delta-rule family (gated DeltaNet, KDA) for torch tensors: forward and backward
// of DeltaFamily (csrc/core/delta_rule/delta_family.h) over the generic schedules,
// LASP-2 (csrc/core/sp/lasp2.cpp) or, with ring=True, LASP-1 (lasp1.cpp).
#pragma once

#include <torch/extension.h>

namespace lasp2::torch_binding {

// Adds delta_forward / delta_backward and delta_value_stats to the extension module.
void register_delta_rule(pybind11::module_& m);

}  // namespace lasp2::torch_binding
