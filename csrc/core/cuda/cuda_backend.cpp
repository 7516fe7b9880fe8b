// KernelBackend for CUDA device pointers. Each call enqueues its kernels on the
// given stream (void* = cudaStream_t, null = legacy default stream) and returns
// without synchronizing the host, so a sequence of calls can be captured in a CUDA
// graph. Temporary buffers (scratch.h) come from the ScratchAllocator the backend
// was made with, else from the stream-ordered CUDA allocator.
//
// Routing (route.h): bf16/fp16 inputs with head dims <= 128 that are multiples of 8,
// 16-byte aligned base pointers and strides that are multiples of 8 elements take
// the tensor-core kernels (tc_*.cu); everything else (fp32, other sizes up to 256,
// odd strides) takes the generic FMA kernels (generic_kernels.cu). The parameter
// `chunk_size` is a CPU knob: the GPU always works in 64-token chunks grouped into
// segments that run in parallel (results equal the same math). What each function
// launches: passes.h.
//
// Environment knobs (tests, benchmarks): LASP2_CUDA_SEG_CHUNKS=<n> forces n chunks
// per segment; LASP2_CUDA_FORCE_GENERIC=1 disables the tensor-core kernels;
// LASP2_CUDA_SUMMARY_KEEP=0 keeps nothing from one pass over a part for the next (the
// *_keeping functions: segment states and meta; the A/B's reference).
#include <algorithm>
#include <string>

#include "env_knob.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/scratch_allocator.h"
#include "passes.h"
#include "route.h"
#include "scratch.h"

namespace lasp2 {
namespace {

using namespace lasp2::cuda;

class CudaBackend final : public KernelBackend {
 public:
  explicit CudaBackend(const ScratchAllocator* allocator) : allocator_(allocator) {}

  Device device() const override { return Device::kCUDA; }

  void part_state(const AttentionParams& p, TokenRange part, float* state, float* log_decay,
                  void* stream) const override {
    check_params(p, part);
    reduce_part(call(stream), p, part, view_of(p.k), view_of(p.v), false, state, log_decay);
  }

  void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state,
                     MutView o, void* stream) const override {
    chunk_forward_kept(p, part, initial_state, o, nullptr, nullptr, stream);
  }

  // The states entering each segment from the part's own tokens (passes.h: OutputPass).
  int64_t saved_states_floats(const AttentionParams& p, TokenRange part) const override {
    check_params(p, part);
    return kept_state_floats(p, part);
  }

  SavedStatesPlan saved_states_plan(const AttentionParams& p) const override {
    SavedStatesPlan plan;
    output_plan(p, &plan.target_blocks, &plan.forced_seg_chunks);
    return plan;
  }

  // The summary's walk is the output pass's (reduce_part: keep), so LASP-2's forward on
  // P > 1 ranks walks each part's segments once instead of twice; its meta serves the
  // output pass too.
  std::unique_ptr<KeptPartWork> part_state_keeping(const AttentionParams& p, TokenRange part, float* state,
                                                   float* log_decay, float* saved, void* stream) const override {
    check_params(p, part);
    if (!keep_summaries()) {
      part_state(p, part, state, log_decay, stream);
      return nullptr;
    }
    auto kept = std::make_unique<KeptPart>();
    const Geom g = output_geom(p, part);
    kept->saved = reduce_part(call(stream), p, part, view_of(p.k), view_of(p.v), false, state, log_decay, saved,
                              &g, &kept->meta);
    return kept;
  }

  void chunk_forward_kept(const AttentionParams& p, TokenRange part, const float* initial_state, MutView o,
                          float* saved, KeptPartWork* kept, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0 || part.length() == 0) return;
    OutputPass pass = forward_pass(p, initial_state, o);
    auto* k = dynamic_cast<KeptPart*>(kept);
    if (k != nullptr && k->saved) pass.kept = saved;
    else pass.keep = saved;
    pass.meta = k != nullptr ? &k->meta : nullptr;
    run_output(call(stream), p, part, pass);
  }

  void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix,
                         MutView o, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0 || part.length() == 0 || prefix == nullptr) return;
    run_output(call(stream), p, part,
               output_pass(FwdMode::kPrefix, view_of(p.q), View{}, View{}, view_of(o), p.dim_k, p.dim_v, prefix));
  }

  void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate,
                   void* stream) const override {
    check_params(p, part);
    reduce_part(call(stream), p, part, view_of(p.q), view_of(dout), true, dstate, nullptr);
  }

  // The same for the backward: the walk of the part's entering-state gradient is the dk/dv
  // pass's (reduce_part on dkdv_geom), kept in a block of the call's allocator until the
  // dk/dv pass has been enqueued; its meta serves the dq and dk/dv passes.
  std::unique_ptr<KeptPartWork> part_dstate_keeping(const AttentionParams& p, TokenRange part, ConstView dout,
                                                    float* dstate, void* stream) const override {
    check_params(p, part);
    if (!keep_summaries() || p.bh() == 0 || part.length() == 0) {
      part_dstate(p, part, dout, dstate, stream);
      return nullptr;
    }
    auto kept = std::make_unique<KeptPart>();
    const Geom g = dkdv_geom(p, part, view_of(dout));
    if (g.nseg > 1) {
      kept->states = std::make_unique<DeviceBlock>(4 * g.bh() * g.nseg * p.state_elems(), allocator_,
                                                   as_stream(stream));
      kept->states_geom = g;
    }
    reduce_part(call(stream), p, part, view_of(p.q), view_of(dout), true, dstate, nullptr, kept->states_data(), &g,
                &kept->meta);
    return kept;
  }

  void chunk_backward_dkdv_kept(const AttentionParams& p, TokenRange part, ConstView dout,
                                const float* final_dstate, MutView dk, MutView dv, const void* q_dot_dq,
                                const float* dg_offset, void* dg, KeptPartWork* kept,
                                void* stream) const override {
    check_dkdv(p, part, q_dot_dq, dg);
    if (p.bh() == 0 || part.length() == 0) return;
    auto* k = dynamic_cast<KeptPart*>(kept);
    const bool states = k != nullptr && k->states != nullptr;
    run_dkdv(call(stream), p, part, view_of(dout), final_dstate, view_of(dk), view_of(dv),
             static_cast<const float*>(q_dot_dq), dg_offset, static_cast<float*>(dg),
             states ? k->states_data() : nullptr, states ? &k->states_geom : nullptr,
             k != nullptr ? &k->meta : nullptr);
  }

  void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                         const float* initial_state, MutView dq, void* q_dot_dq,
                         void* stream) const override {
    run_dq(p, part, dout, initial_state, dq, q_dot_dq, nullptr, nullptr, stream);
  }

  // The dq pass's meta kept for the dk/dv pass (in `kept`, or a new one), which on one
  // device would launch the same meta kernel again.
  std::unique_ptr<KeptPartWork> chunk_backward_dq_keeping(const AttentionParams& p, TokenRange part,
                                                          ConstView dout, const float* initial_state, MutView dq,
                                                          void* q_dot_dq, const float* saved,
                                                          std::unique_ptr<KeptPartWork> kept,
                                                          void* stream) const override {
    if (!keep_summaries()) {
      run_dq(p, part, dout, initial_state, dq, q_dot_dq, saved, nullptr, stream);
      return kept;
    }
    if (kept == nullptr) kept = std::make_unique<KeptPart>();
    auto* k = dynamic_cast<KeptPart*>(kept.get());
    run_dq(p, part, dout, initial_state, dq, q_dot_dq, saved, k != nullptr ? &k->meta : nullptr, stream);
    return kept;
  }

  void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                           const float* final_dstate, MutView dk, MutView dv,
                           const void* q_dot_dq, const float* dg_offset, void* dg,
                           void* stream) const override {
    chunk_backward_dkdv_kept(p, part, dout, final_dstate, dk, dv, q_dot_dq, dg_offset, dg, nullptr, stream);
  }

  void combine_prefix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void* stream) const override {
    combine(parts, log_decays, target, bh, state_elems, out, false, stream);
  }

  void combine_suffix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void* stream) const override {
    combine(parts, log_decays, target, bh, state_elems, out, true, stream);
  }

  void state_dot(const float* prefix, const float* state, const float* log_decay,
                 const float* dstate, int64_t bh, int64_t state_elems, float* out,
                 void* stream) const override {
    if (bh == 0) return;
    LASP2_CHECK(bh <= 2147483647, "state_dot: too many (b, h) rows");
    launch_state_dot(prefix, state, log_decay, dstate, bh, state_elems, out, as_stream(stream));
  }

  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    if (count <= 0 || dst == src) return;
    cuda_check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice,
                               as_stream(stream)),
               "cudaMemcpyAsync");
  }

  void fill_zero(float* dst, int64_t count, void* stream) const override {
    if (count <= 0) return;
    cuda_check(cudaMemsetAsync(dst, 0, count * sizeof(float), as_stream(stream)),
               "cudaMemsetAsync");
  }
  void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const override {
    launch_copy_rows(rows.data(), static_cast<int64_t>(rows.size()), count, dst, as_stream(stream));
  }
  // dst + src as a two-entry prefix fold with zero log decays (exp(0) = 1); the third
  // entry only keeps the fold's target inside the list.
  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    if (count <= 0) return;
    ScratchLayout layout;
    layout.seg_log_decay = 2;
    const Scratch zeros(layout, allocator_, as_stream(stream));
    float* log_decays = zeros.buffers().seg_log_decay;
    fill_zero(log_decays, 2, stream);
    combine({dst, src, src}, log_decays, 2, 1, count, dst, false, stream);
  }

 private:
  static cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }
  CallContext call(void* stream) const { return {allocator_, as_stream(stream)}; }

  // Whether a part's summary keeps its segment states for the pass after it
  // (LASP2_CUDA_SUMMARY_KEEP=0: no, both passes walk them: the A/B's reference).
  static bool keep_summaries() { return env_flag("LASP2_CUDA_SUMMARY_KEEP", true); }

  static void check_dkdv(const AttentionParams& p, TokenRange part, const void* q_dot_dq, const void* dg) {
    check_params(p, part);
    LASP2_CHECK(dg == nullptr || q_dot_dq != nullptr, "dg needs q_dot_dq from the dq pass");
    LASP2_CHECK(dg == nullptr || p.decay.dtype == ScalarType::kFloat32,
                "CUDA kernels write dg as float32 (decay dtype must be float32)");
  }

  // What one pass over a part keeps for the next (kept_part_work.h): the meta, and
  // part_dstate_keeping's segment gradients (dk/dv pass's geometry) in a block of the
  // call's allocator, or part_state_keeping's note that the caller's saved slot holds the
  // forward's segment states. Destroying it gives its blocks back, stream-ordered.
  struct KeptPart final : public KeptPartWork {
    MetaSlot meta;
    std::unique_ptr<DeviceBlock> states;
    Geom states_geom;
    bool saved = false;
    float* states_data() const { return states ? reinterpret_cast<float*>(states->data()) : nullptr; }
  };

  // dq is the forward pass of (dO, v, k) with the transposed state.
  void run_dq(const AttentionParams& p, TokenRange part, ConstView dout, const float* initial_state, MutView dq,
              void* q_dot_dq, const float* saved, MetaSlot* meta, void* stream) const {
    check_params(p, part);
    LASP2_CHECK(q_dot_dq == nullptr || p.decay.dtype == ScalarType::kFloat32,
                "CUDA kernels write q_dot_dq as float32 (decay dtype must be float32)");
    if (p.bh() == 0 || part.length() == 0) return;
    OutputPass pass = output_pass(q_dot_dq != nullptr ? FwdMode::kDq : FwdMode::kFwd, view_of(dout), view_of(p.v),
                                  view_of(p.k), view_of(dq), p.dim_v, p.dim_k, initial_state);
    pass.x = view_of(p.q);
    pass.transposed = true;
    pass.qdq = static_cast<float*>(q_dot_dq);
    pass.kept = saved;
    pass.meta = meta;
    run_output(call(stream), p, part, pass);
  }

  // An output pass over (qa, ka, va) into `out` with `initial_state` entering the part
  // (kPrefix reads qa alone).
  static OutputPass output_pass(FwdMode mode, View qa, View ka, View va, View out, int64_t da, int64_t dv,
                                const float* initial_state) {
    OutputPass pass;
    pass.mode = mode;
    pass.qa = qa;
    pass.ka = ka;
    pass.va = va;
    pass.out = out;
    pass.da = static_cast<int>(da);
    pass.dv = static_cast<int>(dv);
    pass.initial_state = initial_state;
    return pass;
  }
  // ... of o (chunk_forward_kept)
  static OutputPass forward_pass(const AttentionParams& p, const float* initial_state, MutView o) {
    return output_pass(FwdMode::kFwd, view_of(p.q), view_of(p.k), view_of(p.v), view_of(o), p.dim_k, p.dim_v,
                       initial_state);
  }

  void combine(const std::vector<const float*>& parts, const float* log_decays, int target, int64_t bh,
               int64_t state_elems, float* out, bool suffix, void* stream) const {
    LASP2_CHECK(static_cast<int64_t>(parts.size()) <= kMaxParts,
                "CUDA combine supports at most " + std::to_string(kMaxParts) + " parts, got " +
                    std::to_string(parts.size()));
    LASP2_CHECK(target >= 0 && target < static_cast<int>(std::max<size_t>(parts.size(), 1)),
                "combine: target part out of range");
    LASP2_CHECK(bh <= 65535, "CUDA combine supports batch * heads <= 65535");
    if (bh == 0 || state_elems == 0) return;
    // nothing to fold (the first part's prefix, the last part's suffix): zeros by a memset,
    // not a kernel (3.4-3.8 us under ncu on an H100 for H = 16, D = 128)
    const int folded = suffix ? static_cast<int>(parts.size()) - 1 - target : target;
    if (folded <= 0) {
      fill_zero(out, bh * state_elems, stream);
      return;
    }
    PartTable table{};
    for (size_t i = 0; i < parts.size(); ++i) table.p[i] = parts[i];
    launch_combine(table, static_cast<int>(parts.size()), log_decays, target, bh, state_elems,
                   suffix, out, as_stream(stream));
  }

  const ScratchAllocator* allocator_;  // null: cudaMallocAsync
};

}  // namespace

const KernelBackend& cuda_backend() {
  static const CudaBackend backend(nullptr);
  return backend;
}

std::unique_ptr<KernelBackend> make_cuda_backend(const ScratchAllocator& allocator) {
  return std::make_unique<CudaBackend>(&allocator);
}

}  // namespace lasp2
