// at::Tensor <-> core views: the only place that knows both worlds' layouts. `name` is
// the argument the tensor came from, for error messages.
#pragma once

#include <ATen/ATen.h>

#include "lasp2/params.h"

namespace lasp2::torch_binding {

ScalarType from_aten(at::ScalarType type, const char* name);
Device core_device(const at::Tensor& t);

// A [B, T, H, D] tensor with a contiguous last dimension.
ConstView const_view(const at::Tensor& t, const char* name);
MutView mut_view(at::Tensor& t, const char* name);
// A [B, T, H] tensor's strides as a BTHStrides.
BTHStrides bth_strides(const at::Tensor& t, const char* name);

// Raw stream handle for the core: the current CUDA stream, or null on the CPU.
void* current_stream(const at::Tensor& t);

}  // namespace lasp2::torch_binding
