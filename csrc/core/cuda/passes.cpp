#include "passes.h"

#include <algorithm>
#include <cmath>
#include <string>

#include "env_knob.h"
#include "route.h"
#include "scratch.h"
#include "segment_scan.h"

namespace lasp2::cuda {
namespace {

// weights (nullable): per-token weights for the tensor-core segment-state kernel.
MetaArgs meta_args(const AttentionParams& p, const Geom& g, const ScratchBuffers& s) {
  MetaArgs m;
  m.g = g;
  m.mode = static_cast<int>(p.decay.mode);
  m.log_decay = static_cast<const float*>(p.decay.log_decay);
  m.gate = static_cast<const float*>(p.decay.gate);
  m.gsb = p.decay.gate_stride.batch;
  m.gst = p.decay.gate_stride.seq;
  m.gsh = p.decay.gate_stride.head;
  m.doc = p.doc_start;
  m.doc_sb = p.doc_start_batch_stride;
  m.meta = s.meta;
  m.segL = s.seg_log_decay;
  m.wmeta = s.weights;
  return m;
}

bool same_cut(const Geom& a, const Geom& b) {
  return a.batch == b.batch && a.heads == b.heads && a.seqlen == b.seqlen && a.begin == b.begin && a.n == b.n &&
         a.nchunks == b.nchunks && a.seg_chunks == b.seg_chunks && a.nseg == b.nseg;
}

// A pass's scratch: `layout` (the pass's own buffers) plus its meta, launched into the
// scratch or, with a slot, read from the slot's kept meta (made there first where the one
// it holds does not serve g). `tc_walk`: the pass walks segment states on tensor cores
// (the weights); `tc_route`: its kernels are the tensor-core ones, so a kept meta also
// gets the weights for a later pass that walks.
class PassScratch {
 public:
  PassScratch(const CallContext& c, const AttentionParams& p, const Geom& g, bool tc_walk, bool tc_route,
              ScratchLayout layout, MetaSlot* slot)
      : scratch_(with_meta(layout, g, tc_walk, slot), c.allocator, c.stream), s_(scratch_.buffers()) {
    if (slot == nullptr) {
      launch_meta(meta_args(p, g, s_), c.stream);
      return;
    }
    if (!*slot || !(*slot)->serves(g, tc_walk)) *slot = std::make_unique<KeptMeta>(c, p, g, tc_walk || tc_route);
    (*slot)->place(s_);
  }
  const ScratchBuffers& buffers() const { return s_; }

 private:
  static ScratchLayout with_meta(ScratchLayout l, const Geom& g, bool tc_walk, const MetaSlot* slot) {
    if (slot != nullptr) return l;
    const ScratchLayout walk = ScratchLayout::for_walk(g, tc_walk);
    l.meta = walk.meta;
    l.weights = walk.weights;
    l.seg_log_decay = walk.seg_log_decay;
    return l;
  }
  Scratch scratch_;
  ScratchBuffers s_;
};

// The dg fix-up over all heads of a token range (head_row_kernels.cu) unless
// LASP2_CUDA_HEAD_ROWS=0, which selects the one per (b, h, segment) (misc_kernels.cu):
// both write the same bits (the test compares them); on an H200 (session 11,
// docs/history/kernels-log.md) the one over rows took 5.5 instead of 20 us at 64K tokens.
// 2 and 3 (the bit mask of before session 12) still mean the default; anything else: Error.
bool dg_fixup_over_rows() { return env_int("LASP2_CUDA_HEAD_ROWS", 1, 0, 3) != 0; }

// Chunks per piece of a split segment-state walk (StateArgs::sub_chunks), 0 = one walk
// per segment. A walk stops where its carry underflows, so the pass lasts as long as
// its longest walk: with per-token gates every walk stops after about 32 chunks, with
// a fixed decay per head the weakest head's walks cover whole segments (128 chunks at
// T = 64K, H = 16 on 132 SMs) while the others stop early (docs/history/kernels-log.md, session 13).
// Pieces of 32 chunks bound every block's walk; the default splits fixed decays only.
// LASP2_CUDA_STATE_SUB_CHUNKS=n: n > 0 for every decay mode, 0 = never split (negative: Error).
int state_sub_chunks(const AttentionParams& p) {
  const int forced = env_int("LASP2_CUDA_STATE_SUB_CHUNKS", -1, 0, INT_MAX);
  if (forced >= 0) return forced;
  return p.decay.mode == DecayMode::kFixed ? 32 : 0;
}

// Where a tensor-core state walk may end (StateArgs::stop) for walks starting at carry
// `coef`: once every term left weighs at most 2^-n of the first (n = 48 unless
// LASP2_CUDA_STATE_FLOOR=n; 0: only at fp32 underflow, as before session 14). Those
// terms add at most 2^-n times the tail's sum |a b^T| to a state whose kept terms are
// each rounded to 16 bits (the kernel scales a in bf16 / fp16: relative error up to
// 2^-8 / 2^-11; in fp16 terms below 2^-25 flush to zero anyway), so what the floor drops
// is below that rounding unless the tail's values exceed the recent ones by ~2^40. With a
// fixed decay the weakest heads' walks otherwise cover whole segments (docs/history/kernels-log.md,
// "Session 14: fixed decay beside fla at 64K"). The generic (fp32) path keeps 0. n is at most
// 120 (2^-120 is still a normal float; values past it were clamped to it before session 25).
float state_walk_stop(float coef) {
  const int n = env_int("LASP2_CUDA_STATE_FLOOR", 48, 0, 120);
  return n > 0 ? coef * std::ldexp(1.f, -n) : 0.f;
}

// Copy stages of the tensor-core state walk at tile D (LASP2_CUDA_STATE_STAGES: 3, 4 or 6;
// unset: 3, the ring every session before 21 measured). With per-token gates a walk ends
// after ~10 chunks and takes ~2.4 us a chunk at 64K, far above its math: each step waits on
// a load issued two steps before, so a deeper ring (S - 1 chunks in flight) may help; with
// a fixed decay 4 stages measured no change (session 15). The default stays until measured.
// Any other value, or a ring the device's opt-in shared memory cannot hold, is an Error.
int state_copy_stages(int D) {
  const char* name = "LASP2_CUDA_STATE_STAGES";
  constexpr int kBuilt[] = {3, 4, 6};  // tc_state_stages_smem's rings
  const int n = kBuilt[env_choice(name, {"3", "4", "6"}, 0)];
  const int bytes = tc_state_stages_smem(D, n);
  LASP2_CHECK(bytes <= device_info().smem_optin,
              std::string(name) + "=" + std::to_string(n) + " needs " + std::to_string(bytes) +
                  " bytes of shared memory a block at D = " + std::to_string(D) + ", the device allows " +
                  std::to_string(device_info().smem_optin));
  return n;
}

// The state passes of the output / dq pass and of the dk/dv pass leave out the one segment
// state their scan never reads (launch_segment_scan: last_unread): the prefix scan's
// entering states need segments 0 .. nseg - 2 only, the suffix scan's leaving gradients
// segments 1 .. nseg - 1 (neither pass asks its scan for final_out: final states, the
// LASP-2 summaries and the entering-state gradients come from reduce_part, which walks
// every segment). The scan still writes every slot of what it keeps (OutputPass::keep): the
// state entering each segment, the last one's too. Session 16: the same bits in every output
// and gradient as walking all segments (measured on the H200, then the knob was removed),
// 1/nseg fewer state blocks.

// Pieces per segment of the state pass on route sD (tensor cores only), 1 = no split.
int state_pieces(const AttentionParams& p, const Geom& g, int sD) {
  const int sc = sD > 0 ? state_sub_chunks(p) : 0;
  return sc > 0 && g.seg_chunks > sc ? (g.seg_chunks + sc - 1) / sc : 1;
}

// The split walks' scratch (none without a split).
void add_state_split(ScratchLayout& l, const AttentionParams& p, const Geom& g, int sD) {
  const int64_t later = g.bh() * g.nseg * (state_pieces(p, g, sD) - 1);
  l.sub_states = later * p.state_elems();
  l.sub_flags = later;
}

// Segment states of (a, b) over the part (exit or entry weights) into `out`
// ([bh][nseg][da * db]); the tensor-core kernel (D > 0) reads the per-token weights,
// the generic one meta. The scratch has the split walks' buffers (add_state_split).
// Returns the later pieces of a split walk, which the scan that reads `out` next must add
// (launch_segment_scan; none without a split): no kernel of their own.
// skip_seg (0 or nseg - 1; -1: none): a segment whose state is not computed (its slot of
// `out` and its pieces are not written; see above).
StatePieces run_states(const AttentionParams& p, const Geom& g, int D, View a, View b, int da,
                       int db, const ScratchBuffers& s, float coef, bool entry, float* out,
                       int skip_seg, cudaStream_t stream) {
  StateArgs sa;
  sa.g = g;
  sa.first_seg = skip_seg == 0 ? 1 : 0;
  sa.segs = skip_seg >= 0 ? g.nseg - 1 : g.nseg;
  sa.a = a;
  sa.b = b;
  sa.da = da;
  sa.db = db;
  sa.meta = s.meta;
  sa.wmeta = s.weights;
  sa.coef = coef;
  sa.out = out;
  StatePieces pieces;
  if (sa.segs == 0) return pieces;  // the one segment left out: no block to launch
  if (D > 0) {
    sa.stop = state_walk_stop(coef);
    sa.nsub = state_pieces(p, g, D);
    if (sa.nsub > 1) {
      sa.sub_chunks = state_sub_chunks(p);
      sa.sub_out = s.sub_states;
      sa.sub_flags = s.sub_flags;
    }
    launch_tc_state(elem_of(p.dtype), D, sa, entry, stream, state_copy_stages(D));
    if (sa.nsub > 1) pieces = {sa.sub_out, sa.sub_flags, sa.nsub};
  } else {
    const bool smem = generic_state_smem(da, db, true) <= device_info().smem_optin;
    launch_generic_state(elem_of(p.dtype), sa, entry, smem, stream);
  }
  return pieces;
}

}  // namespace

KeptMeta::KeptMeta(const CallContext& c, const AttentionParams& p, const Geom& g, bool weights)
    : g_(g), weights_(weights), block_(ScratchLayout::for_walk(g, weights), c.allocator, c.stream) {
  launch_meta(meta_args(p, g, block_.buffers()), c.stream);
}

bool KeptMeta::serves(const Geom& g, bool weights) const { return same_cut(g_, g) && (weights_ || !weights); }

void KeptMeta::place(ScratchBuffers& s) const {
  const ScratchBuffers& b = block_.buffers();
  s.meta = b.meta;
  s.weights = b.weights;
  s.seg_log_decay = b.seg_log_decay;
}

bool reduce_part(const CallContext& c, const AttentionParams& p, TokenRange part, View a, View b,
                 bool entry, float* state, float* log_decay, float* keep, const Geom* keep_geom, MetaSlot* meta) {
  const int64_t se = p.state_elems();
  if (p.bh() == 0) return false;
  if (part.length() == 0) {
    cuda_check(cudaMemsetAsync(state, 0, p.bh() * se * 4, c.stream), "cudaMemsetAsync");
    if (log_decay) cuda_check(cudaMemsetAsync(log_decay, 0, p.bh() * 4, c.stream), "cudaMemsetAsync");
    return false;
  }
  const int D = state_dim(p, a, b);
  // Kept states are cut as the pass that reads them cuts the part, so that its walk (every
  // segment but the one its scan leaves unread) is this one's, bit for bit.
  const bool keeping = keep != nullptr && keep_geom != nullptr && keep_geom->nseg > 1;
  const Geom g = keeping ? *keep_geom : make_geom(p, part, D);
  ScratchLayout layout;
  layout.seg_states = keeping ? 0 : g.bh() * g.nseg * se;
  add_state_split(layout, p, g, D);
  const PassScratch scratch(c, p, g, D > 0, D > 0, layout, meta);
  const ScratchBuffers& s = scratch.buffers();
  float* M = keeping ? keep : s.seg_states;
  const StatePieces pieces =
      run_states(p, g, D, a, b, static_cast<int>(p.dim_k), static_cast<int>(p.dim_v), s,
                 entry ? static_cast<float>(p.scale) : 1.f, entry, M, -1, c.stream);
  // in place; what is kept, as the pass that reads it would have made it: scanned from
  // zero (write_segments), the state entering each segment (exit mode, for the output
  // pass) or the gradient leaving it (entry mode, for the dk/dv pass)
  launch_segment_scan(M, s.seg_log_decay, g.bh(), g.nseg, se, entry, keeping, state, log_decay, pieces, false,
                      c.stream);
  return keeping;
}

void run_output(const CallContext& c, const AttentionParams& p, TokenRange part,
                const OutputPass& pass) {
  const int64_t se = p.state_elems();
  const FwdMode mode = pass.mode;
  int D = 0;
  const int smem64 = tc_fwd_smem(64, mode), smem128 = tc_fwd_smem(128, mode);
  if (mode == FwdMode::kPrefix) {
    D = tc_dim(p, {pass.qa, pass.out}, smem64, smem128);
  } else if (mode == FwdMode::kDq) {
    D = tc_dim(p, {pass.qa, pass.ka, pass.va, pass.x, pass.out}, smem64, smem128);
  } else {
    D = tc_dim(p, {pass.qa, pass.ka, pass.va, pass.out}, smem64, smem128);
  }
  const bool keeping = mode != FwdMode::kPrefix && (pass.keep != nullptr || pass.kept != nullptr);
  const Geom g = keeping ? output_geom(p, part) : make_geom(p, part, D);
  const bool smem_state =
      D > 0 || generic_fwd_smem(pass.da, pass.dv, mode, true) <= device_info().smem_optin;
  const bool need_states = mode != FwdMode::kPrefix && g.nseg > 1;
  const bool read_kept = need_states && pass.kept != nullptr;
  const View k = view_of(p.k), v = view_of(p.v);
  // the segment-state pass, if any (none when the forward's states are read back)
  const int sD = need_states && !read_kept ? state_dim(p, k, v) : 0;
  ScratchLayout layout;
  // segment states of the pass's own: where none are read back or kept for later, and where
  // an entering state is added to what was (which stays from zero)
  const bool own_states = need_states && (pass.initial_state != nullptr || (!read_kept && pass.keep == nullptr));
  layout.seg_states = own_states ? g.bh() * g.nseg * se : 0;
  layout.block_states =
      smem_state ? 0 : g.bh() * g.nseg * generic_state_scratch_floats(pass.da, pass.dv);
  add_state_split(layout, p, g, sD);
  const PassScratch scratch(c, p, g, sD > 0, D > 0, layout, pass.meta);
  const ScratchBuffers& s = scratch.buffers();
  FwdArgs a;
  a.g = g;
  a.qa = pass.qa;
  a.ka = pass.ka;
  a.va = pass.va;
  a.x = pass.x;
  a.out = pass.out;
  a.da = pass.da;
  a.dv = pass.dv;
  a.meta = s.meta;
  a.segL = s.seg_log_decay;
  a.state_transposed = pass.transposed ? 1 : 0;
  a.scale = static_cast<float>(p.scale);
  a.qdq = pass.qdq;
  a.scratch = s.block_states;
  if (need_states) {
    // The true state K^T V ([dk][dv]) of each segment (computed, into `keep` when the
    // forward keeps them), then the prefix scan from zero in place: the state entering
    // each segment from the part's own tokens (a split walk's pieces added). That is what
    // the forward keeps and the dq pass (or the output pass after a summary that kept
    // them, reduce_part) reads back with no scan of its own. Where a state enters the part
    // (a P > 1 rank's prefix, an initial state), one elementwise launch adds it times the
    // decay of the segments before each into the scratch (the kept states stay from zero):
    // as many launches as the scan it replaces, none where nothing enters (one device, the
    // first rank). (Adding it inside the pass's blocks, session 28: about 20 us slower a
    // pass at 16K on an H100, the loads of a 64 KiB state with no registers to spare.)
    // The last segment's state is left out (the prefix scan does not read it).
    const float* X = pass.kept;
    if (!read_kept) {
      float* out = pass.keep != nullptr ? pass.keep : s.seg_states;
      const StatePieces pieces = run_states(p, g, sD, k, v, static_cast<int>(p.dim_k), static_cast<int>(p.dim_v),
                                            s, 1.f, false, out, g.nseg - 1, c.stream);
      launch_segment_scan(out, s.seg_log_decay, g.bh(), g.nseg, se, false, true, nullptr, nullptr, pieces, true,
                          c.stream);
      X = out;
    }
    if (pass.initial_state != nullptr) {
      launch_add_through_segments(X, s.seg_log_decay, pass.initial_state, g.bh(), g.nseg, se, false, s.seg_states,
                                  c.stream);
      X = s.seg_states;
    }
    a.state = X;
    a.state_bh = g.nseg * se;
    a.state_seg = se;
  } else {
    a.state = pass.initial_state;
    a.state_bh = se;
    a.state_seg = 0;
  }
  if (D > 0) launch_tc_fwd(elem_of(p.dtype), D, a, mode, c.stream);
  else launch_generic_fwd(elem_of(p.dtype), a, mode, smem_state, c.stream);
}

namespace {
// The tile dimension both output modes would take with aligned views (no view checks).
int output_dim(const AttentionParams& p) {
  const int smem64 = std::max(tc_fwd_smem(64, FwdMode::kFwd), tc_fwd_smem(64, FwdMode::kDq));
  const int smem128 = std::max(tc_fwd_smem(128, FwdMode::kFwd), tc_fwd_smem(128, FwdMode::kDq));
  return tc_dim(p, {}, smem64, smem128);
}
}  // namespace

Geom output_geom(const AttentionParams& p, TokenRange part) {
  return make_geom(p, part, output_dim(p));
}

void output_plan(const AttentionParams& p, int64_t* target_blocks, int* forced_seg_chunks) {
  const int D = output_dim(p);  // make_geom's blocks per SM for this tile dimension
  *target_blocks = (D == 128 ? 1 : D == 64 ? 2 : 4) * static_cast<int64_t>(device_info().sms);
  *forced_seg_chunks = seg_chunks_knob();
}

int64_t kept_state_floats(const AttentionParams& p, TokenRange part) {
  if (p.bh() == 0 || part.length() == 0) return 0;
  const Geom g = output_geom(p, part);
  return g.nseg > 1 ? g.bh() * g.nseg * p.state_elems() : 0;
}

Geom dkdv_geom(const AttentionParams& p, TokenRange part, View dout) {
  const View q = view_of(p.q), k = view_of(p.k), v = view_of(p.v);
  return make_geom(p, part, tc_dim(p, {q, k, v, dout}, tc_dkdv_smem(64), tc_dkdv_smem(128)));
}

void run_dkdv(const CallContext& c, const AttentionParams& p, TokenRange part, View dout,
              const float* final_dstate, View dk, View dv, const float* q_dot_dq,
              const float* dg_offset, float* dg, const float* kept, const Geom* kept_geom, MetaSlot* meta) {
  const int64_t se = p.state_elems();
  const View q = view_of(p.q), k = view_of(p.k), v = view_of(p.v);
  const int D = tc_dim(p, {q, k, v, dout, dk, dv}, tc_dkdv_smem(64), tc_dkdv_smem(128));
  const Geom g = make_geom(p, part, D);
  const bool read_kept = kept != nullptr && kept_geom != nullptr && g.nseg > 1 && same_cut(*kept_geom, g);
  const int idk = static_cast<int>(p.dim_k), idv = static_cast<int>(p.dim_v);
  const bool smem_state = D > 0 || generic_dkdv_smem(idk, idv, true) <= device_info().smem_optin;
  const int sD = g.nseg > 1 && !read_kept ? state_dim(p, q, dout) : 0;  // the entry-state pass, if any
  ScratchLayout layout;
  // segment gradients of the pass's own: where none were kept, and where a leaving gradient
  // is added to what was (which stays from zero)
  const bool own_states = g.nseg > 1 && (!read_kept || final_dstate != nullptr);
  layout.seg_states = own_states ? g.bh() * g.nseg * se : 0;
  layout.seg_dg_sums = g.bh() * g.nseg;
  layout.block_states = smem_state ? 0 : g.bh() * g.nseg * generic_state_scratch_floats(idk, idv);
  add_state_split(layout, p, g, sD);
  const PassScratch scratch(c, p, g, sD > 0, D > 0, layout, meta);
  const ScratchBuffers& s = scratch.buffers();
  DkdvArgs a;
  a.g = g;
  a.q = q;
  a.k = k;
  a.v = v;
  a.dout = dout;
  a.dk_out = dk;
  a.dv_out = dv;
  a.dk = idk;
  a.dv = idv;
  a.meta = s.meta;
  a.scale = static_cast<float>(p.scale);
  a.qdq = q_dot_dq;
  a.dg = dg;
  a.dg_offset = dg_offset;
  a.seg_total = s.seg_dg_sums;
  a.fold_offset = g.nseg == 1 ? 1 : 0;
  a.scratch = s.block_states;
  if (g.nseg > 1) {
    // The gradients leaving each segment from the part's own outputs: the entry states'
    // suffix scan from zero, in place (segment 0's entry state is left out: the scan does
    // not read it), or what the part's entering-state gradient kept, scanned alike
    // (reduce_part); plus the part's leaving gradient times the decay of the segments
    // after each, where one leaves (as the output pass's entering state above).
    if (!read_kept) {
      const StatePieces pieces = run_states(p, g, sD, q, dout, idk, idv, s, static_cast<float>(p.scale), true,
                                            s.seg_states, 0, c.stream);
      launch_segment_scan(s.seg_states, s.seg_log_decay, g.bh(), g.nseg, se, true, true, nullptr, nullptr, pieces,
                          true, c.stream);
    }
    a.dstate = read_kept ? kept : s.seg_states;
    if (final_dstate != nullptr) {
      launch_add_through_segments(a.dstate, s.seg_log_decay, final_dstate, g.bh(), g.nseg, se, true, s.seg_states,
                                  c.stream);
      a.dstate = s.seg_states;
    }
    a.dstate_bh = g.nseg * se;
    a.dstate_seg = se;
  } else {
    a.dstate = final_dstate;
    a.dstate_bh = se;
    a.dstate_seg = 0;
  }
  if (D > 0) launch_tc_dkdv(elem_of(p.dtype), D, a, c.stream);
  else launch_generic_dkdv(elem_of(p.dtype), a, smem_state, c.stream);
  if (dg != nullptr && g.nseg > 1) {
    if (dg_fixup_over_rows() && dg_fixup_rows_fit(g)) {
      launch_dg_fixup_rows(g, dg, s.seg_dg_sums, dg_offset, c.stream);
    } else {
      launch_dg_fixup(g, dg, s.seg_dg_sums, dg_offset, c.stream);
    }
  }
}

}  // namespace lasp2::cuda
