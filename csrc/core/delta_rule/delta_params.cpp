// Preconditions of DeltaParams that every delta-rule backend relies on (delta_params.h):
// the CPU kernels index the raw pointers directly, so a value these checks let through
// would read out of bounds or loop forever instead of failing.
#include <cmath>
#include <string>

#include "delta_rule/delta_params.h"

namespace lasp2::delta {

void check_delta_params(const DeltaParams& p) {
  const auto size = [](const char* name, int64_t value) {
    LASP2_CHECK(value >= 0, std::string("DeltaParams.") + name + " must be >= 0, got " + std::to_string(value));
  };
  size("batch", p.batch);
  size("seqlen", p.seqlen);
  size("heads", p.heads);
  LASP2_CHECK(p.dim_k >= 1, "DeltaParams.dim_k must be >= 1, got " + std::to_string(p.dim_k));
  LASP2_CHECK(p.dim_v >= 1, "DeltaParams.dim_v must be >= 1, got " + std::to_string(p.dim_v));
  LASP2_CHECK(std::isfinite(p.scale), "DeltaParams.scale must be finite, got " + std::to_string(p.scale));
  // chunk_size 0 never advances the CPU kernels' chunk loop (a hang).
  LASP2_CHECK(p.chunk_size >= 1, "DeltaParams.chunk_size must be >= 1, got " + std::to_string(p.chunk_size));
  LASP2_CHECK(p.gate_dtype == ScalarType::kFloat32 || p.gate_dtype == ScalarType::kFloat64,
              "DeltaParams.gate_dtype must be float32 or float64");
  LASP2_CHECK(p.gate_kind == GateKind::kScalar || p.gate_kind == GateKind::kPerKey,
              "DeltaParams.gate_kind is not a GateKind");
  // Empty tensors may come with null data: only a problem with tokens to read.
  const bool tokens = p.batch * p.seqlen * p.heads > 0;
  LASP2_CHECK(!tokens || p.q.data != nullptr, "DeltaParams.q.data is null");
  LASP2_CHECK(!tokens || p.k.data != nullptr, "DeltaParams.k.data is null");
  LASP2_CHECK(!tokens || p.v.data != nullptr, "DeltaParams.v.data is null");
  LASP2_CHECK(!tokens || p.g != nullptr, "DeltaParams.g (the log gates) is null");
  LASP2_CHECK(!tokens || p.beta != nullptr, "DeltaParams.beta is null");
  LASP2_CHECK(p.doc_batch_stride >= 0,
              "DeltaParams.doc_batch_stride must be >= 0, got " + std::to_string(p.doc_batch_stride));
}

}  // namespace lasp2::delta
