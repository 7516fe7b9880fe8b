// The per-device kernels the sequence-parallel algorithms are built from. Each
// call works on a token range ("part") of the local sequence; states are fp32
// [B, H, dk, dv] blocks, log decays fp32 [B, H]. CpuBackend and CudaBackend
// implement the same functions; tests hold them to the same references.
#pragma once

#include <memory>
#include <vector>

#include "lasp2/copy_rows.h"
#include "lasp2/kept_part_work.h"
#include "lasp2/params.h"

namespace lasp2 {

class KernelBackend {
 public:
  virtual ~KernelBackend() = default;
  virtual Device device() const = 0;

  // --- forward -------------------------------------------------------------
  // State M of `part` started from zero, and the log of its total decay
  // (-inf when a document starts inside the part).
  virtual void part_state(const AttentionParams& p, TokenRange part, float* state,
                          float* log_decay, void* stream) const = 0;

  // o over `part`, with `initial_state` (nullable: zero) entering the part.
  virtual void chunk_forward(const AttentionParams& p, TokenRange part,
                             const float* initial_state, MutView o, void* stream) const = 0;

  // o_t += scale * exp(G_t) q_t^T prefix for the tokens of `part` before its first
  // document start; G_t is the cumulative log decay from the part's first token.
  virtual void add_prefix_output(const AttentionParams& p, TokenRange part,
                                 const float* prefix_state, MutView o, void* stream) const = 0;

  // --- backward ------------------------------------------------------------
  // dM = scale * sum_t exp(G_t) q_t dO_t^T over the tokens that see the state
  // entering the part: the gradient of that state.
  virtual void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout,
                           float* dstate, void* stream) const = 0;

  // dq over `part` with `initial_state` (nullable) entering it. When q_dot_dq is
  // given ([B, T, H] contiguous, of the decay dtype, local token index) it
  // receives q_t . dq_t.
  virtual void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                                 const float* initial_state, MutView dq, void* q_dot_dq,
                                 void* stream) const = 0;

  // dk, dv over `part`, with `final_dstate` (nullable) the gradient of the state
  // leaving it. When dg is given ([B, T, H] contiguous, decay dtype) it receives
  //   dg_t = sum_{t' >= t in part} (q.dq - k.dk)_{t'} + dg_offset[b, h]
  // which needs q_dot_dq from chunk_backward_dq; dg_offset may be null (zero).
  virtual void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                                   const float* final_dstate, MutView dk, MutView dv,
                                   const void* q_dot_dq, const float* dg_offset, void* dg,
                                   void* stream) const = 0;

  // --- states kept from forward for backward (optional) --------------------
  // A backend whose dq pass starts from states its forward pass computes anyway may
  // keep them: saved_states_floats(p, part) fp32 values on its device (0, the default:
  // it keeps none). The CUDA backend keeps the states entering each of the part's
  // segments from the part's own tokens (its exit-weighted segment states scanned from
  // zero; batch x heads x segments x dk x dv, docs/kernels.md), which do not depend on
  // the state entering the part.
  virtual int64_t saved_states_floats(const AttentionParams& p, TokenRange part) const {
    (void)p;
    (void)part;
    return 0;
  }
  // What that size follows, for callers that size the buffer from symbolic shapes (the
  // torch op's fake function mirrors it, lasp2/ops/_library.py): a part of n tokens has
  // c = ceil(n / 64) chunks cut into segments of s = forced_seg_chunks (if > 0) else
  // max(4, ceil(c / max(1, target_blocks / (B*H)))) chunks, clamped to [1, max(1, c)];
  // with nseg = ceil(c / s) > 1 segments it keeps B*H*nseg*dk*dv values, else none.
  // target_blocks = 0: the backend keeps nothing.
  struct SavedStatesPlan {
    int64_t target_blocks = 0;
    int forced_seg_chunks = 0;
  };
  virtual SavedStatesPlan saved_states_plan(const AttentionParams& p) const {
    (void)p;
    return {};
  }
  // part_state, also keeping what chunk_forward_kept over the same part, inputs and params
  // then reads (kept_part_work.h): LASP-2 on P > 1 ranks summarizes each part, then runs its
  // output pass, which walks the same segments first. The CUDA backend writes into `saved`
  // (nullable) the states chunk_forward_kept would keep, and keeps its per-token meta.
  // Null: nothing kept (the default).
  virtual std::unique_ptr<KeptPartWork> part_state_keeping(const AttentionParams& p, TokenRange part,
                                                           float* state, float* log_decay, float* saved,
                                                           void* stream) const {
    (void)saved;
    part_state(p, part, state, log_decay, stream);
    return nullptr;
  }
  // chunk_forward, reading what part_state_keeping kept (`kept`, null: nothing) instead of
  // computing it again, and otherwise writing the states above into `saved` (nullable: keep
  // none) for chunk_backward_dq_keeping. The same results as chunk_forward.
  virtual void chunk_forward_kept(const AttentionParams& p, TokenRange part, const float* initial_state,
                                  MutView o, float* saved, KeptPartWork* kept, void* stream) const {
    (void)saved;
    (void)kept;
    chunk_forward(p, part, initial_state, o, stream);
  }

  // --- work kept between calls over one part (optional; kept_part_work.h) -----
  // part_dstate, also keeping what the dq and dk/dv passes over the same part, inputs and
  // params then read (LASP-2's backward on P > 1 ranks asks for the part's entering-state
  // gradient first): the CUDA backend keeps the entry-weighted segment states of (q, dO)
  // that the dk/dv pass walks first, and the per-token meta. Null: none kept (the default).
  virtual std::unique_ptr<KeptPartWork> part_dstate_keeping(const AttentionParams& p, TokenRange part,
                                                            ConstView dout, float* dstate, void* stream) const {
    part_dstate(p, part, dout, dstate, stream);
    return nullptr;
  }
  // chunk_backward_dq reading the states chunk_forward_kept wrote into `saved` over the same
  // part, inputs and params (nullable: computed again) and what `kept` holds (nullable), and
  // returning what the dk/dv pass over the same part then reads: `kept`, or work of its own
  // (the CUDA backend's meta, which one device's dk/dv pass would compute again). The same
  // results as chunk_backward_dq; the default returns `kept`.
  virtual std::unique_ptr<KeptPartWork> chunk_backward_dq_keeping(const AttentionParams& p, TokenRange part,
                                                                  ConstView dout, const float* initial_state,
                                                                  MutView dq, void* q_dot_dq, const float* saved,
                                                                  std::unique_ptr<KeptPartWork> kept,
                                                                  void* stream) const {
    (void)saved;
    chunk_backward_dq(p, part, dout, initial_state, dq, q_dot_dq, stream);
    return kept;
  }
  // chunk_backward_dkdv reading `kept` (from part_dstate_keeping or chunk_backward_dq_keeping
  // over the same part, inputs and params; null: computed again). The same results.
  virtual void chunk_backward_dkdv_kept(const AttentionParams& p, TokenRange part, ConstView dout,
                                        const float* final_dstate, MutView dk, MutView dv,
                                        const void* q_dot_dq, const float* dg_offset, void* dg,
                                        KeptPartWork* kept, void* stream) const {
    (void)kept;
    chunk_backward_dkdv(p, part, dout, final_dstate, dk, dv, q_dot_dq, dg_offset, dg, stream);
  }

  // --- combine (tiny, sizes independent of the sequence length) ------------
  // parts[i] is part i's state block, log_decays is [num_parts][B*H] in global order.
  // prefix for target j: sum_{i<j} exp(sum_{i<m<j} L_m) M_i.
  virtual void combine_prefix(const std::vector<const float*>& parts, const float* log_decays,
                              int target, int64_t bh, int64_t state_elems, float* out,
                              void* stream) const = 0;
  // suffix for target j: sum_{i>j} exp(sum_{j<m<i} L_m) dM_i.
  virtual void combine_suffix(const std::vector<const float*>& parts, const float* log_decays,
                              int target, int64_t bh, int64_t state_elems, float* out,
                              void* stream) const = 0;
  // out[bh] = <exp(L) * prefix + state, dstate>: the part of dg owed to later parts.
  virtual void state_dot(const float* prefix, const float* state, const float* log_decay,
                         const float* dstate, int64_t bh, int64_t state_elems, float* out,
                         void* stream) const = 0;

  // --- memory helpers --------------------------------------------------------
  virtual void copy(float* dst, const float* src, int64_t count, void* stream) const = 0;
  virtual void fill_zero(float* dst, int64_t count, void* stream) const = 0;
  // dst[r * count, +count) = rows[r] (null: zeros); the CUDA backend does it in one launch.
  virtual void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const {
    copy_rows_one_by_one(*this, dst, rows, count, stream);
  }
  // dst += src (the schedule sums the ranks' final-state gradients with it).
  virtual void add(float* dst, const float* src, int64_t count, void* stream) const = 0;
};

const KernelBackend& cpu_backend();
#ifdef LASP2_WITH_CUDA
const KernelBackend& cuda_backend();
#endif
const KernelBackend& backend_for(Device device);

}  // namespace lasp2
