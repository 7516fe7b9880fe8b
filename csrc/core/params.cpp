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

void check_attention_params(const AttentionParams& p) {
  const auto size = [](const char* name, int64_t value) {
    LASP2_CHECK(value >= 0, std::string("AttentionParams.") + name + " must be >= 0, got " +
                                std::to_string(value));
  };
  size("batch", p.batch);
  size("seqlen", p.seqlen);
  size("heads", p.heads);
  // A zero head dim has no state to carry; the CUDA kernels reject it too.
  LASP2_CHECK(p.dim_k >= 1, "AttentionParams.dim_k must be >= 1, got " + std::to_string(p.dim_k));
  LASP2_CHECK(p.dim_v >= 1, "AttentionParams.dim_v must be >= 1, got " + std::to_string(p.dim_v));
  LASP2_CHECK(is_float_type(p.dtype), "AttentionParams.dtype is not a float type");
  LASP2_CHECK(std::isfinite(p.scale), "AttentionParams.scale must be finite, got " + std::to_string(p.scale));
  // chunk_size 0 never advances the CPU kernels' chunk loop (a hang), a negative one
  // skips every token.
  LASP2_CHECK(p.chunk_size >= 1, "AttentionParams.chunk_size must be >= 1, got " + std::to_string(p.chunk_size));

  // Empty tensors may come with null data (torch's empty storage): only a problem with
  // tokens to read.
  const bool tokens = p.batch * p.seqlen * p.heads > 0;
  LASP2_CHECK(!tokens || p.q.data != nullptr, "AttentionParams.q.data is null");
  LASP2_CHECK(!tokens || p.k.data != nullptr, "AttentionParams.k.data is null");
  LASP2_CHECK(!tokens || p.v.data != nullptr, "AttentionParams.v.data is null");

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
