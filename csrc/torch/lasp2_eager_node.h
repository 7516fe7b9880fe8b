// The one-device eager call of lasp2.linear_attention as a C++ autograd node: forward
// and backward cross from Python into the binding once each, and the backward runs in
// C++ (no Python frames, no GIL on autograd's device thread).
#pragma once

#include <ATen/ATen.h>

#include "attention_params.h"

namespace lasp2::torch_binding {

// o for one device, no documents, no states: lasp2_one_device_forward / _backward (the
// kernels of lasp2_forward / lasp2_backward; of their saved buffers only the segment
// states, the only one their one-device path reads) behind a torch::autograd::Function.
// Python has checked the arguments and the gates' signs; under create_graph=True the
// gradients carry a graph whose backward raises (the op's backward is not differentiable).
at::Tensor lasp2_one_device(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& g,
                            const OptTensor& decay, double scale, int64_t chunk_size, bool overlap);

}  // namespace lasp2::torch_binding
