// Host-visible arguments and launchers of the chunked (WY / UT-transform) tensor-core
// kernels for the scalar-gate delta rule (GDN) in 16-bit inputs, d_k = d_v in {64, 128};
// the kernels live in delta_chunk_prep.cu (prep), delta_chunk_states.cu (states and the
// summary), delta_chunk_scores.cu (output, rprep) and delta_chunk_rstates.cu (rstates),
// with what they share in delta_chunk_state.cuh and delta_chunk_launch.cuh. The math is
// the CPU backend's (cpu/delta_chunk.h), on fixed 64-token chunks of the part:
//
//   prep     (chunk-parallel) per chunk: G (cumulative log gate, a warp scan), s (segment
//            index), L = strict_tril(diag(beta) K K^T o decay), T = (I + L)^-1 in fp32
//            blocked by 16 (diagonal blocks by substitution, then two 2 x 2 block
//            merges), w = T diag(beta e^G [s = 0]) K, u = T diag(beta) V
//   states   (sequential over chunks, one block per (b, h, 16 state columns; 32 for the
//            summary at d = 128), the next chunks' inputs in flight, 8 warps a block at
//            d = 128 and 4 at d = 64) with the state in registers:
//            v_new = u - w S; S <- e S + (diag(d) K)^T v_new; the same pass over the
//            columns of [A | M] from [I | 0] gives the part summary
//   output   (chunk-parallel) o = scale diag(e^G [s = 0]) Q S_c + (Q K^T o decay) v_new
//   rprep    (chunk-parallel, backward) r = -(P^T dO), P the scaled causal scores
//   rstates  (sequential over chunks, backwards) the gradient of each chunk's leaving
//            state: X <- e X + w^T (r - diag(d) K X) + Q^T diag(c) dO
// with, per chunk, e = e^{G_last} when no segment boundary lies in the chunk (else 0),
// d_y = e^{G_last - G_y} for tokens of the last segment (else 0), c_x = scale e^{G_x}
// for tokens of the first segment (else 0).
//
// Segments: a document start or a -inf log gate begins a new segment of the chunk
// (s counts them); tokens of different segments never interact, and only segment 0
// sees the state entering the chunk. A segment begun inside the chunk starts from zero;
// documents with their own initial states and end states add their terms around these
// kernels (delta_chunk_docs.h; the state passes take ChunkStatesOut::doc_* and
// ChunkReverseOut::doc_end_*).
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/delta_launch.h"

namespace lasp2::delta::gpu {

constexpr int kChunkTokens = 64;
constexpr int kChunkCols = 16;  // state columns per block of the sequential passes

LASP2_DELTA_HD inline int64_t chunk_count(const Problem& p) { return (p.n + kChunkTokens - 1) / kChunkTokens; }

// Per-part scratch of the chunked kernels ([bh][nchunks * 64][d] 16-bit rows, meta
// {G, s} [bh][nchunks * 64][2] fp32).
struct ChunkPrep {
  void* w = nullptr;
  void* u = nullptr;  // forward: u; backward: r
  float* meta = nullptr;
  // Nullable, [batch]: the part-relative index of each row's first document start (-1:
  // none). Tokens from there on become identity transitions (beta = 0, log gate 0, no
  // segment start), so that the state pass gives the map of the part's head.
  const int* head_end = nullptr;
  // Nullable, [bh][nchunks][64][64] 16-bit: T = (I + L)^-1 of every chunk (for the chunk
  // backward, which would otherwise invert L again).
  void* t = nullptr;
};

// w, u and meta of every chunk.
void launch_chunk_prep(const Problem& p, const ChunkPrep& out, cudaStream_t s);

// The forward state pass. entering: [bh][dk][dv] (nullable: zero). Outputs (each
// nullable): v_new ([bh][npad][dv], 16-bit), states ([bh][nchunks][dk][dv], 16-bit, the
// state entering each chunk), ckpt (the same in fp32, [bh][nchunks][dv][dk], column-major
// as the recurrent backward reads its checkpoints).
// leaving (nullable): the state leaving the part, fp32 [bh][dk][dv].
struct ChunkStatesOut {
  const float* entering = nullptr;
  void* v_new = nullptr;
  void* states = nullptr;
  float* ckpt = nullptr;
  float* leaving = nullptr;
  // Nullable (packed documents with initial states, delta_chunk_docs.h): per token row
  // [bh][nchunks * 64] the weight f of the initial state of a document begun inside its
  // chunk and that state's index (doc * H + h) in doc_initial; the state leaving a chunk
  // gains f H of the chunk's last token.
  const float* doc_f = nullptr;
  const int* doc_idx = nullptr;
  const float* doc_initial = nullptr;
};
void launch_chunk_states(const Problem& p, const ChunkPrep& prep, const ChunkStatesOut& out,
                         cudaStream_t s);

// The part's affine map S_out = A S_in + M (delta_backend.h) from the chunk maps
// A_c = e I - (diag(d) K)^T w: the state pass over the columns of [A | M] from [I | 0]
// (u = 0 for the columns of A), fp32 [bh][d][d] each; head_A, head_M (nullable)
// receive copies (a part without document starts is its own head; with them, the pass
// after a prep with head_end gives the head maps).
struct ChunkSummaryOut {
  float* A = nullptr;
  float* M = nullptr;
  float* head_A = nullptr;
  float* head_M = nullptr;
};
void launch_chunk_summary(const Problem& p, const ChunkPrep& prep, const ChunkSummaryOut& out,
                          cudaStream_t s);

// o over the part from v_new and the 16-bit chunk states.
void launch_chunk_output(const Problem& p, const ChunkPrep& prep, const void* v_new,
                         const void* states, const ForwardOut& out, cudaStream_t s);

// r = -(P^T dO) of every chunk into prep.u (prep.meta from launch_chunk_prep).
void launch_chunk_rprep(const Problem& p, View dout, const ChunkPrep& prep, cudaStream_t s);

// The reverse state pass: leaving [bh][dk][dv] (nullable: zero) leaves the part; dh
// (nullable) receives the gradient of the state leaving each chunk ([bh][nchunks][dk][dv],
// 16-bit: the chunk backward's products take it in the input dtype), entering (nullable)
// that of the state entering the part (fp32).
struct ChunkReverseOut {
  const float* leaving = nullptr;
  void* dh = nullptr;
  float* entering = nullptr;
  // Nullable (documents' end-state gradients, delta_chunk_docs.h): per chunk [bh][nchunks]
  // the index doc * H + h in doc_final of the end-state gradient F of the document ending
  // in the chunk's segment 0, just before its first document start (-1: none), and the
  // chunk's cumulative log gate G_e at that end (0 when the chunk starts with a document).
  // Such a chunk's entering gradient is e^{G_e} F - w^T diag(e^{G_e - G} [s = 0]) K F
  // plus its outputs' share: F takes X's place (dh still receives X).
  const int* doc_end_idx = nullptr;
  const float* doc_end_g = nullptr;
  const float* doc_final = nullptr;
};
void launch_chunk_rstates(const Problem& p, View dout, const ChunkPrep& prep,
                          const ChunkReverseOut& out, cudaStream_t s);

}  // namespace lasp2::delta::gpu
