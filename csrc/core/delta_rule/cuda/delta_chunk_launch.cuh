// The host side every chunked GDN pass launches through (delta_chunk_prep.cu,
// delta_chunk_states.cu, delta_chunk_scores.cu, delta_chunk_rstates.cu): the error check,
// shared-memory opt-in and dispatch of delta_chunk_dispatch.h bound to this family's
// message prefix, the chunk-parallel grid and the A/B kernel knobs read at every launch.
// Written once so that the four files cannot drift apart in what their errors say or how
// a knob is read. Included by .cu files only; internal linkage.
#pragma once

#include <cuda_runtime.h>

#include <string>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

constexpr const char* kWho = "lasp2 (CUDA delta rule, chunked)";

inline void check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

template <typename Kernel>
void allow(Kernel kernel, int bytes, const char* what) {
  chunk_allow_smem(kernel, bytes, kWho, what);
}

// Calls f(T{}, integral_constant D) for p (16-bit inputs, d = 64 or 128).
template <typename F>
void dispatch(const Problem& p, F&& f) {
  chunk_dispatch<false>(p, kWho, f);
}

inline dim3 chunk_grid(const Problem& p) {
  return dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh()));
}

// A kernel choice read at every launch (the tests compare the two): true where `name` is
// `old`, false where it is unset, empty or `dflt`; anything else is an error (env_knob.h).
inline bool env_is(const char* name, const char* old, const char* dflt) {
  return env_choice(name, {dflt, old}, 0) == 1;
}

}  // namespace
}  // namespace lasp2::delta::gpu
