// Helpers of the CUDA backend tests: device tensors in any [B, T, H, D] layout
// (contiguous, Megatron's [T, B, H, D], padded head strides), poisoning (every
// byte 0xFF: a NaN in fp32, fp16 and bf16), element rounding, and a thread
// communicator that moves device memory.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "lasp2/communicator.h"
#include "lasp2/params.h"
#include "../problem.h"
#include "../thread_communicator.h"

namespace lasp2::testing {

inline bool has_cuda_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define LASP2_SKIP_WITHOUT_CUDA() \
  if (!::lasp2::testing::has_cuda_device()) GTEST_SKIP() << "no CUDA device"

// Sets (or, with an empty value, unsets) an environment variable the backend reads
// (LASP2_CUDA_SEG_CHUNKS, LASP2_CUDA_FORCE_GENERIC) for one scope.
class EnvGuard {
 public:
  EnvGuard(const char* name, const std::string& value) : name_(name) {
    const char* old = std::getenv(name);
    had_ = old != nullptr;
    if (had_) old_ = old;
    if (value.empty()) unsetenv(name);
    else setenv(name, value.c_str(), 1);
  }
  ~EnvGuard() {
    if (had_) setenv(name_, old_.c_str(), 1);
    else unsetenv(name_);
  }

 private:
  const char* name_;
  bool had_ = false;
  std::string old_;
};

// f() with `name` set to `value` (EnvGuard's meaning) for the call: the tests that
// compare a path with the one a knob turns back on (`want = with_env("LASP2_DELTA_CHUNKED",
// "0", run)`) read as one line instead of a scope around an assignment.
template <typename F>
auto with_env(const char* name, const std::string& value, F&& f) {
  const EnvGuard guard(name, value);
  return f();
}

inline void cuda_ok(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// The tolerances of the scalar family's CUDA tests (kernels and schedule) against the
// float64 CPU reference: per input dtype, and for dg (a sum over the part's n tokens)
// growing with sqrt(n / 64).
inline double tol_of(ScalarType t) {
  return t == ScalarType::kFloat32 ? 1e-4 : t == ScalarType::kFloat16 ? 3e-3 : 1e-2;
}
inline double tol_dg(ScalarType t, int64_t n) {
  return 4 * tol_of(t) * std::sqrt(std::max<double>(1.0, n / 64.0));
}

inline const char* dtype_name(ScalarType t) {
  return t == ScalarType::kBFloat16 ? "bf16" : t == ScalarType::kFloat16 ? "fp16" : "fp32";
}

// The sequence-parallel tests' problem on `world` ranks: parts of 96 tokens (they end
// mid-chunk), documents starting inside a part, exactly at a part edge, at the last token.
inline ProblemSpec sp_spec(int world, int64_t batch = 2, int64_t part_tokens = 96) {
  ProblemSpec s;
  s.batch = batch;
  s.heads = 2;
  s.dim_k = s.dim_v = 64;
  s.mode = DecayMode::kGate;
  s.seqlen = 2 * world * part_tokens;
  s.scale = 0.125f;
  s.doc_starts = {5, 96, 97, s.seqlen - 1};
  return s;
}

// ---- element encoding -----------------------------------------------------------
inline void encode(ScalarType t, double v, void* dst) {
  if (t == ScalarType::kFloat32) {
    const float f = static_cast<float>(v);
    std::memcpy(dst, &f, 4);
  } else if (t == ScalarType::kFloat16) {
    const __half h = __float2half_rn(static_cast<float>(v));
    std::memcpy(dst, &h, 2);
  } else {
    const __nv_bfloat16 h = __float2bfloat16_rn(static_cast<float>(v));
    std::memcpy(dst, &h, 2);
  }
}
inline double decode(ScalarType t, const void* src) {
  if (t == ScalarType::kFloat32) {
    float f;
    std::memcpy(&f, src, 4);
    return f;
  }
  if (t == ScalarType::kFloat16) {
    __half h;
    std::memcpy(&h, src, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, src, 2);
  return __bfloat162float(h);
}
inline double round_to(ScalarType t, double v) {
  unsigned char buf[4];
  encode(t, v, buf);
  return decode(t, buf);
}
inline bool is_poison(const unsigned char* p, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (p[i] != 0xFF) return false;
  return true;
}

// ---- device buffers ---------------------------------------------------------------
template <typename T>
struct DevBuf {
  T* p = nullptr;
  size_t n = 0;
  DevBuf() = default;
  explicit DevBuf(size_t count) : n(count) {
    if (n) cuda_ok(cudaMalloc(&p, n * sizeof(T)), "cudaMalloc");
  }
  DevBuf(const DevBuf&) = delete;
  DevBuf& operator=(const DevBuf&) = delete;
  DevBuf(DevBuf&& o) noexcept : p(o.p), n(o.n) { o.p = nullptr; o.n = 0; }
  DevBuf& operator=(DevBuf&& o) noexcept {
    if (this != &o) {
      if (p) cudaFree(p);
      p = o.p;
      n = o.n;
      o.p = nullptr;
      o.n = 0;
    }
    return *this;
  }
  ~DevBuf() {
    if (p) cudaFree(p);
  }
  void upload(const std::vector<T>& h) {
    cuda_ok(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice), "upload");
  }
  std::vector<T> download() const {
    std::vector<T> h(n);
    cuda_ok(cudaDeviceSynchronize(), "kernel execution");
    cuda_ok(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost), "download");
    return h;
  }
  void poison() { cuda_ok(cudaMemset(p, 0xFF, n * sizeof(T)), "poison"); }
};

// Upload a host vector converted to float (decay values, states).
inline DevBuf<float> to_device_f32(const std::vector<double>& h) {
  DevBuf<float> d(h.size());
  std::vector<float> f(h.begin(), h.end());
  if (!f.empty()) d.upload(f);
  return d;
}
inline DevBuf<float> to_device_f32(const std::vector<float>& h) {
  DevBuf<float> d(h.size());
  if (!h.empty()) d.upload(h);
  return d;
}

struct Layout {
  bool tbhd = false;  // Megatron [T, B, H, D] memory order
  int pad = 0;        // extra elements after each head row (head stride = D + pad)
  std::string name() const {
    return std::string(tbhd ? "TBHD" : "BTHD") + (pad ? "_pad" + std::to_string(pad) : "");
  }
};

// A [B, T, H, D] tensor of `type` on the device, in the given layout.
struct DevTensor {
  int64_t B = 0, T = 0, H = 0, D = 0;
  ScalarType type = ScalarType::kFloat32;
  Layout layout;
  BTHStrides st;
  size_t esize = 4, elems = 0;
  DevBuf<unsigned char> buf;

  DevTensor(int64_t b, int64_t t, int64_t h, int64_t d, ScalarType ty, Layout lay)
      : B(b), T(t), H(h), D(d), type(ty), layout(lay) {
    const int64_t Dp = D + lay.pad;
    st = lay.tbhd ? BTHStrides{H * Dp, B * H * Dp, Dp} : BTHStrides{T * H * Dp, H * Dp, Dp};
    esize = ty == ScalarType::kFloat32 ? 4 : 2;
    elems = static_cast<size_t>(B * T * H * Dp);
    buf = DevBuf<unsigned char>(std::max<size_t>(elems * esize, 16));
    buf.poison();
  }
  ConstView cview() const { return {buf.p, st}; }
  MutView mview() { return {buf.p, st}; }
  int64_t offset(int64_t b, int64_t t, int64_t h) const { return st.offset(b, t, h); }

  // host values in BTHD order (already representable in `type`)
  void upload(const std::vector<double>& bthd) {
    std::vector<unsigned char> host(buf.n, 0xFF);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h)
          for (int64_t d = 0; d < D; ++d)
            encode(type, bthd[((b * T + t) * H + h) * D + d],
                   &host[(offset(b, t, h) + d) * esize]);
    cuda_ok(cudaMemcpy(buf.p, host.data(), host.size(), cudaMemcpyHostToDevice), "upload");
  }
  struct Readback {
    std::vector<double> v;        // BTHD; NaN where poisoned
    std::vector<char> written;    // per BTHD element: not poison
    int64_t pad_clobbered = 0;    // padding elements that were written
  };
  Readback download() const {
    std::vector<unsigned char> host = buf.download();
    Readback r;
    r.v.assign(B * T * H * D, std::nan(""));
    r.written.assign(B * T * H * D, 0);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < T; ++t)
        for (int64_t h = 0; h < H; ++h) {
          for (int64_t d = 0; d < D; ++d) {
            const unsigned char* p = &host[(offset(b, t, h) + d) * esize];
            const int64_t i = ((b * T + t) * H + h) * D + d;
            if (!is_poison(p, esize)) {
              r.written[i] = 1;
              r.v[i] = decode(type, p);
            }
          }
          for (int64_t d = D; d < D + layout.pad; ++d)
            if (!is_poison(&host[(offset(b, t, h) + d) * esize], esize)) ++r.pad_clobbered;
        }
    return r;
  }
};

// ---- comparison -------------------------------------------------------------------
// Checks `got` (BTHD readback) against `want` on the tokens [begin, end) and that
// every other token was left untouched (still poison).
struct Compare {
  double rel = 0;           // max |got - want| / max |want| over the part
  int64_t missing = 0;      // part elements not written or not finite
  int64_t clobbered = 0;    // elements outside the part that were written
};

template <typename W>
Compare compare_rows(const std::vector<double>& got, const std::vector<char>& written,
                     const std::vector<W>& want, int64_t B, int64_t T, int64_t H, int64_t D,
                     int64_t begin, int64_t end) {
  Compare c;
  double num = 0, den = 0;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t d = 0; d < D; ++d) {
          const int64_t i = ((b * T + t) * H + h) * D + d;
          const bool inside = t >= begin && t < end;
          if (!inside) {
            if (written[i]) ++c.clobbered;
            continue;
          }
          if (!written[i] || !std::isfinite(got[i])) {
            ++c.missing;
            continue;
          }
          num = std::max(num, std::abs(got[i] - static_cast<double>(want[i])));
          den = std::max(den, std::abs(static_cast<double>(want[i])));
        }
  c.rel = num / std::max(den, 1e-3);
  return c;
}

// fp32 buffers (states, [B, T, H] scalars) of the device against a reference.
template <typename W>
double rel_err_f32(const std::vector<float>& got, const std::vector<W>& want, int64_t* bad = nullptr) {
  double num = 0, den = 0;
  int64_t nbad = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    if (!std::isfinite(got[i])) {
      ++nbad;
      continue;
    }
    num = std::max(num, std::abs(got[i] - static_cast<double>(want[i])));
    den = std::max(den, std::abs(static_cast<double>(want[i])));
  }
  if (bad) *bad = nbad;
  return nbad ? INFINITY : num / std::max(den, 1e-3);
}

// ---- a device-memory thread communicator ---------------------------------------------
// All ranks are threads of this process on one GPU; all_gather synchronizes the
// caller's stream, then copies every rank's send buffer with cudaMemcpy. send / recv
// (LASP-1's ring) go through the host: send synchronizes the stream and posts a copy,
// recv blocks until it arrives and copies it into the device buffer.
class DeviceThreadCommunicator final : public Communicator {
 public:
  DeviceThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank)
      : group_(std::move(group)), rank_(rank) {}
  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  Device device() const override { return Device::kCUDA; }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void* stream) override {
    ++collectives_;
    const std::size_t bytes = count * element_size(type);
    cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "all_gather: sync");
    group_->publish(rank_, send);
    group_->barrier();
    for (int r = 0; r < size(); ++r)
      cuda_ok(cudaMemcpy(static_cast<char*>(recv) + r * bytes, group_->slot(r), bytes,
                         cudaMemcpyDeviceToDevice),
              "all_gather: copy");
    group_->barrier();
    return std::make_unique<CompletedWork>();
  }
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override {
    ++p2p_;
    std::vector<char> message(count * element_size(type));
    cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "send: sync");
    cuda_ok(cudaMemcpy(message.data(), buffer, message.size(), cudaMemcpyDeviceToHost), "send: copy");
    group_->post(rank_, peer, std::move(message));
    return std::make_unique<CompletedWork>();
  }
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override {
    ++p2p_;
    const std::vector<char> message = group_->take(peer, rank_);
    LASP2_CHECK(message.size() == count * element_size(type), "DeviceThreadCommunicator: size mismatch");
    // the buffer may still be read by work queued on the stream
    cuda_ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "recv: sync");
    cuda_ok(cudaMemcpy(buffer, message.data(), message.size(), cudaMemcpyHostToDevice), "recv: copy");
    return std::make_unique<CompletedWork>();
  }
  int collectives() const { return collectives_; }
  int p2p_calls() const { return p2p_; }

 private:
  std::shared_ptr<ThreadGroup> group_;
  int rank_;
  int collectives_ = 0;
  int p2p_ = 0;
};

// run_ranks with device-memory communicators; every thread works on device 0.
template <typename Fn>
void run_device_ranks(int size, Fn fn) {
  run_ranks<DeviceThreadCommunicator>(size, [&](int rank, DeviceThreadCommunicator& comm) {
    cuda_ok(cudaSetDevice(0), "cudaSetDevice");
    fn(rank, comm);
  });
}

}  // namespace lasp2::testing
