// Host-visible kernel arguments and launchers of the CUDA backend. Plain structs
// (pointers, element strides, sizes) so that cuda_backend.cpp compiles with the
// host compiler; the kernels live in the .cu files next to this header.
//
// Every kernel works on one part [begin, begin + n) of the local sequence, cut
// into 64-token chunks; consecutive chunks form segments (seg_chunks chunks each)
// that run in parallel thread blocks, exactly as LASP-2 splits a sequence over
// devices: segment states, a scan over segments, then a pass that walks each
// segment chunk by chunk with the running state on chip.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "elem.h"

namespace lasp2::cuda {

constexpr int kChunk = 64;       // tokens per chunk (every kernel)
constexpr int kMaxParts = 256;   // combine_prefix / combine_suffix pointer table
constexpr int kMaxGenericDim = 256;

// A [B, T, H, D] view: element strides, last dimension contiguous.
struct View {
  void* ptr = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
};

// Where the part lies and how it is cut.
struct Geom {
  int batch = 0, heads = 0;
  int64_t seqlen = 0;  // local tokens (row index of [B, T, H] scalars)
  int64_t begin = 0;   // first token of the part
  int n = 0;           // tokens in the part
  int nchunks = 0;     // ceil(n / 64)
  int seg_chunks = 1;  // chunks per segment
  int nseg = 1;        // ceil(nchunks / seg_chunks)
  int64_t bh() const { return static_cast<int64_t>(batch) * heads; }
};

// Per-token decay bookkeeping ("meta"): for every token x of chunk c, the pair
// {G, s}: G = cumulative log decay from the chunk's first token through x, s =
// number of document starts in the chunk up to x (as float); a token whose log decay
// is -inf (the state forgotten) counts as a document start and adds 0 to G. Padded tokens past
// the part's end repeat the last valid pair. Layout [bh][nchunks * 64][2].
// segL[bh][nseg] = log of the segment's total decay, -inf if a document starts in it.
// wmeta (optional, same layout as meta): per token {w_entry, w_exit} =
// {s == 0 ? exp(G) : 0, s == s_last ? exp(G_last - G) : 0}, s_last and G_last those of
// the chunk's last token (the tensor-core segment-state kernel reads only these).
struct MetaArgs {
  Geom g;
  int mode = 0;  // DecayMode
  const float* log_decay = nullptr;
  const float* gate = nullptr;
  int64_t gsb = 0, gst = 0, gsh = 0;
  const uint8_t* doc = nullptr;
  int64_t doc_sb = 0;
  float* meta = nullptr;
  float* segL = nullptr;
  float* wmeta = nullptr;
};

// Segment states: out[bh][seg] (a-dim x b-dim, row-major, fp32) =
//   exit mode:  sum_y w_exit(y) a_y b_y^T      (state leaving the segment from zero)
//   entry mode: coef * sum_x w_entry(x) a_x b_x^T  (what the segment's queries owe
//               the state entering it: a = q, b = dO, coef = scale)
struct StateArgs {
  Geom g;
  View a, b;
  int da = 0, db = 0;
  const float* meta = nullptr;
  const float* wmeta = nullptr;  // tensor-core path: per-token weights (MetaArgs::wmeta)
  float coef = 1.f;
  float* out = nullptr;
  // Split walks (tensor-core path; passes.cpp chooses them): each segment's walk is cut into `nsub`
  // pieces of `sub_chunks` chunks, each run by its own blocks; piece 0 writes `out`, piece
  // j > 0 its state to sub_out[bh][nseg][nsub - 1][da * db] when it walked any chunk, and
  // sub_flags (same index, one float) = 1 if so, else 0; the scan that reads the states next
  // adds them (segment_scan.h: StatePieces).
  int sub_chunks = 0;  // 0: one piece (nsub = 1)
  int nsub = 1;
  float* sub_out = nullptr;
  float* sub_flags = nullptr;
  // Tensor-core path: a walk ends once its carry (coef times the decay from the chunk to
  // the segment's edge, a bound on every later term's weight) is <= stop; 0: only where
  // it underflows to 0 or a document starts (passes.cpp: state_walk_stop).
  float stop = 0.f;
  // The segments walked: [first_seg, first_seg + segs) of g.nseg (the grid covers these
  // only; the others' `out` slots are not written). passes.cpp's run_states sets them:
  // every segment, or all but the one whose state no scan reads.
  int first_seg = 0;
  int segs = 0;
};

// The output pass, o = scale * (w_entry * qa^T S + sum_y w(x,y) (qa.ka_y) va_y):
//   kFwd:    (qa, ka, va) = (q, k, v), out = o
//   kDq:     (qa, ka, va) = (dO, v, k), out = dq, and qdq[t] = q_t . dq_t (x = q)
//   kPrefix: out += scale * w_entry * qa^T S only (add_prefix_output)
// S_a is the da x dv state of (ka, va); `state` holds S_a ([da][dv]) or, when
// state_transposed, S_a^T ([dv][da]), at state + bh * state_bh + seg * state_seg.
enum class FwdMode : int { kFwd = 0, kDq = 1, kPrefix = 2 };
struct FwdArgs {
  Geom g;
  View qa, ka, va, x, out;
  int da = 0, dv = 0;
  const float* meta = nullptr;
  const float* segL = nullptr;  // kPrefix: the prefix enters segment s scaled by exp(sum_{s'<s} L)
  const float* state = nullptr;
  int64_t state_bh = 0, state_seg = 0;
  int state_transposed = 0;
  float scale = 1.f;
  float* qdq = nullptr;        // [B, T, H] fp32 contiguous
  float* scratch = nullptr;    // generic path: per-block state when it does not fit in smem
};

// dk, dv (and the per-token dg terms) by a reverse walk of each segment.
// dstate: gradient of the state leaving each segment ([dk][dv]) or null.
// dg: reverse cumulative sum of (qdq - k.dk) within the segment; when fold_offset
// the dg_offset[bh] is added here (single segment), else seg_total[bh][seg]
// receives the segment's sum and launch_dg_fixup adds the later segments' sums.
struct DkdvArgs {
  Geom g;
  View q, k, v, dout, dk_out, dv_out;
  int dk = 0, dv = 0;
  const float* meta = nullptr;
  const float* dstate = nullptr;
  int64_t dstate_bh = 0, dstate_seg = 0;
  float scale = 1.f;
  const float* qdq = nullptr;
  float* dg = nullptr;
  const float* dg_offset = nullptr;
  float* seg_total = nullptr;
  int fold_offset = 1;
  float* scratch = nullptr;  // generic path
};

// ---- misc kernels (misc_kernels.cu) ----
void launch_meta(const MetaArgs& a, cudaStream_t s);
void launch_dg_fixup(const Geom& g, float* dg, const float* seg_total, const float* dg_offset,
                     cudaStream_t s);
// The same fix-up over all heads of a token range (head_row_kernels.cu: whole [B, T, H]
// rows, coalesced; the same bits), for the geometries dg_fixup_rows_fit accepts
// (heads <= 1024).
bool dg_fixup_rows_fit(const Geom& g);
void launch_dg_fixup_rows(const Geom& g, float* dg, const float* seg_total, const float* dg_offset,
                          cudaStream_t s);
struct PartTable {
  const float* p[kMaxParts];
};
void launch_combine(const PartTable& parts, int num_parts, const float* log_decays, int target,
                    int64_t bh, int64_t elems, bool suffix, float* out, cudaStream_t s);
// out[bh][s] = X[bh][s] + exp(sum of segL over the segments before s) * add[bh] (prefix), or
// after s (suffix): the states entering each segment (the gradients leaving it) from the
// part's own tokens, scanned from zero, plus what enters (leaves) the part, for a pass that
// has both. out may be X. Segments whose sum is -inf (a document start between) get X.
void launch_add_through_segments(const float* X, const float* segL, const float* add, int64_t bh, int nseg,
                                 int64_t elems, bool suffix, float* out, cudaStream_t s);
// dst[r * count, +count) = rows[r][0, count) for r < n, zeros where rows[r] is null: the
// rows a LASP-2 forward gathers (one map per global part), in one launch a kMaxParts rows.
void launch_copy_rows(const float* const* rows, int64_t n, int64_t count, float* dst, cudaStream_t s);
void launch_state_dot(const float* prefix, const float* state, const float* log_decay,
                      const float* dstate, int64_t bh, int64_t elems, float* out, cudaStream_t s);

// ---- tensor-core path (bf16/fp16, dims <= D in {64, 128}, multiples of 8) ----
// Dynamic shared memory each launcher needs (bytes), to check against the device.
int tc_state_smem(int D);
// The state walk's with `stages` copy stages (LASP2_CUDA_STATE_STAGES: 3, 4 or 6; 3 is
// tc_state_smem's ring), its tensor-map kernel's bytes; -1 for a count not built.
int tc_state_stages_smem(int D, int stages);
// The copy stages of the last launch_tc_state in this process (tests; any thread's); -1
// before any launch.
int tc_state_last_stages();
int tc_fwd_smem(int D, FwdMode mode);
int tc_dkdv_smem(int D);
// The kernel the last launch_tc_dkdv ran in this process (tests; any thread's): 0 the cp.async
// kernel, 1 the tensor-map copies (kTma), 2 kTma with the staged dk / dv tensor-map stores
// (the default at D = 128; LASP2_CUDA_DKDV_STORE=direct forces 1); -1 before any launch.
int tc_dkdv_last_kernel();
void launch_tc_state(Elem e, int D, const StateArgs& a, bool entry, cudaStream_t s, int stages = 3);
void launch_tc_fwd(Elem e, int D, const FwdArgs& a, FwdMode mode, cudaStream_t s);
// The output mode at D = 128 by variant 16 (tc_forward_ws.cu; bf16 / fp16), where it runs:
// sm_90 code on an sm_90 device, the meta 16-byte aligned, every map encodable, its shared
// memory within the device's opt-in limit; false (nothing launched) otherwise.
bool launch_tc_fwd_ws(Elem e, const FwdArgs& a, cudaStream_t s);
void launch_tc_dkdv(Elem e, int D, const DkdvArgs& a, cudaStream_t s);

// ---- generic path (any dtype, dims <= 256; FMA arithmetic) ----
// smem bytes with the state in shared memory (the launcher falls back to global
// scratch, sized by generic_*_scratch_floats, when this exceeds `smem_limit`).
int generic_state_smem(int da, int db, bool state_in_smem);
int generic_fwd_smem(int da, int dv, FwdMode mode, bool state_in_smem);
int generic_dkdv_smem(int dk, int dv, bool state_in_smem);
int64_t generic_state_scratch_floats(int da, int db);  // per block
void launch_generic_state(Elem e, const StateArgs& a, bool entry, bool state_in_smem,
                          cudaStream_t s);
void launch_generic_fwd(Elem e, const FwdArgs& a, FwdMode mode, bool state_in_smem,
                        cudaStream_t s);
void launch_generic_dkdv(Elem e, const DkdvArgs& a, bool state_in_smem, cudaStream_t s);

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), once
// per kernel, device and size (kernel_attributes.cpp: a call is host time at every launch).
void allow_dynamic_smem(const void* kernel, int bytes);

// allow_dynamic_smem and cudaFuncAttributePreferredSharedMemoryCarveout =
// cudaSharedmemCarveoutMaxShared (all of the SM's shared memory, for two large blocks an
// SM), once per kernel, device and size (kernel_attributes.cpp); the first failed call's
// error (not remembered: the next launch tries again), else cudaSuccess.
cudaError_t allow_max_shared(const void* kernel, int bytes);

// Throws lasp2::Error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace lasp2::cuda
