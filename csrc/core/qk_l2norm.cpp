// The fused L2 norm (lasp2/qk_l2norm.h): argument checks, the CPU kernels (float and
// double; the binding converts half precisions) and the dispatch to the CUDA launchers
// (cuda/l2norm_kernels.cu), which compute the same formula with the same accumulator
// types (float, double for float64; rstd is stored in it).
#include "lasp2/qk_l2norm.h"

#include <cmath>
#include <string>

#include "cpu/float_dispatch.h"

#ifdef LASP2_WITH_CUDA
#include "cuda/l2norm_kernels.h"
#endif

namespace lasp2 {
namespace {

void check_shape(const L2NormShape& s, int count, const char* what) {
  LASP2_CHECK(count >= 0 && count <= kMaxL2NormTensors,
              std::string(what) + ": 0.." + std::to_string(kMaxL2NormTensors) + " tensors per call");
  LASP2_CHECK(s.batch >= 0 && s.seqlen >= 0 && s.heads >= 0, std::string(what) + ": negative size");
  LASP2_CHECK(s.dim >= 1 && s.dim <= (int64_t{1} << 30), std::string(what) + ": the head dim must be >= 1");
}

// Calls f(b, t, h, r) for every row, r its index in (b, t, h) order (rstd's layout).
template <typename F>
void for_rows(const L2NormShape& s, F&& f) {
  int64_t r = 0;
  for (int64_t b = 0; b < s.batch; ++b)
    for (int64_t t = 0; t < s.seqlen; ++t)
      for (int64_t h = 0; h < s.heads; ++h) f(b, t, h, r++);
}

template <typename T>
void forward_cpu(const L2NormForwardArgs& a) {
  const int64_t D = a.shape.dim;
  const T eps = static_cast<T>(a.eps);
  for (int i = 0; i < a.count; ++i) {
    const L2NormForwardTensor& v = a.t[i];
    for_rows(a.shape, [&](int64_t b, int64_t t, int64_t h, int64_t r) {
      const T* x = static_cast<const T*>(v.x.data) + v.x.stride.offset(b, t, h);
      T* y = static_cast<T*>(v.y.data) + v.y.stride.offset(b, t, h);
      T sum = 0;
      for (int64_t d = 0; d < D; ++d) sum += x[d] * x[d];
      const T rstd = T(1) / std::sqrt(sum + eps);
      for (int64_t d = 0; d < D; ++d) y[d] = x[d] * rstd;
      static_cast<T*>(v.rstd)[r] = rstd;
    });
  }
}

template <typename T>
void backward_cpu(const L2NormBackwardArgs& a) {
  const int64_t D = a.shape.dim;
  for (int i = 0; i < a.count; ++i) {
    const L2NormBackwardTensor& v = a.t[i];
    for_rows(a.shape, [&](int64_t b, int64_t t, int64_t h, int64_t r) {
      const T* dy = static_cast<const T*>(v.dy.data) + v.dy.stride.offset(b, t, h);
      const T* y = static_cast<const T*>(v.y.data) + v.y.stride.offset(b, t, h);
      T* dx = static_cast<T*>(v.dx.data) + v.dx.stride.offset(b, t, h);
      T dot = 0;
      for (int64_t d = 0; d < D; ++d) dot += dy[d] * y[d];
      const T rstd = static_cast<const T*>(v.rstd)[r];
      for (int64_t d = 0; d < D; ++d) dx[d] = rstd * (dy[d] - y[d] * dot);
    });
  }
}

}  // namespace

void l2norm_forward(Device device, const L2NormForwardArgs& args, void* stream) {
  check_shape(args.shape, args.count, "l2norm_forward");
  for (int i = 0; i < args.count; ++i)
    LASP2_CHECK(args.shape.rows() == 0 || (args.t[i].x.data && args.t[i].y.data && args.t[i].rstd),
                "l2norm_forward: a tensor pointer is null");
  if (args.shape.rows() == 0 || args.count == 0) return;
  if (device == Device::kCPU) {
    dispatch_cpu_float(args.shape.dtype, "CPU L2 norm kernels", [&](auto zero) { forward_cpu<decltype(zero)>(args); });
    return;
  }
#ifdef LASP2_WITH_CUDA
  cuda::launch_l2norm_forward(args, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  fail("lasp2: this build has no CUDA kernels; rebuild with CUDA to run on GPU tensors");
#endif
}

void l2norm_backward(Device device, const L2NormBackwardArgs& args, void* stream) {
  check_shape(args.shape, args.count, "l2norm_backward");
  for (int i = 0; i < args.count; ++i)
    LASP2_CHECK(args.shape.rows() == 0 || (args.t[i].dy.data && args.t[i].y.data && args.t[i].rstd &&
                                           args.t[i].dx.data),
                "l2norm_backward: a tensor pointer is null");
  if (args.shape.rows() == 0 || args.count == 0) return;
  if (device == Device::kCPU) {
    dispatch_cpu_float(args.shape.dtype, "CPU L2 norm kernels", [&](auto zero) { backward_cpu<decltype(zero)>(args); });
    return;
  }
#ifdef LASP2_WITH_CUDA
  cuda::launch_l2norm_backward(args, static_cast<cudaStream_t>(stream));
#else
  (void)stream;
  fail("lasp2: this build has no CUDA kernels; rebuild with CUDA to run on GPU tensors");
#endif
}

}  // namespace lasp2
