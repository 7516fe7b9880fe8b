// DeltaKernelBackend on the host: dispatches on the element type (float, double).
#include <algorithm>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "cpu/float_dispatch.h"
#include "delta_rule/cpu/delta_cpu.h"
#include "delta_rule/delta_backend.h"
#ifdef LASP2_WITH_CUDA
#include "delta_rule/cuda/delta_cuda_backend.h"
#endif

namespace lasp2::delta {
namespace {

template <typename F>
void dispatch_float(ScalarType type, F&& f) {
  dispatch_cpu_float(type, "CPU delta-rule kernels", std::forward<F>(f));
}

// acc = a xs (kTransposed: a^T xs) in double for one (b, h): a is [dk][dk], xs and acc
// [dk][dv]; zero entries of a are skipped. apply_map and apply_map_transposed_add share it.
// Each acc entry sums its terms in ascending m in both forms (the transposed form used to
// walk m outside i, which adds the same terms to each entry in the same order).
template <bool kTransposed>
void map_product(const float* a, const float* xs, int64_t dk, int64_t dv, std::vector<double>& acc) {
  std::fill(acc.begin(), acc.end(), 0.0);
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t m = 0; m < dk; ++m) {
      const double w = kTransposed ? a[m * dk + i] : a[i * dk + m];  // kTransposed: (a^T)_{i m}
      if (w == 0.0) continue;
      for (int64_t j = 0; j < dv; ++j) acc[i * dv + j] += w * xs[m * dv + j];
    }
}

class DeltaCpuBackend final : public DeltaKernelBackend {
 public:
  Device device() const override { return Device::kCPU; }

  void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc, float* A,
                    float* M, float* head_A, float* head_M, void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::part_summary<decltype(tag)>(p, part, doc, A, M, head_A, head_M);
    });
  }

  void forward(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
               MutView o, void*) const override {
    dispatch_float(p.dtype,
                   [&](auto tag) { cpu::forward<decltype(tag)>(p, part, entering, doc, o); });
  }

  void entering_dstate(const DeltaParams& p, TokenRange part, ConstView dout, float* dentering,
                       void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::entering_dstate<decltype(tag)>(p, part, dout, dentering);
    });
  }

  void backward(const DeltaParams& p, TokenRange part, ConstView dout, const float* entering,
                const float* leaving_dstate, const DocStates& doc, MutView dq, MutView dk,
                MutView dv, void* dg, void* dbeta, float* dentering, void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::backward<decltype(tag)>(p, part, dout, entering, leaving_dstate, doc, dq, dk, dv, dg,
                                   dbeta, dentering);
    });
  }

  void apply_map(const float* A, const float* x, const float* y, int64_t bh, int64_t dk,
                 int64_t dv, float* out, void*) const override {
    std::vector<double> acc(dk * dv);
    for (int64_t r = 0; r < bh; ++r) {
      map_product<false>(A + r * dk * dk, x + r * dk * dv, dk, dv, acc);
      for (int64_t e = 0; e < dk * dv; ++e)
        out[r * dk * dv + e] = static_cast<float>(acc[e] + (y ? y[r * dk * dv + e] : 0.0));
    }
  }

  void apply_map_transposed_add(const float* A, const float* x, int64_t bh, int64_t dk,
                                int64_t dv, float* out, void*) const override {
    std::vector<double> acc(dk * dv);
    for (int64_t r = 0; r < bh; ++r) {
      map_product<true>(A + r * dk * dk, x + r * dk * dv, dk, dv, acc);
      for (int64_t e = 0; e < dk * dv; ++e)
        out[r * dk * dv + e] = static_cast<float>(out[r * dk * dv + e] + acc[e]);
    }
  }

  void add(float* dst, const float* src, int64_t count, void*) const override {
    for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
  }
  void copy(float* dst, const float* src, int64_t count, void*) const override {
    std::memmove(dst, src, sizeof(float) * count);
  }
  void fill_zero(float* dst, int64_t count, void*) const override {
    std::fill(dst, dst + count, 0.f);
  }
};

}  // namespace

const DeltaKernelBackend& delta_cpu_backend() {
  static const DeltaCpuBackend backend;
  return backend;
}

const DeltaKernelBackend& delta_backend_for(Device device) {
  if (device == Device::kCPU) return delta_cpu_backend();
#ifdef LASP2_WITH_CUDA
  return delta_cuda_backend();
#else
  fail("lasp2: this build has no CUDA kernels; rebuild with CUDA to run the delta rule on GPU tensors");
#endif
}

}  // namespace lasp2::delta
