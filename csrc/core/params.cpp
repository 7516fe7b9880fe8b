// Preconditions of AttentionParams that every backend relies on (params.h). The CPU
// kernels index the raw pointers directly, so a value these checks let through would
// read out of bounds or loop forever instead of failing.
#include <cmath>
#include <string>

#include "lasp2/params.h"

namespace lasp2 {
namespace {

bool is_float_type(ScalarType t) {
  return t == ScalarType::kFloat32 || t == ScalarType::kFloat64 || t == ScalarType::kFloat16 ||
         t == ScalarType::kBFloat16;
}

}  // namespace

void check_problem_fields(const char* owner, int64_t batch, int64_t seqlen, int64_t heads, int64_t dim_k,
                          int64_t dim_v, double scale, int chunk_size, const ConstView& q, const ConstView& k,
                          const ConstView& v) {
  const std::string o(owner);
  const auto size = [&](const char* name, int64_t value) {
    LASP2_CHECK(value >= 0, o + "." + name + " must be >= 0, got " + std::to_string(value));
  };
  size("batch", batch);
  size("seqlen", seqlen);
  size("heads", heads);
  // A zero head dim has no state to carry; the CUDA kernels reject it too.
  LASP2_CHECK(dim_k >= 1, o + ".dim_k must be >= 1, got " + std::to_string(dim_k));
  LASP2_CHECK(dim_v >= 1, o + ".dim_v must be >= 1, got " + std::to_string(dim_v));
  LASP2_CHECK(std::isfinite(scale), o + ".scale must be finite, got " + std::to_string(scale));
  // chunk_size 0 never advances the CPU kernels' chunk loop (a hang), a negative one
  // skips every token.
  LASP2_CHECK(chunk_size >= 1, o + ".chunk_size must be >= 1, got " + std::to_string(chunk_size));
  // Empty tensors may come with null data (torch's empty storage): only a problem with
  // tokens to read.
  const bool tokens = batch * seqlen * heads > 0;
  LASP2_CHECK(!tokens || q.data != nullptr, o + ".q.data is null");
  LASP2_CHECK(!tokens || k.data != nullptr, o + ".k.data is null");
  LASP2_CHECK(!tokens || v.data != nullptr, o + ".v.data is null");
}

void check_attention_params(const AttentionParams& p) {
  check_problem_fields("AttentionParams", p.batch, p.seqlen, p.heads, p.dim_k, p.dim_v, p.scale, p.chunk_size, p.q,
                       p.k, p.v);
  LASP2_CHECK(is_float_type(p.dtype), "AttentionParams.dtype is not a float type");
  const bool tokens = p.batch * p.seqlen * p.heads > 0;

  const DecayParams& d = p.decay;
  LASP2_CHECK(d.mode == DecayMode::kNone || d.mode == DecayMode::kFixed || d.mode == DecayMode::kGate,
              "AttentionParams.decay.mode is not a DecayMode");
  if (d.mode != DecayMode::kNone) {
    LASP2_CHECK(d.dtype == ScalarType::kFloat32 || d.dtype == ScalarType::kFloat64,
                "AttentionParams.decay.dtype must be float32 or float64");
  }
  LASP2_CHECK(!tokens || d.mode != DecayMode::kFixed || d.log_decay != nullptr,
              "AttentionParams.decay.log_decay is null with DecayMode::kFixed");
  LASP2_CHECK(!tokens || d.mode != DecayMode::kGate || d.gate != nullptr,
              "AttentionParams.decay.gate is null with DecayMode::kGate");
  LASP2_CHECK(p.doc_start == nullptr || p.doc_start_batch_stride >= 0,
              "AttentionParams.doc_start_batch_stride must be >= 0, got " +
                  std::to_string(p.doc_start_batch_stride));
}

void check_gradient_views(const ConstView& dout, const MutView& dq, const MutView& dk, const MutView& dv,
                          int64_t batch, int64_t seqlen, int64_t heads) {
  LASP2_CHECK(batch * seqlen * heads == 0 || dout.data != nullptr, "dout.data is null");
  check_output_view(dq, batch, seqlen, heads, "dq");
  check_output_view(dk, batch, seqlen, heads, "dk");
  check_output_view(dv, batch, seqlen, heads, "dv");
}

void check_output_view(const MutView& view, int64_t batch, int64_t seqlen, int64_t heads, const char* name) {
  if (batch * seqlen * heads <= 0) return;
  const std::string what(name);
  const BTHStrides& stride = view.stride;
  LASP2_CHECK(view.data != nullptr, what + ".data is null");
  LASP2_CHECK(batch == 1 || stride.batch != 0, what + ".stride.batch is 0 with batch > 1");
  LASP2_CHECK(seqlen == 1 || stride.seq != 0, what + ".stride.seq is 0 with seqlen > 1");
  LASP2_CHECK(heads == 1 || stride.head != 0, what + ".stride.head is 0 with heads > 1");
}

}  // namespace lasp2
