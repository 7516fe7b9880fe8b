// The description of one causal linear attention problem on one device, as the
// kernels see it. Backends (CPU, CUDA) receive this struct plus a token range.
//
// Math (per batch b and head h, with q, k in R^{dk}, v in R^{dv}):
//   S_t = a_t * S_{t-1} + k_t v_t^T        (S_{-1} = initial state, d_k x d_v, fp32)
//   o_t = scale * q_t^T S_t
// where a_t = exp(g_t) and g_t is 0, log_decay[h] or gate[b, t, h] (see DecayMode).
// A token with doc_start[t] != 0 begins a new document: S_{t-1} is dropped (a_t = 0).
#pragma once

#include "lasp2/types.h"

namespace lasp2 {

// Decay values, and the gate gradient dg, are float32 (float64 allowed on the CPU,
// so that float64 gradient checks see exact gates).
struct DecayParams {
  DecayMode mode = DecayMode::kNone;
  ScalarType dtype = ScalarType::kFloat32;
  const void* log_decay = nullptr;  // kFixed: [H], log of the per-step decay (<= 0)
  const void* gate = nullptr;       // kGate: log gates, [B, T, H] with gate_stride
  BTHStrides gate_stride;           // head stride is the element stride along H

  double at(int64_t b, int64_t t, int64_t h) const {
    const void* base = nullptr;
    int64_t index = 0;
    switch (mode) {
      case DecayMode::kFixed:
        base = log_decay;
        index = h;
        break;
      case DecayMode::kGate:
        base = gate;
        index = gate_stride.offset(b, t, h);
        break;
      default:
        return 0.0;
    }
    return dtype == ScalarType::kFloat64 ? static_cast<const double*>(base)[index]
                                         : static_cast<const float*>(base)[index];
  }
};

struct AttentionParams {
  // Sizes of the local problem.
  int64_t batch = 0;
  int64_t seqlen = 0;  // local tokens on this device
  int64_t heads = 0;
  int64_t dim_k = 0;
  int64_t dim_v = 0;

  ScalarType dtype = ScalarType::kFloat32;  // of q, k, v, o and their gradients
  ConstView q, k, v;
  DecayParams decay;
  double scale = 1.0;  // kernels cast to their compute precision

  // Optional document starts for packed sequences: uint8 per local token; batch b
  // reads doc_start[b * doc_start_batch_stride + t]. nullptr = one document.
  const uint8_t* doc_start = nullptr;
  int64_t doc_start_batch_stride = 0;

  // The CPU backend's chunk length (a setting of the reference kernels, not of the
  // problem: the CUDA backend tiles in 64-token chunks of its own and ignores it).
  int chunk_size = 64;

  int64_t state_elems() const { return dim_k * dim_v; }
  int64_t bh() const { return batch * heads; }
  bool starts_doc(int64_t b, int64_t t) const {
    return doc_start != nullptr && doc_start[b * doc_start_batch_stride + t] != 0;
  }
};

// Throws lasp2::Error naming the field when `p` cannot describe a problem: negative
// sizes, head dims below 1, null q / k / v (or decay values of the decay mode) with
// tokens to read, a non-finite scale, chunk_size below 1, a negative doc_start stride.
// ScalarDecay checks it on construction, so every schedule and backend path does.
void check_attention_params(const AttentionParams& p);

// What every family's params share, checked under the struct's name `owner` (e.g.
// "AttentionParams"): sizes >= 0, head dims >= 1, a finite scale, chunk_size >= 1 and
// q / k / v data set when there are tokens. check_attention_params and
// check_delta_params add their own fields.
void check_problem_fields(const char* owner, int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k,
                          int64_t dim_v, double scale, int chunk_size, const ConstView& q, const ConstView& k,
                          const ConstView& v);

// The views of a backward: dout set when there are tokens (read only: zero strides are a
// broadcast gradient, torch's expand, and allowed), dq / dk / dv as check_output_view.
void check_gradient_views(const ConstView& dout, const MutView& dq, const MutView& dk, const MutView& dv,
                          int64_t batch, int64_t seqlen, int64_t heads);

// An output (o, dq, dk, dv) of a [batch, seqlen, heads, .] problem: its data is set
// when there are tokens, and every axis longer than one has a nonzero stride (a zero
// stride, e.g. strides left at their default, makes the tokens of that axis write one
// row: a silently wrong answer). Inputs may broadcast (torch's expand gives zero
// strides), so only outputs are checked this way. Throws lasp2::Error naming `name`.
void check_output_view(const MutView& view, int64_t batch, int64_t seqlen, int64_t heads, const char* name);

}  // namespace lasp2
