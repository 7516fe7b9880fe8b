#include "tensor_views.h"

#ifdef LASP2_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace lasp2::torch_binding {

ScalarType from_aten(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return ScalarType::kFloat32;
    case at::kDouble:
      return ScalarType::kFloat64;
    case at::kHalf:
      return ScalarType::kFloat16;
    case at::kBFloat16:
      return ScalarType::kBFloat16;
    default:
      fail(std::string("lasp2: unsupported dtype ") + c10::toString(type));
  }
}

Device core_device(const at::Tensor& t) { return t.is_cuda() ? Device::kCUDA : Device::kCPU; }

namespace {
BTHStrides strides_of(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 4, "lasp2: expected a [B, T, H, D] tensor");
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) == 1, "lasp2: the last dimension must be contiguous");
  return {t.stride(0), t.stride(1), t.stride(2)};
}
}  // namespace

ConstView const_view(const at::Tensor& t) { return {t.data_ptr(), strides_of(t)}; }
MutView mut_view(at::Tensor& t) { return {t.data_ptr(), strides_of(t)}; }

BTHStrides bth_strides(const at::Tensor& t) {
  TORCH_CHECK(t.dim() == 3, "lasp2: expected a [B, T, H] tensor");
  return {t.stride(0), t.stride(1), t.stride(2)};
}

void* current_stream(const at::Tensor& t) {
#ifdef LASP2_WITH_CUDA
  if (t.is_cuda()) return c10::cuda::getCurrentCUDAStream(t.get_device()).stream();
#endif
  (void)t;
  return nullptr;
}

}  // namespace lasp2::torch_binding
