// The CUDA delta-rule backend's routing: its argument checks, the kernel-side problem a call
// becomes, and which kernels take a call (chunked or token-recurrent, GDN or KDA, forward kept
// or not). delta_cuda_backend.cpp launches what these decide.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "delta_rule/cuda/delta_launch.h"
#include "delta_rule/delta_backend.h"
#include "delta_rule/delta_params.h"

namespace lasp2::delta::cuda_route {

// The kernels' element type of q, k, v (an Error naming them for other dtypes).
gpu::Elem elem_of(ScalarType t);

gpu::View view_of(ConstView v);

// What every call checks first: dtypes, head dims 1..128, sizes, the token range, gates
// and betas present. A lasp2::Error naming what is wrong.
void check_params(const DeltaParams& p, TokenRange part);

// The kernels' view of a call over `part` (one segment; segmented() cuts it), with each
// document's initial state from `doc_initial` (nullable).
gpu::Problem problem_of(const DeltaParams& p, TokenRange part, const float* doc_initial);

// 16-byte-aligned rows of 16-bit values: what the chunked kernels' copies need.
bool rows_aligned(const void* ptr, int64_t sb, int64_t st, int64_t sh);
bool rows_aligned(ConstView v);

// Whether the chunked kernels take the call (delta_chunk.h): GDN, 16-bit inputs,
// d_k = d_v in {64, 128}, q, k, v and `extra` in 16-byte-aligned rows.
bool chunked(const DeltaParams& p, TokenRange part, std::initializer_list<ConstView> extra);

// Whether the KDA chunk kernels (kda_chunk.h) take a forward, part_summary or
// entering_dstate call: what chunked() asks of GDN, with per-key gates.
// LASP2_DELTA_KDA_CHUNKED=0 (or LASP2_DELTA_CHUNKED=0) keeps the recurrent kernels;
// the backward takes kda_backward_chunked() below.
bool kda_chunked(const DeltaParams& p, TokenRange part, std::initializer_list<ConstView> extra);

// Whether the KDA chunked backward (kda_chunk_bwd.h) takes a backward call: kda_chunked()
// with dout, dq, dk and dv, the block's shared memory (191.75 KiB at d = 128: sm_90, not
// sm_80), and no per-document states with packed documents (as GDN's).
// LASP2_DELTA_KDA_CHUNKED_BWD=0 keeps the recurrent backward.
bool kda_backward_chunked(const DeltaParams& p, TokenRange part, ConstView dout, MutView dq, MutView dk, MutView dv,
                          bool doc_states);

// Whether the GDN chunked backward takes the call (else the token walks): 16-bit aligned
// views, the chunk kernel's shared memory, and no per-document states (documents begun
// inside a chunk start from zero there, receive no end-state gradient and give none to
// their initial state in the chunked kernels).
bool chunk_backward_takes(const DeltaParams& p, TokenRange part, ConstView dout, const BackwardPlan& plan);
// The views and the chunk kernel's shared memory alone (packed documents with their
// states: the backend's chunked_doc_backward).
bool chunk_backward_fits(const DeltaParams& p, TokenRange part, ConstView dout, const BackwardPlan& plan);

// Cuts the part into segments that the walks run in parallel (delta_launch.h).
gpu::Problem segmented(gpu::Problem g);

// Whether the forward keeps its chunked kernels' outputs for the backward (forward_kept_floats
// > 0): everything of chunked() and chunk_backward_takes() (GDN) or of kda_chunked() and
// kda_backward_chunked() (KDA) that the params' sizes, dtypes and gate kind decide (the
// views' alignment is checked by each call).
bool keeps_forward_params(const DeltaParams& p);

}  // namespace lasp2::delta::cuda_route
