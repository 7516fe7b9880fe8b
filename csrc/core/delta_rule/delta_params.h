// One gated delta-rule problem on one device (GDN, and KDA with per-key gates).
//
// Math, per batch row b and head h (q, k in R^{dk}, v in R^{dv}, S is dk x dv, fp32):
//   S_t = (I - beta_t k_t k_t^T) D_t S_{t-1} + beta_t k_t v_t^T,   o_t = scale * S_t^T q_t
// with D_t = exp(g_t) I (GDN: one log gate per token and head) or diag(exp(g_t))
// (KDA: one log gate per token, head and key dim). For GDN the order of D_t and the
// Householder-like factor does not matter; for KDA this is the order of fla's
// kernels and of Kimi Linear (decay, then the delta update).
//
// Packed documents: a token with doc_start != 0 begins a new document. The state
// before it is replaced by that document's initial state (DocStates::initial,
// indexed by doc_id) or by zero; nothing flows across the boundary.
#pragma once

#include <cstdint>

#include "lasp2/part_family.h"
#include "lasp2/types.h"

namespace lasp2::delta {

enum class GateKind : int {
  kScalar = 0,   // GDN: g is [B, T, H]
  kPerKey = 1,   // KDA: g is [B, T, H, dk] with a contiguous last dim
};

struct DeltaParams {
  int64_t batch = 0;
  int64_t seqlen = 0;  // local tokens
  int64_t heads = 0;
  int64_t dim_k = 0;
  int64_t dim_v = 0;

  ScalarType dtype = ScalarType::kFloat32;  // of q, k, v, o and their gradients
  ConstView q, k, v;

  // Gates and betas (and dg, dbeta) are float32, or float64 on the CPU so that
  // float64 gradient checks see exact values.
  ScalarType gate_dtype = ScalarType::kFloat32;
  GateKind gate_kind = GateKind::kScalar;
  const void* g = nullptr;     // log gates (<= 0)
  BTHStrides g_stride;         // kPerKey: strides of the [B, T, H, dk] rows
  const void* beta = nullptr;  // [B, T, H], in (0, 1)
  BTHStrides beta_stride;

  double scale = 1.0;

  // Optional packed documents (B = 1 when used by the schedule): uint8 per local
  // token, and the global index of the document each token belongs to.
  const uint8_t* doc_start = nullptr;
  const int32_t* doc_id = nullptr;
  int64_t doc_batch_stride = 0;

  int chunk_size = 64;

  int64_t bh() const { return batch * heads; }
  int64_t state_elems() const { return dim_k * dim_v; }
  int64_t map_elems() const { return dim_k * dim_k; }
  bool starts_doc(int64_t b, int64_t t) const {
    return doc_start != nullptr && doc_start[b * doc_batch_stride + t] != 0;
  }
  int64_t doc_of(int64_t b, int64_t t) const {
    return doc_id != nullptr ? doc_id[b * doc_batch_stride + t] : b;
  }
  // Log gate of dim i at (b, t, h) (the same for every i with a scalar gate).
  double gate(int64_t b, int64_t t, int64_t h, int64_t i) const {
    const int64_t index = gate_kind == GateKind::kScalar ? g_stride.offset(b, t, h)
                                                         : g_stride.offset(b, t, h) + i;
    return gate_dtype == ScalarType::kFloat64 ? static_cast<const double*>(g)[index]
                                              : static_cast<const float*>(g)[index];
  }
  double beta_at(int64_t b, int64_t t, int64_t h) const {
    const int64_t index = beta_stride.offset(b, t, h);
    return gate_dtype == ScalarType::kFloat64 ? static_cast<const double*>(beta)[index]
                                              : static_cast<const float*>(beta)[index];
  }
};

// Per-document states, fp32 [num_docs, H, dk, dv], indexed (doc * H + h): the
// schedule's DocStates (lasp2/part_family.h). Without packed documents a batch row is
// a document (doc = b).
using DocStates = ::lasp2::DocStates;

// Throws lasp2::Error naming the field when `p` cannot describe a problem: negative
// sizes, head dims below 1, null q / k / v / g / beta with tokens to read, a non-finite
// scale, chunk_size below 1, an unknown gate dtype or kind. DeltaFamily checks it on
// construction, so every schedule and backend path does.
void check_delta_params(const DeltaParams& p);

}  // namespace lasp2::delta
