// The delta-rule family (gated DeltaNet, KDA) for torch tensors: LASP-2 forward
// and backward over the core schedule (csrc/core/delta_rule/delta_lasp2.h).
#pragma once

#include <torch/extension.h>

namespace lasp2::torch_binding {

// Adds delta_forward / delta_backward to the extension module.
void register_delta_rule(pybind11::module_& m);

}  // namespace lasp2::torch_binding
