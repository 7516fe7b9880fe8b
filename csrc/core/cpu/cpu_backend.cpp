// KernelBackend on the host: dispatches on the element type (float, double).
// Half precisions are converted by the caller; the CPU path is the reference-grade
// path that CI runs, so it favours clarity over speed.
#include <algorithm>
#include <cstring>
#include <utility>

#include "combine_cpu.h"
#include "cpu_kernels.h"
#include "float_dispatch.h"
#include "lasp2/kernel_backend.h"

namespace lasp2 {
namespace {

template <typename F>
void dispatch_float(ScalarType type, F&& f) {
  dispatch_cpu_float(type, "CPU kernels", std::forward<F>(f));
}

class CpuBackend final : public KernelBackend {
 public:
  Device device() const override { return Device::kCPU; }

  void part_state(const AttentionParams& p, TokenRange part, float* state, float* log_decay,
                  void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      using T = decltype(tag);
      cpu::chunk_forward<T>(p, part, nullptr, MutView{}, state);
    });
    cpu::part_log_decay(p, part, log_decay);
  }

  void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state,
                     MutView o, void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::chunk_forward<decltype(tag)>(p, part, initial_state, o, nullptr);
    });
  }

  void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix,
                         MutView o, void*) const override {
    dispatch_float(p.dtype,
                   [&](auto tag) { cpu::add_prefix_output<decltype(tag)>(p, part, prefix, o); });
  }

  void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate,
                   void*) const override {
    dispatch_float(p.dtype,
                   [&](auto tag) { cpu::part_dstate<decltype(tag)>(p, part, dout, dstate); });
  }

  void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                         const float* initial_state, MutView dq, void* q_dot_dq,
                         void*) const override {
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::chunk_backward_dq<decltype(tag)>(p, part, dout, initial_state, dq, q_dot_dq);
    });
  }

  void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                           const float* final_dstate, MutView dk, MutView dv,
                           const void* q_dot_dq, const float* dg_offset, void* dg,
                           void*) const override {
    LASP2_CHECK(dg == nullptr || q_dot_dq != nullptr, "dg needs q_dot_dq from the dq pass");
    dispatch_float(p.dtype, [&](auto tag) {
      cpu::chunk_backward_dkdv<decltype(tag)>(p, part, dout, final_dstate, dk, dv, q_dot_dq,
                                              dg_offset, dg);
    });
  }

  void combine_prefix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void*) const override {
    cpu::combine_prefix(parts, log_decays, target, bh, state_elems, out);
  }

  void combine_suffix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void*) const override {
    cpu::combine_suffix(parts, log_decays, target, bh, state_elems, out);
  }

  void state_dot(const float* prefix, const float* state, const float* log_decay,
                 const float* dstate, int64_t bh, int64_t state_elems, float* out,
                 void*) const override {
    cpu::state_dot(prefix, state, log_decay, dstate, bh, state_elems, out);
  }

  void copy(float* dst, const float* src, int64_t count, void*) const override {
    std::memmove(dst, src, sizeof(float) * count);
  }

  void fill_zero(float* dst, int64_t count, void*) const override {
    std::fill(dst, dst + count, 0.f);
  }
  void add(float* dst, const float* src, int64_t count, void*) const override {
    for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
  }
};

}  // namespace

const KernelBackend& cpu_backend() {
  static const CpuBackend backend;
  return backend;
}

}  // namespace lasp2
