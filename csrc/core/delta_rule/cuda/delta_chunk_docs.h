// Packed documents with their own initial states (DocStates::initial) and end states
// (DocStates::finals) on the chunked GDN kernels (delta_chunk.h); the kernels live in
// delta_chunk_docs.cu.
//
// The chunk kernels' segments begun inside a chunk start from zero. A document d begun
// at token x0 of a chunk starts from H_d instead: by the recurrence (delta_params.h) the
// state entering token y's delta update, within the segment begun at x0 (to the next
// document start or -inf gate), is f_y H_d plus the chunk form's state from zero, with
// f_y = exp(g_x0 + ... + g_y) (H_d decays by its first token's gate too; f = 0 from a
// -inf gate on). Every chunk quantity is linear in that, so with the chunk meta {G, s}
// and T = (I + L)^-1 of prep:
//   v_new = T diag(beta) (V - diag(f) K H)   prep run on V' = V - diag(f) K H
//   o_x  += scale f_x q_x . H                launch_chunk_doc_output, after the output
//   S_leaving += f_last H                    the state pass (ChunkStatesOut::doc_*), when
//                                            the chunk's last token is in such a segment
// and the end state of a document whose last token e lies in chunk c is
//   S_e = [s_e = 0] e^{G_e} S_c + f_e H + sum_{y <= e, s_y = s_e} e^{G_e - G_y} k_y v_new_y^T
// (launch_chunk_doc_finals; S_c is the state pass's 16-bit state entering chunk c).
// Documents begun before the chunk carry their state through the state pass as before.
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/delta_chunk.h"

namespace lasp2::delta::gpu {

struct ChunkDocs {
  const float* initial = nullptr;  // DocStates::initial: [docs][H][dk][dv] fp32
  // Per token row [bh][nchunks * 64] (launch_chunk_doc_prep): f_y above (0 outside the
  // first segment of a document begun inside the chunk) and the index doc * H + h of
  // that document's state (-1 where f = 0).
  float* f = nullptr;
  int* idx = nullptr;
  // V' = V - diag(f) K H in the input dtype, [B][seqlen][H][dv] contiguous (rows of the
  // part written).
  void* v = nullptr;
};

// f, idx and V' of the part's chunks.
void launch_chunk_doc_prep(const Problem& p, const ChunkDocs& d, cudaStream_t s);

// o_x += scale f_x q_x . H over the part (after launch_chunk_output).
void launch_chunk_doc_output(const Problem& p, const ChunkDocs& d, const ForwardOut& out, cudaStream_t s);

// The end states of the documents begun and ended inside the part (the token after
// their last one is a document start of the part, and some document start of the part
// precedes it: firsts[b] from launch_firsts), as the recurrent summary writes them:
// finals[(doc * H + h)][dk][dv]. f and idx nullable (no initial states: zero).
struct ChunkDocFinals {
  const float* meta = nullptr;    // {G, s} of the prep that gave v_new
  const void* v_new = nullptr;    // [bh][nchunks * 64][dv], 16-bit
  const void* states = nullptr;   // [bh][nchunks][dk][dv], 16-bit: the state entering each chunk
  const int* firsts = nullptr;    // [batch]: part-relative first document start, -1: none
  float* finals = nullptr;
};
void launch_chunk_doc_finals(const Problem& p, const ChunkDocs& d, const ChunkDocFinals& a, cudaStream_t s);

// The backward (delta_cuda_backend.cpp: prep, the state passes and the chunk backward
// as without documents, on V'): per chunk, whether a document starts in it (flags,
// [batch][nchunks]: the chunks whose gradients the token-recurrent backward recomputes
// from the chunked passes' fp32 entering state and 16-bit leaving gradient, with the
// documents' initial states and end-state gradients), and the end-state gradient that
// takes X's place in the reverse state pass (ChunkReverseOut::doc_end_*): the document
// ending just before the chunk's first document start, when that end lies in segment 0
// (no -inf gate before it in the chunk) and the start is not the part's first token.
struct ChunkDocEnds {
  const float* final_dstate = nullptr;  // nullable: DocStates::final_dstate
  int* end_idx = nullptr;               // [bh][nchunks]
  float* end_g = nullptr;               // [bh][nchunks]
  int* flags = nullptr;                 // [batch][nchunks]
};
void launch_chunk_doc_ends(const Problem& p, const ChunkDocEnds& e, cudaStream_t s);

// out[bh][c] = float(dh[bh][c]) ([dk][dv] each) for the flagged chunks.
void launch_chunk_doc_dh32(const Problem& p, const void* dh, const int* flags, float* out, cudaStream_t s);

}  // namespace lasp2::delta::gpu
