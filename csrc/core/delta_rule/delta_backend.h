// The per-device kernels of the delta-rule family. Each call works on a token
// range ("part") of the local sequence; states are fp32 [B*H, dk, dv], maps fp32
// [B*H, dk, dk]. A part is an affine map of the state entering it:
//   S_out = A S_in + M        (A: product of the part's transitions, M: S_out from zero)
// A part that contains a document start has A = 0 exactly: the state is replaced
// at the start, so nothing of S_in reaches S_out.
// The *head* of a part is its tokens before its first document start (the whole
// part when it has none, empty when it starts with one); its map (A_head, M_head)
// gives the end state of the document that enters the part and ends inside it.
#pragma once

#include <memory>
#include <vector>

#include "delta_rule/delta_params.h"
#include "lasp2/copy_rows.h"
#include "lasp2/kept_part_work.h"
#include "lasp2/types.h"

namespace lasp2::delta {

// What a backend's entering_dstate may keep for the backward of the same part in the
// same call (lasp2/kept_part_work.h; the CUDA backend: its chunked kernels' per-chunk w,
// u, T, meta and r), so that backward need not form it again.

// The backward that will follow entering_dstate_keeping on a part: whether it can take
// the kept work depends on its gradient views and on per-document states (with those the
// token walks run, and anything kept would only be held through the AllGather unused).
struct BackwardPlan {
  MutView dq, dk, dv;
  bool doc_states = false;  // initial states, end-state gradients or initial-state gradients
  // Nullable: what forward_keeping wrote for this part (forward_kept_floats values).
  const float* forward_kept = nullptr;
};

class DeltaKernelBackend {
 public:
  virtual ~DeltaKernelBackend() = default;
  virtual Device device() const = 0;

  // (A, M) of the part and of its head (head_A = I, head_M = 0 when the part starts
  // with a document start). Documents begun inside the part start from
  // doc.initial; the end states of those that also end inside it go to doc.finals.
  virtual void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc,
                            float* A, float* M, float* head_A, float* head_M,
                            void* stream) const = 0;

  // o over the part with `entering` (nullable: zero) entering it.
  virtual void forward(const DeltaParams& p, TokenRange part, const float* entering,
                       const DocStates& doc, MutView o, void* stream) const = 0;

  // What the forward can keep for the backward of the same part with the same entering
  // state (the CUDA chunked kernels: per-chunk w, meta, T (KDA: w, qg, kd, P, eL, T),
  // v_new and the 16-bit state entering each chunk), in fp32 values on the device; 0 (the
  // default, the CPU): nothing.
  // It depends on the params' sizes, dtypes and gate kind alone (not on the views'
  // alignment), so a caller can size the buffer before the call.
  virtual int64_t forward_kept_floats(const DeltaParams& p, TokenRange part) const {
    (void)p, (void)part;
    return 0;
  }
  // forward, also writing `kept` (nullable; forward_kept_floats(p, part) values) where
  // the chunked kernels take the part. The backward calls of the same part read it
  // through BackwardPlan::forward_kept / backward_reusing's forward_kept only when
  // their own chunked kernels take the part, which needs everything the forward's did.
  virtual void forward_keeping(const DeltaParams& p, TokenRange part, const float* entering,
                               const DocStates& doc, MutView o, float* kept, void* stream) const {
    (void)kept;
    forward(p, part, entering, doc, o, stream);
  }

  // Gradient of the entering state from the part's own outputs (no gradient on
  // any state the part leaves): sweeps the head backwards, needs no states.
  virtual void entering_dstate(const DeltaParams& p, TokenRange part, ConstView dout,
                               float* dentering, void* stream) const = 0;

  // Local backward with `entering` (nullable) entering and `leaving_dstate`
  // (nullable) the gradient of the state leaving the part. The head's end state
  // receives doc.final_dstate of its document, inner documents' end states theirs;
  // doc.d_initial gets the gradients of the initial states of documents begun
  // inside the part. dg is [B, T, H] (scalar gates) or [B, T, H, dk] (per-key),
  // dbeta [B, T, H], both contiguous in the gate dtype. dentering is nullable.
  virtual void backward(const DeltaParams& p, TokenRange part, ConstView dout,
                        const float* entering, const float* leaving_dstate,
                        const DocStates& doc, MutView dq, MutView dk, MutView dv, void* dg,
                        void* dbeta, float* dentering, void* stream) const = 0;

  // The same two calls when one caller runs both on one part (the SP schedules'
  // backward): entering_dstate_keeping returns what backward_reusing of that part, with
  // the same params and dout and the gradients `plan` describes, can reuse (null:
  // nothing; by default nothing is kept and the calls above run). forward_kept
  // (nullable, also in plan) is what forward_keeping of the part wrote, with the same
  // `entering`: prep and the state pass are not run again. Results equal the calls above.
  virtual std::unique_ptr<KeptPartWork> entering_dstate_keeping(const DeltaParams& p, TokenRange part,
                                                                ConstView dout, const BackwardPlan& plan,
                                                                float* dentering, void* stream) const {
    (void)plan;
    entering_dstate(p, part, dout, dentering, stream);
    return nullptr;
  }
  virtual void backward_reusing(const KeptPartWork* kept, const DeltaParams& p, TokenRange part,
                                ConstView dout, const float* entering, const float* leaving_dstate,
                                const DocStates& doc, MutView dq, MutView dk, MutView dv, void* dg,
                                void* dbeta, float* dentering, void* stream,
                                const float* forward_kept = nullptr) const {
    (void)kept, (void)forward_kept;
    backward(p, part, dout, entering, leaving_dstate, doc, dq, dk, dv, dg, dbeta, dentering, stream);
  }

  // --- tiny combines over part summaries (sizes independent of T) ----------
  // out = A x + y per (b, h): A [bh, dk, dk], x, y [bh, dk, dv]; y nullable.
  virtual void apply_map(const float* A, const float* x, const float* y, int64_t bh, int64_t dk,
                         int64_t dv, float* out, void* stream) const = 0;
  // out += A^T x per (b, h).
  virtual void apply_map_transposed_add(const float* A, const float* x, int64_t bh, int64_t dk,
                                        int64_t dv, float* out, void* stream) const = 0;
  virtual void add(float* dst, const float* src, int64_t count, void* stream) const = 0;
  virtual void copy(float* dst, const float* src, int64_t count, void* stream) const = 0;
  virtual void fill_zero(float* dst, int64_t count, void* stream) const = 0;
  // dst[r * count, +count) = rows[r] (null: zeros); the CUDA backend does it in one launch.
  virtual void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const {
    copy_rows_one_by_one(*this, dst, rows, count, stream);
  }
};

const DeltaKernelBackend& delta_cpu_backend();
const DeltaKernelBackend& delta_backend_for(Device device);

}  // namespace lasp2::delta
