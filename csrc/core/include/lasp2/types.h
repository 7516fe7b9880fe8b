// Plain value types shared by every part of the core. No framework headers here:
// the core is driven through raw pointers, strides and an opaque stream handle.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace lasp2 {

enum class ScalarType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum class Device : int { kCPU = 0, kCUDA = 1 };

// How the per-step decay a_t of S_t = a_t * S_{t-1} + k_t v_t^T is given.
enum class DecayMode : int {
  kNone = 0,   // a_t = 1: plain causal linear attention
  kFixed = 1,  // a_t = exp(log_decay[h]): lightning attention / retention
  kGate = 2,   // a_t = exp(gate[b, t, h]): simple GLA / Mamba2-style scalar gate
};

std::size_t element_size(ScalarType type);
const char* to_string(ScalarType type);

// Element strides of a [B, T, H, D] view whose last dimension is contiguous.
struct BTHStrides {
  int64_t batch = 0;
  int64_t seq = 0;
  int64_t head = 0;

  int64_t offset(int64_t b, int64_t t, int64_t h) const { return b * batch + t * seq + h * head; }
};

struct ConstView {
  const void* data = nullptr;
  BTHStrides stride;
};

struct MutView {
  void* data = nullptr;
  BTHStrides stride;
};

// A half-open range [begin, end) of the local token axis.
struct TokenRange {
  int64_t begin = 0;
  int64_t end = 0;
  int64_t length() const { return end - begin; }
};
inline bool operator==(TokenRange a, TokenRange b) { return a.begin == b.begin && a.end == b.end; }

// Thrown for violated preconditions; bindings turn it into the host language's error.
class Error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

[[noreturn]] void fail(const std::string& message);

#define LASP2_CHECK(cond, msg)                                              \
  do {                                                                      \
    if (!(cond)) ::lasp2::fail(std::string("lasp2: ") + (msg));             \
  } while (0)

}  // namespace lasp2
