// Preconditions of DeltaParams that every delta-rule backend relies on (delta_params.h):
// the CPU kernels index the raw pointers directly, so a value these checks let through
// would read out of bounds or loop forever instead of failing.
#include <string>

#include "delta_rule/delta_params.h"
#include "lasp2/params.h"

namespace lasp2::delta {

void check_delta_params(const DeltaParams& p) {
  check_problem_fields("DeltaParams", p.batch, p.seqlen, p.heads, p.dim_k, p.dim_v, p.scale, p.chunk_size, p.q, p.k,
                       p.v);
  LASP2_CHECK(p.gate_dtype == ScalarType::kFloat32 || p.gate_dtype == ScalarType::kFloat64,
              "DeltaParams.gate_dtype must be float32 or float64");
  LASP2_CHECK(p.gate_kind == GateKind::kScalar || p.gate_kind == GateKind::kPerKey,
              "DeltaParams.gate_kind is not a GateKind");
  // Empty tensors may come with null data: only a problem with tokens to read.
  const bool tokens = p.batch * p.seqlen * p.heads > 0;
  LASP2_CHECK(!tokens || p.g != nullptr, "DeltaParams.g (the log gates) is null");
  LASP2_CHECK(!tokens || p.beta != nullptr, "DeltaParams.beta is null");
  LASP2_CHECK(p.doc_batch_stride >= 0,
              "DeltaParams.doc_batch_stride must be >= 0, got " + std::to_string(p.doc_batch_stride));
}

}  // namespace lasp2::delta
