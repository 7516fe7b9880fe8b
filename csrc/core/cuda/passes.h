// What each CUDA backend function launches, in order: the per-token decay
// bookkeeping, segment states and their scan, then the pass that walks every
// segment with its entering state (docs/kernels.md). The KernelBackend in
// cuda_backend.cpp checks arguments and calls these.
#pragma once

#include <cuda_runtime.h>

#include <memory>

#include "launch.h"
#include "lasp2/params.h"
#include "lasp2/scratch_allocator.h"
#include "scratch.h"

namespace lasp2::cuda {

// Where a call's kernels go and where its scratch comes from (null: cudaMallocAsync).
struct CallContext {
  const ScratchAllocator* allocator = nullptr;
  cudaStream_t stream = nullptr;
};

// The per-token meta of one part on one geometry (ScratchLayout::for_walk's meta, weights
// and segment log decays: MetaArgs), kept in a block of the call's allocator so that a
// later pass over the same part and params reads it instead of launching the meta kernel
// again. LASP-2 on P > 1 ranks runs two passes over a part forward (summary, output) and
// three backward (entering-state gradient, dq, dk/dv); one device runs two backward.
class KeptMeta {
 public:
  // Launches the meta kernel into the block; `weights`: also the tensor-core walk's
  // per-token weights.
  KeptMeta(const CallContext& c, const AttentionParams& p, const Geom& g, bool weights);
  // Whether a pass on geometry g (needing the weights or not) can read it.
  bool serves(const Geom& g, bool weights) const;
  // The meta buffers, for a pass's ScratchBuffers.
  void place(ScratchBuffers& s) const;

 private:
  Geom g_;
  bool weights_;
  Scratch block_;
};
// A pass's kept meta, in and out (nullable): read where it serves the pass, else made
// anew in it (the next pass then reads that one). Without a slot the meta goes into the
// pass's own scratch.
using MetaSlot = std::unique_ptr<KeptMeta>;

// The state of a whole part, reduced over segments in parallel: the exit-weighted
// sum of k v^T and the part's log decay (part_state), or the entry-weighted
// scale * sum q dO^T (part_dstate: entry = true, scanned in reverse).
// keep (nullable): the segment states also go there, cut as `keep_geom` cuts the part: the
// geometry of the pass that reads them (exit mode: output_geom, what OutputPass::keep
// would hold, the states entering each segment from zero; entry mode: dkdv_geom, for
// run_dkdv's `kept`, the gradient leaving each segment from zero). Returns false where
// that geometry has one segment (nothing kept; keep untouched). meta: MetaSlot.
bool reduce_part(const CallContext& c, const AttentionParams& p, TokenRange part, View a, View b,
                 bool entry, float* state, float* log_decay, float* keep = nullptr,
                 const Geom* keep_geom = nullptr, MetaSlot* meta = nullptr);

// The output pass (FwdArgs): o (kFwd), dq and q.dq (kDq, with (qa, ka, va) = (dO, v, k)
// and the transposed state), or the prefix term only (kPrefix).
// Both kFwd and kDq start from the states entering each segment from the part's own
// tokens (the exit-weighted segment states M_s of (k, v) scanned from zero, so independent
// of the entering state, which launch_add_through_segments adds where one enters).
// `keep` (kFwd) receives them, `kept` (kFwd after a summary that kept them, kDq) reads them
// instead of running the state pass and the scan; either one puts the pass on the output
// geometry (output_geom), so the two calls cut the part alike.
struct OutputPass {
  FwdMode mode = FwdMode::kFwd;
  View qa, ka, va, x, out;
  int da = 0, dv = 0;
  const float* initial_state = nullptr;
  bool transposed = false;
  float* qdq = nullptr;
  float* keep = nullptr;
  const float* kept = nullptr;
  MetaSlot* meta = nullptr;
};
void run_output(const CallContext& c, const AttentionParams& p, TokenRange part,
                const OutputPass& pass);

// The segments of the output pass when it keeps or reads states: chosen from the params
// (dtype, dims, batch x heads, device) and the part alone, not from the views' alignment,
// so the forward (o) and the backward (dq) agree even where their routes differ.
Geom output_geom(const AttentionParams& p, TokenRange part);
// make_geom's wave target (blocks per SM x SMs) and LASP2_CUDA_SEG_CHUNKS for output_geom
// (KernelBackend::SavedStatesPlan).
void output_plan(const AttentionParams& p, int64_t* target_blocks, int* forced_seg_chunks);
// fp32 values of the kept states of `part`: bh x nseg x dk x dv, 0 with one segment
// (the pass then needs none).
int64_t kept_state_floats(const AttentionParams& p, TokenRange part);

// dk, dv and the dg terms (DkdvArgs) with final_dstate leaving the part. kept (nullable):
// the gradients leaving each segment from the part's own outputs (the entry-weighted
// segment states of (q, dO) suffix-scanned from zero) that reduce_part kept on
// `kept_geom`, read instead of walked and scanned where the pass cuts the part alike
// (else walked again). meta: MetaSlot.
void run_dkdv(const CallContext& c, const AttentionParams& p, TokenRange part, View dout,
              const float* final_dstate, View dk, View dv, const float* q_dot_dq,
              const float* dg_offset, float* dg, const float* kept = nullptr,
              const Geom* kept_geom = nullptr, MetaSlot* meta = nullptr);
// The dk/dv pass's segments where dk and dv are laid out as q and k (the views it is
// given then decide: run_dkdv's kept_geom check).
Geom dkdv_geom(const AttentionParams& p, TokenRange part, View dout);

}  // namespace lasp2::cuda
