#include "tensor_views.h"

#ifdef LASP2_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#endif

namespace lasp2::torch_binding {

ScalarType from_aten(at::ScalarType type, const char* name) {
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
      fail(std::string("lasp2: `") + name + "` has an unsupported dtype " + c10::toString(type) +
           " (float32, float64, float16 or bfloat16)");
  }
}

Device core_device(const at::Tensor& t) { return t.is_cuda() ? Device::kCUDA : Device::kCPU; }

namespace {
BTHStrides strides_of(const at::Tensor& t, const char* name) {
  LASP2_CHECK(t.dim() == 4, std::string("`") + name + "` must be a [B, T, H, D] tensor");
  LASP2_CHECK(t.stride(3) == 1 || t.size(3) == 1,
              std::string("the last dimension of `") + name + "` must be contiguous");
  return {t.stride(0), t.stride(1), t.stride(2)};
}
}  // namespace

ConstView const_view(const at::Tensor& t, const char* name) {
  return {t.data_ptr(), strides_of(t, name)};
}
MutView mut_view(at::Tensor& t, const char* name) { return {t.data_ptr(), strides_of(t, name)}; }

BTHStrides bth_strides(const at::Tensor& t, const char* name) {
  LASP2_CHECK(t.dim() == 3, std::string("`") + name + "` must be a [B, T, H] tensor");
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
