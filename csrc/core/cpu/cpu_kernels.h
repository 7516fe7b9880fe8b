// Typed CPU kernels (T = float or double); CpuBackend dispatches to them.
#pragma once

#include "lasp2/params.h"

namespace lasp2::cpu {

template <typename T>
void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state,
                   MutView o, float* final_state);
void part_log_decay(const AttentionParams& p, TokenRange part, float* log_decay);
template <typename T>
void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix,
                       MutView o);

template <typename T>
void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate);
template <typename T>
void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                       const float* initial_state, MutView dq, void* q_dot_dq);
template <typename T>
void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                         const float* final_dstate, MutView dk, MutView dv,
                         const void* q_dot_dq, const float* dg_offset, void* dg);

}  // namespace lasp2::cpu
