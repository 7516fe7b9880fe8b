// Host-visible arguments and launchers of the chunked (WY / UT-transform) tensor-core
// kernels for KDA (per-key log gates g[B, T, H, d_k]) in 16-bit inputs, d_k = d_v in
// {64, 128}: forward, part summary and the entering state's gradient, and the passes the
// backward (kda_chunk_bwd.h) reads; the prep's kernel lives in kda_prep.cu, the others
// in kda_chunk.cu. The math is the CPU backend's (cpu/delta_chunk.h) on the GDN
// kernels' fixed 64-token chunks (delta_chunk.h), with G_x the within-chunk cumulative
// log gate of token x, a d_k vector, and S0 the state entering the chunk:
//
//   prep    (chunk-parallel) G; L_xy = beta_x k_x^T diag(e^{G_x - G_y}) k_y (y < x),
//           P_xy = scale q_x^T diag(e^{G_x - G_y}) k_y (y <= x), every pair on
//           tensor cores (the decays factored as below);
//           T = (I + L)^-1; w = T diag(beta) (e^G . K) [s = 0], u = T diag(beta) V;
//           qg_x = scale e^{G_x} . q_x [s_x = 0], kd_y = e^{G_last - G_y} . k_y
//           [s_y = s_last], eL = e^{G_last} [one segment]
//   states  (sequential over chunks, one block per (b, h) and 16 state columns)
//           v_new = u - w S; S <- diag(eL) S + kd^T v_new; the same pass over the
//           columns of [A | M] from [I | 0] gives the part summary
//   output  (chunk-parallel) o = qg S_c + P v_new
//   rprep, rstates (entering_dstate) r = -(P^T dO); backwards over the chunks
//           X <- diag(eL) X + w^T (r - kd X) + qg^T dO
//
// Where GDN's kernels scale a whole token row by one decay (e^{G_x}, e^{G_last - G_y},
// e^{G_last}), KDA scales each element: the per-row factors become the qg, kd and the
// T diag(beta) (e^G . K) tiles (formed once in prep, so the state pass and the output
// pass are plain products) and the per-row eL of the state. The pair decays
// e^{G_x - G_y} of L and P are not a rank-one product of a row and a column factor, so
// they factor at a token r between y and x: e^{G_x - G_r} e^{G_r - G_y}, both <= 1 (the
// gates are <= 0), as (e^{G_x - G_r} . k_x) times (e^{G_r - G_y} . k_y) on tensor cores
// (kda_prep.cu picks r by the highest bit in which x and y differ, six "levels" of
// 16 x 16 tiles). No exponent is positive, so nothing overflows; a factor that
// underflows multiplies a product that is that small anyway.
//
// Segments: as in delta_chunk.h, a document start begins a segment of the chunk (G
// adds 0 there; tokens of different segments never interact; only segment 0 sees the
// entering state). A log gate is clamped at kKdaGateFloor (-40: e^-40 = 4e-18, which
// no 16-bit product resolves), so -inf gates (the key dim forgotten) never form
// -inf - (-inf) and G stays within 64 * 40 of zero.
#pragma once

#include <cuda_runtime.h>

#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_launch.h"

namespace lasp2::delta::gpu {

constexpr float kKdaGateFloor = -40.f;

// Per-part scratch of the KDA chunk kernels, rows = bh * nchunks * 64:
// w, u, qg, kd [rows][d] 16-bit; P [bh][nchunks][64][64] 16-bit; eL [bh][nchunks][d]
// fp32. head_end as ChunkPrep::head_end (the head maps of a part with documents).
struct KdaPrep {
  void* w = nullptr;
  void* u = nullptr;
  void* qg = nullptr;
  void* kd = nullptr;
  void* p = nullptr;
  float* eL = nullptr;
  const int* head_end = nullptr;
  void* t = nullptr;  // nullable: T = (I + L)^-1, 16-bit [bh][nchunks][64][64] (the backward's)
};

// Floats of each KdaPrep buffer for a problem (w, u, qg, kd, p, eL in that order).
struct KdaPrepSizes {
  int64_t rows_half, p_half, eL;
};
inline KdaPrepSizes kda_prep_sizes(const Problem& p) {
  const int64_t chunks = p.bh() * chunk_count(p);
  const int64_t rows = chunks * kChunkTokens;
  return {rows * p.dk / 2, chunks * kChunkTokens * kChunkTokens / 2, chunks * p.dk};
}

// qg, kd, eL, P, w, u (and T where out.t is set) of every chunk of the part (kda_prep.cu).
void launch_kda_prep(const Problem& p, const KdaPrep& out, cudaStream_t s);

// The state pass (ChunkStatesOut as delta_chunk.h: entering, v_new, 16-bit states
// entering each chunk, leaving; ckpt unused) and the part summary (ChunkSummaryOut).
void launch_kda_states(const Problem& p, const KdaPrep& prep, const ChunkStatesOut& out, cudaStream_t s);
void launch_kda_summary(const Problem& p, const KdaPrep& prep, const ChunkSummaryOut& out, cudaStream_t s);

// o over the part from qg, P, v_new and the 16-bit chunk states.
void launch_kda_output(const Problem& p, const KdaPrep& prep, const void* v_new, const void* states,
                       const ForwardOut& out, cudaStream_t s);

// The gradient of the state entering the part from the part's own outputs dO (the
// backend's entering_dstate): r = -(P^T dO) per chunk into `r` (16-bit [rows][d], the
// size of w), then the reverse state pass X <- diag(eL) X + w^T (r - kd X) + qg^T dO
// from X = 0 at the part's end; `entering` fp32 [bh][dk][dv]. A chunk with a document
// start passes nothing back (its eL is 0 and its w, kd and qg rows lie in different
// segments), so this is the gradient through the part's head, as the walks give it.
void launch_kda_entering_dstate(const Problem& p, const KdaPrep& prep, View dout, void* r, float* entering,
                                cudaStream_t s);

// The same rprep and reverse pass for the backward (kda_chunk_bwd.h): X starts from
// `leaving` (fp32 [bh][dk][dv], the gradient of the state leaving the part; null: zero),
// the 16-bit X leaving each chunk goes to `dh` ([bh][nchunks][dk][dv]) and the last X
// to `entering`; both nullable.
void launch_kda_rstates(const Problem& p, const KdaPrep& prep, View dout, void* r, const float* leaving, void* dh,
                        float* entering, cudaStream_t s);

}  // namespace lasp2::delta::gpu
