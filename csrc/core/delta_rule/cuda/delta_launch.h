// Host-visible kernel arguments and launchers of the delta-rule CUDA backend
// (plain structs: pointers, element strides, sizes), so that the backend compiles
// with the host compiler; the kernels live in delta_recurrent.cu (the walks) and
// delta_compose.cu (the segment composition and map combines).
//
// Every kernel walks a part [begin, begin + n) of the local sequence token by token.
// The state columns are independent (column j of S only sees v[:, j]), so a kernel
// gives each state column to a group of G lanes, each lane holding R consecutive
// rows (d_k <= G * R); the per-token dot products are shuffle sums inside the group.
// A block stages the inputs of 64 tokens in shared memory at a time, so the walk's
// per-token chain never waits on global memory.
//
// The walks also run over segments of the part in parallel (grid z), as LASP-2 runs
// over devices: each segment's affine map (A_s, M_s) (summary walk), a sequential
// composition over segments (compose: prefix of entering states, suffix of state
// gradients, or the part's own summary), then the walk of every segment from its
// entering state. The backward keeps the column's state at every 64th token (a
// global checkpoint), recomputes every 8th token's state into shared memory, then
// each 8-token stretch into registers, and runs the adjoint back through them.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/elem.h"

namespace lasp2::delta::gpu {

using ::lasp2::cuda::Elem;  // input element type, shared with the scalar-decay kernels

#ifdef __CUDACC__
#define LASP2_DELTA_HD __host__ __device__
#else
#define LASP2_DELTA_HD
#endif

constexpr int kCheckpoint = 64;  // tokens between global state checkpoints (backward)
constexpr int kStretch = 8;      // tokens recomputed into registers at a time (backward)
constexpr int kMaxDim = 128;     // d_k supported by the kernels (d_v: any)

// A [B, T, H, D] view: element strides, last dimension contiguous.
struct View {
  const void* ptr = nullptr;
  int64_t sb = 0, st = 0, sh = 0;
};

// One part of one problem, as the kernels read it.
struct Problem {
  int batch = 0, heads = 0, dk = 0, dv = 0;
  int64_t seqlen = 0;  // local tokens (row index of [B, T, H] gate arrays)
  int64_t begin = 0;   // first token of the part
  int64_t n = 0;       // tokens in the part
  Elem elem = Elem::kF32;
  View q, k, v;
  const float* g = nullptr;  // log gates: [B, T, H] or [B, T, H, dk] (per_key)
  int64_t gsb = 0, gst = 0, gsh = 0;
  int per_key = 0;
  const float* beta = nullptr;
  int64_t bsb = 0, bst = 0, bsh = 0;
  float scale = 1.f;
  const uint8_t* doc_start = nullptr;  // nullable
  const int32_t* doc_id = nullptr;     // nullable: doc = b
  int64_t doc_sb = 0;
  const float* doc_initial = nullptr;  // [docs, H, dk, dv], nullable (zero)
  // Segments (grid z of the walks): segment s covers part tokens
  // [s * seg_len, min(n, (s + 1) * seg_len)); seg_len is a multiple of 64.
  int64_t seg_len = 0;
  int nseg = 1;
  // q and k rows load in 16-byte pieces: 16-byte aligned, strides and dk multiples of
  // 16 bytes' worth of elements.
  int vec = 0;
  LASP2_DELTA_HD int64_t bh() const { return static_cast<int64_t>(batch) * heads; }
  LASP2_DELTA_HD int64_t checkpoints() const { return (n + kCheckpoint - 1) / kCheckpoint; }
};

// Forward walk: o (nullable) over each segment with `entering` ([nseg][bh][dk][dv],
// nullable) entering it; ckpt (nullable) receives the state before every 64th token
// ([bh][checkpoint][dv][dk], column-major per (b, h)).
struct ForwardOut {
  const float* entering = nullptr;
  void* o = nullptr;
  int64_t osb = 0, ost = 0, osh = 0;
  float* ckpt = nullptr;
};
void launch_forward(const Problem& p, const ForwardOut& out, cudaStream_t s);

// Segment summaries: the columns [A | M] (the first `ncols` of them: dk + dv, or dk
// for A alone) walked from [I | 0] (see delta_backend.h), each output [nseg][bh][..];
// finals (nullable) of the documents begun and ended inside a segment.
struct SummaryOut {
  float *A = nullptr, *M = nullptr, *head_A = nullptr, *head_M = nullptr;
  float* finals = nullptr;
  int ncols = 0;
};
void launch_summary(const Problem& p, const SummaryOut& out, cudaStream_t s);

// firsts[b][seg] = part-relative index of the first document start inside the
// segment, -1 if none (all -1 without documents).
void launch_firsts(const Problem& p, int* firsts, cudaStream_t s);

// Gradient of each segment's entering state from its head's outputs ([nseg][bh][dk][dv]);
// with final_dstate (nullable) the end state of the document ending at the head's end
// also receives its gradient there (unless that is the part's first token).
void launch_entering_dstate(const Problem& p, View dout, const int* firsts,
                            const float* final_dstate, float* out, cudaStream_t s);

// The sequential composition over segments, per (b, h) and 32 columns:
//   kPrefix:  X = init (nullable), for s: seg_out[s] = X; X = A_s X + M_s
//   kSuffix:  X = init (nullable), for s downwards: seg_out[s] = X (nullable);
//             X = E_s + A_s^T X; final_out = X (nullable)
//   kSummary: X = [I | 0]; the part's A, M, head_A, head_M and the finals of documents
//             that end inside the part in another segment than they began
enum class ComposeMode : int { kPrefix = 0, kSuffix = 1, kSummary = 2 };
struct ComposeArgs {
  ComposeMode mode = ComposeMode::kPrefix;
  const float *segA = nullptr, *segM = nullptr, *seg_head_A = nullptr, *seg_head_M = nullptr;
  const float* E = nullptr;
  const int* firsts = nullptr;
  const float* init = nullptr;
  float* seg_out = nullptr;
  float* final_out = nullptr;
  float *A = nullptr, *M = nullptr, *head_A = nullptr, *head_M = nullptr, *finals = nullptr;
};
void launch_compose(const Problem& p, const ComposeArgs& a, cudaStream_t s);

// Segments for a part of n tokens (about one wave of the walk's blocks).
int64_t plan_seg_len(const Problem& p, int sms);

// Backward over the part. `ckpt` from launch_forward (with the same entering state);
// `acc` ([n][bh][3 dk + 1] fp32, zeroed) collects per token the sums over state
// columns of dq, dk, the per-row dg terms and dbeta; launch_finish writes them out.
struct BackwardArgs {
  View dout;
  const float* ckpt = nullptr;
  const float* leaving_dstate = nullptr;  // nullable
  const float* final_dstate = nullptr;    // nullable: documents' end-state gradients
  float* d_initial = nullptr;             // nullable
  float* dentering = nullptr;             // nullable
  void* dv = nullptr;
  int64_t dvsb = 0, dvst = 0, dvsh = 0;
  float* acc = nullptr;
  // Non-null: every 64-token checkpoint interval runs in its own block (grid z), its
  // adjoint starting from chunk_dstate[bh][interval] ([dk][dv], the gradient of the
  // state leaving the interval, from the chunked reverse pass); leaving_dstate unused.
  const float* chunk_dstate = nullptr;
  // Nullable, with chunk_dstate: [batch][checkpoints], the intervals to run (others exit;
  // the chunked documents' backward, delta_chunk_docs.h, reruns those with a document start).
  const int* flags = nullptr;
};
void launch_backward(const Problem& p, const BackwardArgs& a, cudaStream_t s);
int backward_smem_bytes(int dk);

struct FinishArgs {
  const float* acc = nullptr;
  void* dq = nullptr;
  int64_t dqsb = 0, dqst = 0, dqsh = 0;
  void* dk = nullptr;
  int64_t dksb = 0, dkst = 0, dksh = 0;
  float* dg = nullptr;     // nullable: [B, T, H] or [B, T, H, dk], contiguous
  float* dbeta = nullptr;  // nullable: [B, T, H], contiguous
  const int* flags = nullptr;  // nullable: [batch][checkpoints], the intervals whose tokens to write
};
void launch_finish(const Problem& p, const FinishArgs& a, cudaStream_t s);

// out = A x + y (y nullable) and out += A^T x, per (b, h); out may alias x or y.
void launch_apply_map(const float* A, const float* x, const float* y, int64_t bh, int dk, int dv,
                      bool transposed_add, float* out, cudaStream_t s);
void launch_add(float* dst, const float* src, int64_t count, cudaStream_t s);

// Throws lasp2::Error naming `what` if the last launch failed.
void check_launch(const char* what);

}  // namespace lasp2::delta::gpu
