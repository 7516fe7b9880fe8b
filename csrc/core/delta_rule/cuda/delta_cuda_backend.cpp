// DeltaKernelBackend on CUDA: the launches of each call (its argument checks and the choice
// of kernels in delta_cuda_route.h, its buffers' layouts in delta_cuda_buffers.h). Inputs
// q, k, v (and dO) in float32, float16 or bfloat16 with a contiguous last dimension and any
// [B, T, H] strides; gates and betas float32; d_k, d_v in 1..128. Accumulation, states and
// maps in float32.
//
// What each call launches:
//   part_summary     one walk over the part of the columns [A | M] from [I | 0]
//                    (chunked, below, where documents start from zero and no
//                    end states of theirs are asked for)
//   forward          one walk writing o
//   entering_dstate  one reverse walk over the head
//   backward         a forward walk storing the state every 64 tokens, the reverse
//                    walk (dv directly; dq, dk, dg, dbeta summed over state columns
//                    into an fp32 buffer), and a pass writing dq, dk, dg, dbeta
//
// GDN in fp16 / bf16 with d_k = d_v in {64, 128} and 16-byte-aligned rows takes the
// chunked tensor-core kernels (delta_chunk.h) instead, where their segments (which
// start from zero) cover the call: forward, part_summary (the chunk maps' product;
// head maps from a pass that ends each row at its first document start),
// entering_dstate, and backward (the forward state pass for the state entering each
// chunk, the reverse one for the gradient of the state leaving each chunk, then every
// chunk's gradients at once: delta_chunk_bwd.h). When one caller runs entering_dstate
// and backward on the same part (the SP schedules, through DeltaFamily),
// entering_dstate_keeping keeps prep's and rprep's outputs and backward_reusing skips
// those two launches. forward_keeping keeps what the forward's prep and state pass wrote
// (w, meta, T, v_new and the 16-bit state entering each chunk: ForwardKept) in a buffer
// the caller holds until the backward, which then runs neither of them again.
// LASP2_DELTA_KEEP_FORWARD=0 turns that off (forward_kept_floats returns 0).
// Packed documents with their own initial states (forward, part_summary), end states
// (part_summary's finals) or state gradients (backward) take the chunked kernels with
// delta_chunk_docs.h's terms; the backward then reruns the token-recurrent backward on
// the 64-token chunks where a document starts (chunked_doc_backward).
// LASP2_DELTA_CHUNKED=0 turns the chunked kernels off (the token-recurrent ones run).
// KDA under the same conditions takes its own chunked kernels (kda_chunk.h) for
// forward, part_summary and entering_dstate, and (kda_chunk_bwd.h, where the block's
// shared memory fits and, with packed documents, no document states are passed) the
// backward. LASP2_DELTA_KDA_CHUNKED=0 turns those off alone;
// LASP2_DELTA_KDA_CHUNKED_BWD=0 the backward alone. Its forward_keeping keeps what the
// KDA backward reads of prep (w, qg, kd, P, eL, and T, which the forward's prep then also
// writes; not u: only the state pass reads it) and of the state pass (KdaForwardKept);
// the backward then runs neither, and the SP schedules' entering_dstate skips prep too.
// LASP2_DELTA_KEEP_FORWARD=0 (both families) or LASP2_DELTA_KDA_KEEP_FORWARD=0 (KDA alone)
// turns that off.
// These five switches take 0 or 1 (unset or empty: 1, on); any other value is a lasp2::Error
// naming the variable (env_knob.h), where before session 25 only a leading '0' counted.
#include <cstdint>
#include <memory>
#include <optional>

#include "cuda/launch.h"
#include "cuda/route.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/cuda/delta_chunk_docs.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "delta_rule/cuda/delta_cuda_backend.h"
#include "delta_rule/cuda/delta_cuda_buffers.h"
#include "delta_rule/cuda/delta_cuda_route.h"
#include "delta_rule/cuda/delta_launch.h"

namespace lasp2::delta {
namespace {

using gpu::Elem;
using namespace cuda_buffers;
using namespace cuda_route;

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// An output tensor into a kernel argument struct's pointer and [B, T, H] strides
// (those structs name each output's fields apart: dq, dqsb, dqst, dqsh).
void set_out(MutView v, void*& ptr, int64_t& sb, int64_t& st, int64_t& sh) {
  ptr = v.data;
  sb = v.stride.batch;
  st = v.stride.seq;
  sh = v.stride.head;
}

// The chunked backward passes' outputs (KdaBackwardArgs, ChunkBackwardArgs: the same fields).
template <typename BackwardArgs>
void set_grads(MutView dq, MutView dk, MutView dv, float* dg, float* dbeta, BackwardArgs& a) {
  set_out(dq, a.dq, a.dqsb, a.dqst, a.dqsh);
  set_out(dk, a.dk, a.dksb, a.dkst, a.dksh);
  set_out(dv, a.dv, a.dvsb, a.dvst, a.dvsh);
  a.dg = dg;
  a.dbeta = dbeta;
}

// The token-recurrent backward's last pass: dq, dk, dg and dbeta from its sums `acc`
// (flags nullable: the intervals whose tokens to write).
void launch_finish_of(const gpu::Problem& g, const float* acc, MutView dq, MutView dk, float* dg,
                      float* dbeta, const int* flags, cudaStream_t s) {
  gpu::FinishArgs f;
  f.acc = acc;
  set_out(dq, f.dq, f.dqsb, f.dqst, f.dqsh);
  set_out(dk, f.dk, f.dksb, f.dkst, f.dksh);
  f.dg = dg;
  f.dbeta = dbeta;
  f.flags = flags;
  gpu::launch_finish(g, f, s);
}

class DeltaCudaBackend final : public DeltaKernelBackend {
 public:
  explicit DeltaCudaBackend(const ScratchAllocator* allocator) : allocator_(allocator) {}

  Device device() const override { return Device::kCUDA; }

  void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc, float* A,
                    float* M, float* head_A, float* head_M, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0) return;
    const cudaStream_t s = as_stream(stream);
    // the product of the chunk maps and the state pass from zero; with documents' initial
    // or end states, M and the finals from a state pass carrying them (delta_chunk_docs.h)
    if (chunked(p, part, {})) {
      const gpu::Problem g = problem_of(p, part, nullptr);
      chunked_summary(g, A, M, head_A, head_M, s);
      if (p.doc_start != nullptr && (doc.initial != nullptr || doc.finals != nullptr))
        chunked_doc_states(g, doc.initial, doc.finals, M, s);
      return;
    }
    if (kda_chunked(p, part, {}) && (p.doc_start == nullptr || (doc.initial == nullptr && doc.finals == nullptr))) {
      kda_summary(problem_of(p, part, nullptr), A, M, head_A, head_M, s);
      return;
    }
    const gpu::Problem g = segmented(problem_of(p, part, doc.initial));
    const int ncols = g.dk + g.dv;  // SummaryOut: {A, M, head_A, head_M, finals, ncols}
    if (g.nseg == 1) {
      gpu::launch_summary(g, {A, M, head_A, head_M, doc.finals, ncols}, s);
      return;
    }
    const SegmentBuffers seg(g, allocator_, s);
    gpu::launch_summary(g, {seg.A, seg.M, seg.head_A, seg.head_M, doc.finals, ncols}, s);
    gpu::launch_firsts(g, seg.firsts, s);
    gpu::ComposeArgs c;
    c.mode = gpu::ComposeMode::kSummary;
    c.segA = seg.A;
    c.segM = seg.M;
    c.seg_head_A = seg.head_A;
    c.seg_head_M = seg.head_M;
    c.firsts = seg.firsts;
    c.A = A;
    c.M = M;
    c.head_A = head_A;
    c.head_M = head_M;
    c.finals = doc.finals;
    gpu::launch_compose(g, c, s);
  }

  void forward(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
               MutView o, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0 || part.length() == 0) return;
    gpu::ForwardOut out;
    set_out(o, out.o, out.osb, out.ost, out.osh);
    if (chunked(p, part, {ConstView{o.data, o.stride}})) {
      // documents' initial states: delta_chunk_docs.h's terms around the same kernels
      chunked_forward(problem_of(p, part, nullptr), entering, p.doc_start != nullptr ? doc.initial : nullptr, out,
                      as_stream(stream));
      return;
    }
    if (kda_chunked(p, part, {ConstView{o.data, o.stride}}) && !(p.doc_start != nullptr && doc.initial != nullptr)) {
      kda_forward(problem_of(p, part, nullptr), entering, &out, nullptr, as_stream(stream));
      return;
    }
    walk_forward(segmented(problem_of(p, part, doc.initial)), entering, out, as_stream(stream));
  }

  int64_t forward_kept_floats(const DeltaParams& p, TokenRange part) const override {
    if (p.bh() == 0 || part.length() <= 0 || !keeps_forward_params(p)) return 0;
    const int64_t chunks = (part.length() + gpu::kChunkTokens - 1) / gpu::kChunkTokens;
    return p.gate_kind == GateKind::kPerKey ? KdaForwardKept::floats(p.bh(), chunks, p.dim_k, p.dim_v)
                                            : ForwardKept::floats(p.bh(), chunks, p.dim_k, p.dim_v);
  }

  // The chunked forward with prep's w, meta, T and the state pass's v_new and chunk states
  // in `kept` (KDA: KdaForwardKept's). Where the output's views do not suit the chunked
  // output pass (only a caller's own o can be misaligned: the binding's o follows v's
  // strides), the walk writes o and the kept buffer is still filled for the backward.
  void forward_keeping(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
                       MutView o, float* kept, void* stream) const override {
    check_params(p, part);
    const int64_t kept_floats = kept != nullptr ? forward_kept_floats(p, part) : 0;
    const bool kda = p.gate_kind == GateKind::kPerKey;
    if (kept_floats == 0 || !(kda ? kda_chunked(p, part, {}) : chunked(p, part, {})) ||
        (p.doc_start != nullptr && doc.initial != nullptr)) {
      // zeros where nothing is kept (misaligned q, k, v: the backward's chunked kernels do
      // not take the part either and never read it), so the buffer is deterministic
      if (kept_floats > 0) fill_zero(kept, kept_floats, stream);
      forward(p, part, entering, doc, o, stream);
      return;
    }
    const cudaStream_t s = as_stream(stream);
    const gpu::Problem g = problem_of(p, part, nullptr);
    if (kda) {
      gpu::ForwardOut out;
      set_out(o, out.o, out.osb, out.ost, out.osh);
      const bool o_fits = rows_aligned(ConstView{o.data, o.stride});
      kda_forward(g, entering, o_fits ? &out : nullptr, kept, s);
      if (!o_fits) walk_forward(segmented(problem_of(p, part, doc.initial)), entering, out, s);
      return;
    }
    const ForwardKept fk(g, kept);
    const Scratch scratch({chunk_rows(g) * g.dk / 2}, allocator_, s);  // u
    gpu::ChunkPrep prep{fk.w, scratch[0], fk.meta};
    prep.t = fk.t;  // the backward's copy of T (prep computes it either way)
    gpu::launch_chunk_prep(g, prep, s);
    gpu::ChunkStatesOut so;
    so.entering = entering;
    so.v_new = fk.v_new;
    so.states = fk.states;
    gpu::launch_chunk_states(g, prep, so, s);
    gpu::ForwardOut out;
    set_out(o, out.o, out.osb, out.ost, out.osh);
    if (rows_aligned(ConstView{o.data, o.stride})) {
      gpu::launch_chunk_output(g, prep, fk.v_new, fk.states, out, s);
    } else {
      walk_forward(segmented(problem_of(p, part, doc.initial)), entering, out, s);
    }
  }

  void entering_dstate(const DeltaParams& p, TokenRange part, ConstView dout, float* dentering,
                       void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0) return;
    const cudaStream_t s = as_stream(stream);
    if (chunked(p, part, {dout})) {
      chunked_entering_dstate(problem_of(p, part, nullptr), view_of(dout), dentering, s);
      return;
    }
    if (kda_chunked(p, part, {dout})) {
      kda_entering_dstate(problem_of(p, part, nullptr), view_of(dout), dentering, nullptr, s);
      return;
    }
    const gpu::Problem g = segmented(problem_of(p, part, nullptr));
    if (g.n == 0) {
      cuda::cuda_check(cudaMemsetAsync(dentering, 0, g.bh() * p.state_elems() * sizeof(float), s),
                       "cudaMemsetAsync");
      return;
    }
    const SegmentBuffers seg(g, allocator_, s);
    gpu::launch_firsts(g, seg.firsts, s);
    if (g.nseg == 1) {
      gpu::launch_entering_dstate(g, view_of(dout), seg.firsts, nullptr, dentering, s);
      return;
    }
    // E_part = E_0 + A_0^T (E_1 + A_1^T (...)): each segment's own share, carried back
    // through the maps of the segments before it (A alone: the first dk columns).
    gpu::SummaryOut out;
    out.A = seg.A;
    out.head_A = seg.head_A;
    out.ncols = g.dk;
    gpu::launch_summary(g, out, s);
    gpu::launch_entering_dstate(g, view_of(dout), seg.firsts, nullptr, seg.states, s);
    gpu::ComposeArgs c;
    c.mode = gpu::ComposeMode::kSuffix;
    c.segA = seg.A;
    c.E = seg.states;
    c.final_out = dentering;
    gpu::launch_compose(g, c, s);
  }

  // Keeps prep's and rprep's outputs (with T, r beside u) when the chunked kernels take
  // the call; backward_reusing then skips both (1.2 ms of 64K tokens on an H200).
  std::unique_ptr<KeptPartWork> entering_dstate_keeping(const DeltaParams& p, TokenRange part, ConstView dout,
                                                        const BackwardPlan& plan, float* dentering,
                                                        void* stream) const override {
    check_params(p, part);
    // KDA: prep from the forward where the chunked backward will read it too (nothing
    // more is kept: rprep runs inside launch_kda_rstates, again for the backward)
    if (p.bh() > 0 && plan.forward_kept != nullptr &&
        kda_backward_chunked(p, part, dout, plan.dq, plan.dk, plan.dv, plan.doc_states)) {
      kda_entering_dstate(problem_of(p, part, nullptr), view_of(dout), dentering, plan.forward_kept,
                          as_stream(stream));
      return nullptr;
    }
    // keep only what the chunked backward will take (0.9 GB a part at 64K tokens)
    if (p.bh() == 0 || !chunk_backward_takes(p, part, dout, plan)) {
      entering_dstate(p, part, dout, dentering, stream);
      return nullptr;
    }
    const cudaStream_t s = as_stream(stream);
    const gpu::Problem g = problem_of(p, part, nullptr);
    std::unique_ptr<ChunkBackwardPrep> kept;
    if (plan.forward_kept != nullptr) {  // prep ran in the forward
      kept = std::make_unique<ChunkBackwardPrep>(g, ForwardKept(g, plan.forward_kept), allocator_, s);
    } else {
      kept = std::make_unique<ChunkBackwardPrep>(g, true, allocator_, s);
      gpu::launch_chunk_prep(g, kept->prep, s);
    }
    gpu::launch_chunk_rprep(g, view_of(dout), kept->reverse, s);
    gpu::ChunkReverseOut ro;
    ro.entering = dentering;
    gpu::launch_chunk_rstates(g, view_of(dout), kept->reverse, ro, s);
    return kept;
  }

  void backward(const DeltaParams& p, TokenRange part, ConstView dout, const float* entering,
                const float* leaving_dstate, const DocStates& doc, MutView dq, MutView dk,
                MutView dv, void* dg, void* dbeta, float* dentering, void* stream) const override {
    backward_reusing(nullptr, p, part, dout, entering, leaving_dstate, doc, dq, dk, dv, dg, dbeta, dentering,
                     stream);
  }

  void backward_reusing(const KeptPartWork* kept, const DeltaParams& p, TokenRange part, ConstView dout,
                        const float* entering, const float* leaving_dstate, const DocStates& doc, MutView dq,
                        MutView dk, MutView dv, void* dg, void* dbeta, float* dentering, void* stream,
                        const float* forward_kept = nullptr) const override {
    check_params(p, part);
    if (p.bh() == 0) return;
    const cudaStream_t s = as_stream(stream);
    const bool doc_states = doc.initial != nullptr || doc.final_dstate != nullptr || doc.d_initial != nullptr;
    if (chunk_backward_takes(p, part, dout, {dq, dk, dv, doc_states})) {
      chunked_backward(problem_of(p, part, nullptr), view_of(dout), dynamic_cast<const ChunkBackwardPrep*>(kept),
                       forward_kept, entering, leaving_dstate, dq, dk, dv, static_cast<float*>(dg),
                       static_cast<float*>(dbeta), dentering, s);
      return;
    }
    if (doc_states && p.doc_start != nullptr && chunk_backward_fits(p, part, dout, {dq, dk, dv, true})) {
      chunked_doc_backward(p, part, view_of(dout), entering, leaving_dstate, doc, dq, dk, dv, static_cast<float*>(dg),
                           static_cast<float*>(dbeta), dentering, s);
      return;
    }
    if (kda_backward_chunked(p, part, dout, dq, dk, dv, doc_states)) {
      kda_backward(problem_of(p, part, nullptr), view_of(dout), forward_kept, entering, leaving_dstate, dq, dk, dv,
                   static_cast<float*>(dg), static_cast<float*>(dbeta), dentering, s);
      return;
    }
    const gpu::Problem g = segmented(problem_of(p, part, doc.initial));
    const int64_t ckpt_floats = p.bh() * g.checkpoints() * p.state_elems();
    const int64_t acc_floats = part.length() * p.bh() * (3 * p.dim_k + 1);
    const Scratch scratch({ckpt_floats, acc_floats}, allocator_, s);
    if (acc_floats > 0)
      cuda::cuda_check(cudaMemsetAsync(scratch[1], 0, acc_floats * sizeof(float), s), "cudaMemsetAsync");

    gpu::BackwardArgs a;
    {
      gpu::ForwardOut fwd;  // the state at every 64th token
      fwd.ckpt = scratch[0];
      if (part.length() > 0) walk_forward(g, entering, fwd, s);
    }
    a.dout = view_of(dout);
    a.ckpt = scratch[0];
    a.leaving_dstate = leaving_dstate;
    a.final_dstate = doc.final_dstate;
    a.d_initial = doc.d_initial;
    a.dentering = dentering;
    set_out(dv, a.dv, a.dvsb, a.dvst, a.dvsh);
    a.acc = scratch[1];
    gpu::launch_backward(g, a, s);
    launch_finish_of(g, scratch[1], dq, dk, static_cast<float*>(dg), static_cast<float*>(dbeta), nullptr, s);
  }

  void apply_map(const float* A, const float* x, const float* y, int64_t bh, int64_t dk,
                 int64_t dv, float* out, void* stream) const override {
    check_map(bh, dk, dv);
    gpu::launch_apply_map(A, x, y, bh, static_cast<int>(dk), static_cast<int>(dv), false, out,
                          as_stream(stream));
  }

  void apply_map_transposed_add(const float* A, const float* x, int64_t bh, int64_t dk,
                                int64_t dv, float* out, void* stream) const override {
    check_map(bh, dk, dv);
    gpu::launch_apply_map(A, x, nullptr, bh, static_cast<int>(dk), static_cast<int>(dv), true, out,
                          as_stream(stream));
  }

  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    gpu::launch_add(dst, src, count, as_stream(stream));
  }

  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    if (count <= 0 || dst == src) return;
    cuda::cuda_check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice,
                                     as_stream(stream)),
                     "cudaMemcpyAsync");
  }

  void fill_zero(float* dst, int64_t count, void* stream) const override {
    if (count <= 0) return;
    cuda::cuda_check(cudaMemsetAsync(dst, 0, count * sizeof(float), as_stream(stream)),
                     "cudaMemsetAsync");
  }

  void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const override {
    cuda::launch_copy_rows(rows.data(), static_cast<int64_t>(rows.size()), count, dst, as_stream(stream));
  }

 private:
  // The forward walk of `out` over the part with `entering` entering it: directly for
  // one segment, else after the segments' summaries and the prefix of their entering
  // states.
  void walk_forward(const gpu::Problem& g, const float* entering, gpu::ForwardOut out,
                    cudaStream_t s) const {
    if (g.nseg == 1) {
      out.entering = entering;
      gpu::launch_forward(g, out, s);
      return;
    }
    const SegmentBuffers seg(g, allocator_, s);
    gpu::launch_summary(g, {seg.A, seg.M, seg.head_A, seg.head_M, nullptr, g.dk + g.dv}, s);
    gpu::ComposeArgs c;
    c.mode = gpu::ComposeMode::kPrefix;
    c.segA = seg.A;
    c.segM = seg.M;
    c.init = entering;
    c.seg_out = seg.states;
    gpu::launch_compose(g, c, s);
    out.entering = seg.states;
    gpu::launch_forward(g, out, s);
  }

  // prep, the state pass (v_new and the 16-bit state entering each chunk), the output;
  // with `doc_initial` (packed documents' initial states) prep runs on V' and the state
  // pass and the output add the documents' terms (delta_chunk_docs.h).
  void chunked_forward(const gpu::Problem& g0, const float* entering, const float* doc_initial,
                       const gpu::ForwardOut& out, cudaStream_t s) const {
    const int64_t half_rows = chunk_rows(g0) * g0.dk / 2;  // 16-bit [rows][d] in floats
    const bool docs = doc_initial != nullptr;
    const Scratch scratch({half_rows, half_rows, 2 * chunk_rows(g0), half_rows,
                           g0.bh() * gpu::chunk_count(g0) * g0.dk * g0.dv / 2, docs ? doc_v_floats(g0) : 0,
                           docs ? chunk_rows(g0) : 0, docs ? chunk_rows(g0) : 0},
                          allocator_, s);
    gpu::ChunkStatesOut so;
    const gpu::ChunkDocs d{doc_initial, scratch[6], reinterpret_cast<int*>(scratch[7]), scratch[5]};
    const gpu::Problem g = docs ? with_doc_v(g0, d, so, s) : g0;
    const gpu::ChunkPrep prep{scratch[0], scratch[1], scratch[2]};
    gpu::launch_chunk_prep(g, prep, s);
    so.entering = entering;
    so.v_new = scratch[3];
    so.states = scratch[4];
    gpu::launch_chunk_states(g, prep, so, s);
    gpu::launch_chunk_output(g, prep, scratch[3], scratch[4], out, s);
    if (docs) gpu::launch_chunk_doc_output(g, d, out, s);
  }

  // V' = V - diag(f) K H of delta_chunk_docs.h, [B][seqlen][H][dv] 16-bit, in floats.
  static int64_t doc_v_floats(const gpu::Problem& g) { return g.batch * g.seqlen * g.heads * g.dv / 2; }

  // f, idx and V' (delta_chunk_docs.h) for `d`; the problem with V' in place of v, and
  // the state pass's document terms in `so`.
  static gpu::Problem with_doc_v(const gpu::Problem& g, const gpu::ChunkDocs& d, gpu::ChunkStatesOut& so,
                                 cudaStream_t s) {
    gpu::launch_chunk_doc_prep(g, d, s);
    gpu::Problem gv = g;
    gv.v = {d.v, g.seqlen * g.heads * g.dv, static_cast<int64_t>(g.heads) * g.dv, g.dv};
    so.doc_f = d.f;
    so.doc_idx = d.idx;
    so.doc_initial = d.initial;
    return gv;
  }

  // M (the state leaving the part from zero) with the initial states of the documents
  // begun inside the part (nullable), and the end states of those begun and ended inside
  // it into `finals` (nullable): prep (on V'), the state pass carrying the documents'
  // states, then delta_chunk_docs.h's end states.
  void chunked_doc_states(const gpu::Problem& g0, const float* initial, float* finals, float* M,
                          cudaStream_t s) const {
    const int64_t half_rows = chunk_rows(g0) * g0.dk / 2;
    const bool docs = initial != nullptr, ends = finals != nullptr;
    const Scratch scratch({half_rows, half_rows, 2 * chunk_rows(g0), ends ? half_rows : 0,
                           ends ? g0.bh() * gpu::chunk_count(g0) * g0.dk * g0.dv / 2 : 0,
                           docs ? doc_v_floats(g0) : 0, docs ? chunk_rows(g0) : 0,
                           docs ? chunk_rows(g0) + g0.batch : g0.batch},
                          allocator_, s);
    gpu::ChunkStatesOut so;
    gpu::ChunkDocs d;
    if (docs) d = {initial, scratch[6], reinterpret_cast<int*>(scratch[7]), scratch[5]};
    const gpu::Problem g = docs ? with_doc_v(g0, d, so, s) : g0;
    const gpu::ChunkPrep prep{scratch[0], scratch[1], scratch[2]};
    gpu::launch_chunk_prep(g, prep, s);
    so.v_new = scratch[3];
    so.states = scratch[4];
    so.leaving = M;
    gpu::launch_chunk_states(g, prep, so, s);
    if (!ends) return;
    int* firsts = reinterpret_cast<int*>(scratch[7]) + (docs ? chunk_rows(g0) : 0);
    gpu::launch_firsts(g, firsts, s);  // one segment: firsts[b]
    gpu::ChunkDocFinals a;
    a.meta = prep.meta;
    a.v_new = scratch[3];
    a.states = scratch[4];
    a.firsts = firsts;
    a.finals = finals;
    gpu::launch_chunk_doc_finals(g, d, a, s);
  }

  // KDA (kda_chunk.h): prep, the state pass (v_new and the 16-bit state entering each
  // chunk), the output (null `out`: none). With `kept` (forward_keeping) prep's outputs but
  // u, T among them, and the state pass's go there (KdaForwardKept), u alone to scratch.
  void kda_forward(const gpu::Problem& g, const float* entering, const gpu::ForwardOut* out, float* kept,
                   cudaStream_t s) const {
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(g);
    const int64_t own = kept != nullptr ? 0 : 1;  // 0: the piece is in `kept`
    const Scratch scratch({z.rows_half, own * z.rows_half, own * z.rows_half, own * z.rows_half, own * z.p_half,
                           own * z.eL, own * z.rows_half, own * g.bh() * gpu::chunk_count(g) * g.dk * g.dv / 2},
                          allocator_, s);
    gpu::KdaPrep prep{scratch[1], scratch[0], scratch[2], scratch[3], scratch[4], scratch[5]};
    gpu::ChunkStatesOut so;
    so.entering = entering;
    so.v_new = scratch[6];
    so.states = scratch[7];
    if (kept != nullptr) {
      const KdaForwardKept fk(g, kept);
      prep = fk.prep;
      prep.u = scratch[0];
      so.v_new = fk.v_new;
      so.states = fk.states;
    }
    gpu::launch_kda_prep(g, prep, s);
    gpu::launch_kda_states(g, prep, so, s);
    if (out != nullptr) gpu::launch_kda_output(g, prep, so.v_new, so.states, *out, s);
  }

  // KDA's entering_dstate: prep (or the forward's, `forward_kept`: KdaForwardKept), rprep
  // and the reverse state pass (kda_chunk.h).
  void kda_entering_dstate(const gpu::Problem& g, gpu::View dout, float* dentering, const float* forward_kept,
                           cudaStream_t s) const {
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(g);
    const int64_t own = forward_kept != nullptr ? 0 : 1;
    const Scratch scratch({own * z.rows_half, own * z.rows_half, own * z.rows_half, own * z.rows_half,
                           own * z.p_half, own * z.eL, z.rows_half},
                          allocator_, s);
    gpu::KdaPrep prep{scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]};
    if (forward_kept != nullptr) {
      prep = KdaForwardKept(g, forward_kept).prep;
    } else {
      gpu::launch_kda_prep(g, prep, s);
    }
    gpu::launch_kda_entering_dstate(g, prep, dout, scratch[6], dentering, s);
  }

  // KDA's backward (kda_chunk_bwd.h): prep (with T), the state pass from `entering` (v_new
  // and the 16-bit state entering each chunk), rprep and the reverse pass from `leaving`
  // (each chunk's 16-bit leaving-state gradient and the entering state's), then every
  // chunk's gradients at once. With `forward_kept` (forward_keeping of the part, the same
  // entering state: KdaForwardKept) prep and the state pass ran in the forward.
  void kda_backward(const gpu::Problem& g, gpu::View dout, const float* forward_kept, const float* entering,
                    const float* leaving, MutView dq, MutView dk, MutView dv, float* dg, float* dbeta,
                    float* dentering, cudaStream_t s) const {
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(g);
    const int64_t states = g.bh() * gpu::chunk_count(g) * g.dk * g.dv / 2;
    const int64_t own = forward_kept != nullptr ? 0 : 1;
    // w, u, qg, kd, P, eL, T, v_new (none with forward_kept)
    const Scratch scratch({own * z.rows_half, own * z.rows_half, own * z.rows_half, own * z.rows_half,
                           own * z.p_half, own * z.eL, own * z.p_half, own * z.rows_half},
                          allocator_, s);
    const Scratch more({own * states, z.rows_half, states}, allocator_, s);  // chunk states, r, dh
    gpu::KdaPrep prep{scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]};
    prep.t = scratch[6];
    const void* v_new = scratch[7];
    const void* chunk_states = more[0];
    if (forward_kept != nullptr) {
      const KdaForwardKept fk(g, forward_kept);
      prep = fk.prep;
      v_new = fk.v_new;
      chunk_states = fk.states;
    } else {
      gpu::launch_kda_prep(g, prep, s);
      gpu::ChunkStatesOut so;
      so.entering = entering;
      so.v_new = scratch[7];
      so.states = more[0];
      gpu::launch_kda_states(g, prep, so, s);
    }
    gpu::launch_kda_rstates(g, prep, dout, more[1], leaving, more[2], dentering, s);
    gpu::KdaBackwardArgs a;
    a.dout = dout;
    a.v_new = v_new;
    a.states = chunk_states;
    a.dh = more[2];
    a.t = prep.t;
    a.r = more[1];
    set_grads(dq, dk, dv, dg, dbeta, a);
    gpu::launch_kda_backward(g, a, s);
  }

  // KDA's part summary: summary_passes below on the KDA prep and state pass.
  void kda_summary(const gpu::Problem& g, float* A, float* M, float* head_A, float* head_M, cudaStream_t s) const {
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(g);
    const bool packed = g.doc_start != nullptr;
    const Scratch scratch({z.rows_half, z.rows_half, z.rows_half, z.rows_half, z.p_half, z.eL,
                           packed ? int64_t{g.batch} : 0},
                          allocator_, s);
    gpu::KdaPrep prep{scratch[0], scratch[1], scratch[2], scratch[3], scratch[4], scratch[5]};
    summary_passes(g, prep, reinterpret_cast<int*>(scratch[6]), gpu::launch_kda_prep, gpu::launch_kda_summary, A, M,
                   head_A, head_M, s);
  }

  // The part summary, GDN (ChunkPrep, launch_chunk_*) or KDA (KdaPrep, launch_kda_*):
  // prep, then the state pass over the columns of [A | M] from [I | 0]; with packed
  // documents (A = 0 exactly then, when a document starts in the part) the head maps
  // come from a second prep and pass in which the tokens from each row's first
  // document start on are identity transitions (firsts: g.batch ints of scratch).
  template <typename Prep, typename PrepFn, typename SummaryFn>
  static void summary_passes(const gpu::Problem& g, Prep& prep, int* firsts, PrepFn run_prep, SummaryFn run_summary,
                             float* A, float* M, float* head_A, float* head_M, cudaStream_t s) {
    const bool packed = g.doc_start != nullptr;
    run_prep(g, prep, s);
    gpu::ChunkSummaryOut out;
    out.A = A;
    out.M = M;
    out.head_A = packed ? nullptr : head_A;
    out.head_M = packed ? nullptr : head_M;
    run_summary(g, prep, out, s);
    if (!packed) return;
    gpu::launch_firsts(g, firsts, s);  // one segment: firsts[b]
    prep.head_end = firsts;
    run_prep(g, prep, s);
    run_summary(g, prep, gpu::ChunkSummaryOut{head_A, head_M, nullptr, nullptr}, s);
  }

  void chunked_summary(const gpu::Problem& g, float* A, float* M, float* head_A, float* head_M,
                       cudaStream_t s) const {
    const int64_t half_rows = chunk_rows(g) * g.dk / 2;
    const bool packed = g.doc_start != nullptr;
    const Scratch scratch({half_rows, half_rows, 2 * chunk_rows(g), packed ? int64_t{g.batch} : 0}, allocator_, s);
    gpu::ChunkPrep prep{scratch[0], scratch[1], scratch[2]};
    summary_passes(g, prep, reinterpret_cast<int*>(scratch[3]), gpu::launch_chunk_prep, gpu::launch_chunk_summary, A,
                   M, head_A, head_M, s);
  }

  // prep; the state pass (v_new and the 16-bit state entering each chunk); r = -(P^T dO)
  // in place of u; the reverse state pass (each chunk's leaving-state gradient and the
  // entering state's); then every chunk's gradients at once (delta_chunk_bwd.h). With
  // `kept` (entering_dstate_keeping of the same part) prep and rprep have run already; with
  // `forward_kept` (forward_keeping of the part, the same entering state) prep and the
  // state pass have.
  void chunked_backward(const gpu::Problem& g, gpu::View dout, const ChunkBackwardPrep* kept,
                        const float* forward_kept, const float* entering, const float* leaving, MutView dq,
                        MutView dk, MutView dv, float* dg, float* dbeta, float* dentering, cudaStream_t s) const {
    const int64_t states = g.bh() * gpu::chunk_count(g) * g.dk * g.dv;
    std::optional<ChunkBackwardPrep> own;
    if (kept == nullptr && forward_kept != nullptr) {
      own.emplace(g, ForwardKept(g, forward_kept), allocator_, s);
      kept = &*own;
    } else if (kept == nullptr) {
      own.emplace(g, false, allocator_, s);
      gpu::launch_chunk_prep(g, own->prep, s);
      kept = &*own;
    }
    const bool run_states = kept->v_new == nullptr;
    const Scratch scratch({run_states ? chunk_rows(g) * g.dk / 2 : 0, run_states ? states / 2 : 0, states / 2},
                          allocator_, s);
    const gpu::ChunkPrep& prep = kept->prep;
    const void* v_new = kept->v_new;
    const void* chunk_states = kept->states;
    if (run_states) {
      gpu::ChunkStatesOut so;
      so.entering = entering;
      so.v_new = scratch[0];
      so.states = scratch[1];
      gpu::launch_chunk_states(g, prep, so, s);
      v_new = scratch[0];
      chunk_states = scratch[1];
    }
    // r over u (the state pass has read it), or into its own buffer (forward kept)
    if (own) gpu::launch_chunk_rprep(g, dout, own->reverse, s);
    gpu::ChunkReverseOut ro;
    ro.leaving = leaving;
    ro.dh = scratch[2];
    ro.entering = dentering;
    gpu::launch_chunk_rstates(g, dout, kept->reverse, ro, s);
    gpu::ChunkBackwardArgs a;
    a.dout = dout;
    a.meta = prep.meta;
    a.v_new = v_new;
    a.states = chunk_states;
    a.dh = scratch[2];
    a.t = prep.t;
    a.r = kept->reverse.u;
    set_grads(dq, dk, dv, dg, dbeta, a);
    gpu::launch_chunk_backward(g, a, s);
  }

  // Packed documents with their own states (delta_chunk_docs.h): prep on V', the state
  // pass carrying the documents' initial states (also writing the fp32 state entering each
  // chunk), rprep, the reverse pass with the end-state gradients in X's place where a
  // document ends in a chunk's segment 0, and the chunk backward over every chunk; then
  // the chunks where a document starts get their gradients again from the token-recurrent
  // backward, one 64-token interval a block from the chunked passes' entering state and
  // leaving gradient (its initial-state and end-state gradients, d_initial written there).
  void chunked_doc_backward(const DeltaParams& p, TokenRange part, gpu::View dout, const float* entering,
                            const float* leaving, const DocStates& doc, MutView dq, MutView dk, MutView dv,
                            float* dg, float* dbeta, float* dentering, cudaStream_t s) const {
    const gpu::Problem g0 = problem_of(p, part, nullptr);
    const int64_t nck = gpu::chunk_count(g0), rows = chunk_rows(g0), half_rows = rows * g0.dk / 2;
    const int64_t states = g0.bh() * nck * g0.dk * g0.dv, acc_floats = part.length() * p.bh() * (3 * p.dim_k + 1);
    const bool docs = doc.initial != nullptr;
    // w, u (then r), meta, T, v_new, 16-bit chunk states, fp32 chunk states, 16-bit dh
    const Scratch a({half_rows, half_rows, 2 * rows, rows * gpu::kChunkTokens / 2, half_rows, states / 2, states,
                     states / 2},
                    allocator_, s);
    // V', f, idx, end_idx, end_g, flags, fp32 dh, the recurrent backward's sums
    const Scratch b({docs ? doc_v_floats(g0) : 0, docs ? rows : 0, docs ? rows : 0, g0.bh() * nck, g0.bh() * nck,
                     g0.batch * nck, states, acc_floats},
                    allocator_, s);
    gpu::ChunkStatesOut so;
    gpu::ChunkDocs d;
    if (docs) d = {doc.initial, b[1], reinterpret_cast<int*>(b[2]), b[0]};
    const gpu::Problem g = docs ? with_doc_v(g0, d, so, s) : g0;
    gpu::ChunkPrep prep{a[0], a[1], a[2]};
    prep.t = a[3];
    gpu::launch_chunk_prep(g, prep, s);
    so.entering = entering;
    so.v_new = a[4];
    so.states = a[5];
    so.ckpt = a[6];
    gpu::launch_chunk_states(g, prep, so, s);
    gpu::launch_chunk_rprep(g, dout, prep, s);  // r over u (the state pass has read it)
    const gpu::ChunkDocEnds ends{doc.final_dstate, reinterpret_cast<int*>(b[3]), b[4], reinterpret_cast<int*>(b[5])};
    gpu::launch_chunk_doc_ends(g, ends, s);
    gpu::ChunkReverseOut ro;
    ro.leaving = leaving;
    ro.dh = a[7];
    ro.entering = dentering;
    ro.doc_end_idx = ends.end_idx;
    ro.doc_end_g = ends.end_g;
    ro.doc_final = doc.final_dstate;
    gpu::launch_chunk_rstates(g, dout, prep, ro, s);
    gpu::ChunkBackwardArgs ca;
    ca.dout = dout;
    ca.meta = prep.meta;
    ca.v_new = a[4];
    ca.states = a[5];
    ca.dh = a[7];
    ca.t = prep.t;
    ca.r = prep.u;
    set_grads(dq, dk, dv, dg, dbeta, ca);
    gpu::launch_chunk_backward(g, ca, s);
    // the chunks with a document start, again: the recurrent backward on v and the
    // documents' states (one segment: launch_backward walks intervals, not segments)
    gpu::launch_chunk_doc_dh32(g, a[7], ends.flags, b[6], s);
    cuda::cuda_check(cudaMemsetAsync(b[7], 0, acc_floats * sizeof(float), s), "cudaMemsetAsync");
    const gpu::Problem gr = problem_of(p, part, doc.initial);
    gpu::BackwardArgs ra;
    ra.dout = dout;
    ra.ckpt = a[6];
    ra.chunk_dstate = b[6];
    ra.flags = ends.flags;
    ra.final_dstate = doc.final_dstate;
    ra.d_initial = doc.d_initial;
    set_out(dv, ra.dv, ra.dvsb, ra.dvst, ra.dvsh);
    ra.acc = b[7];
    gpu::launch_backward(gr, ra, s);
    launch_finish_of(gr, b[7], dq, dk, dg, dbeta, ends.flags, s);
  }

  // The reverse pass from a zero leaving gradient: the head's outputs' share.
  void chunked_entering_dstate(const gpu::Problem& g, gpu::View dout, float* dentering,
                               cudaStream_t s) const {
    const int64_t half_rows = chunk_rows(g) * g.dk / 2;
    const Scratch scratch({half_rows, half_rows, 2 * chunk_rows(g)}, allocator_, s);
    const gpu::ChunkPrep prep{scratch[0], scratch[1], scratch[2]};
    gpu::launch_chunk_prep(g, prep, s);
    gpu::launch_chunk_rprep(g, dout, prep, s);
    gpu::ChunkReverseOut ro;
    ro.entering = dentering;
    gpu::launch_chunk_rstates(g, dout, prep, ro, s);
  }

  static void check_map(int64_t bh, int64_t dk, int64_t dv) {
    LASP2_CHECK(dk >= 1 && dk <= gpu::kMaxDim && dv >= 1 && dv <= gpu::kMaxDim,
                "the CUDA delta-rule combines support head dims 1..128");
    LASP2_CHECK(bh >= 0 && bh < (int64_t{1} << 31), "too many (b, h) rows");
  }

  const ScratchAllocator* allocator_;  // null: cudaMallocAsync
};

}  // namespace

const DeltaKernelBackend& delta_cuda_backend() {
  static const DeltaCudaBackend backend(nullptr);
  return backend;
}

std::unique_ptr<DeltaKernelBackend> make_delta_cuda_backend(const ScratchAllocator& allocator) {
  return std::make_unique<DeltaCudaBackend>(&allocator);
}

}  // namespace lasp2::delta
