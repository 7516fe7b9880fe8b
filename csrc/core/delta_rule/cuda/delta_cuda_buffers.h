// The CUDA delta-rule backend's device buffers: one allocation cut into named buffers
// (Scratch), a segmented walk's maps and states, and what a forward keeps for its backward
// (ForwardKept for GDN, KdaForwardKept) or a backward's prep and rprep outputs
// (ChunkBackwardPrep). Layouts only: delta_cuda_backend.cpp fills and reads them.
#pragma once

#include <cstdint>
#include <initializer_list>

#include "cuda/scratch.h"
#include "delta_rule/cuda/delta_chunk.h"
#include "delta_rule/cuda/kda_chunk.h"
#include "lasp2/kept_part_work.h"
#include "lasp2/scratch_allocator.h"

namespace lasp2::delta::cuda_buffers {

// One allocation (cuda::DeviceBlock) of `floats` fp32 elements per buffer, each on a
// 256-byte boundary; buffer i is scratch[i] (null where its size is 0).
class Scratch {
 public:
  Scratch(std::initializer_list<int64_t> floats, const ScratchAllocator* allocator,
          cudaStream_t stream)
      : block_(total_bytes(floats), allocator, stream) {
    char* p = block_.data();
    if (p == nullptr) return;
    for (int64_t f : floats) {
      pointers_[count_++] = f > 0 ? reinterpret_cast<float*>(p) : nullptr;
      p += cuda::aligned_bytes(f);
    }
  }
  float* operator[](int i) const { return pointers_[i]; }

 private:
  static int64_t total_bytes(std::initializer_list<int64_t> floats) {
    int64_t bytes = 0;
    for (int64_t f : floats) bytes += cuda::aligned_bytes(f);
    return bytes;
  }
  cuda::DeviceBlock block_;
  float* pointers_[8] = {};
  int count_ = 0;
};

// The per-segment maps, states and document starts of a segmented walk.
struct SegmentBuffers {
  float *A = nullptr, *M = nullptr, *head_A = nullptr, *head_M = nullptr, *states = nullptr;
  int* firsts = nullptr;
  SegmentBuffers(const gpu::Problem& g, const ScratchAllocator* allocator, cudaStream_t s)
      : scratch_({g.nseg * g.bh() * g.dk * g.dk, g.nseg * g.bh() * g.dk * g.dv,
                  g.nseg * g.bh() * g.dk * g.dk, g.nseg * g.bh() * g.dk * g.dv,
                  g.nseg * g.bh() * g.dk * g.dv, static_cast<int64_t>(g.batch) * g.nseg},
                 allocator, s) {
    A = scratch_[0];
    M = scratch_[1];
    head_A = scratch_[2];
    head_M = scratch_[3];
    states = scratch_[4];
    firsts = reinterpret_cast<int*>(scratch_[5]);
  }

 private:
  Scratch scratch_;
};

// Rows of the chunked kernels' per-token scratch: (b, h) x whole chunks.
inline int64_t chunk_rows(const gpu::Problem& g) { return g.bh() * gpu::chunk_count(g) * gpu::kChunkTokens; }

// One part's forward-kept buffer: w, meta, T, v_new, the 16-bit chunk states, back to
// back (each a multiple of 64 floats, so every piece starts 256-byte aligned).
struct ForwardKept {
  float *w = nullptr, *meta = nullptr, *t = nullptr, *v_new = nullptr, *states = nullptr;

  static int64_t floats(int64_t bh, int64_t chunks, int64_t dk, int64_t dv) {
    const int64_t rows = bh * chunks * gpu::kChunkTokens;
    return rows * dk / 2 + 2 * rows + rows * gpu::kChunkTokens / 2 + rows * dv / 2 + bh * chunks * dk * dv / 2;
  }
  ForwardKept(const gpu::Problem& g, const float* base) {
    const int64_t rows = g.bh() * gpu::chunk_count(g) * gpu::kChunkTokens;
    float* p = const_cast<float*>(base);  // written by forward_keeping, read by the backward
    w = p;
    meta = w + rows * g.dk / 2;
    t = meta + 2 * rows;
    v_new = t + rows * gpu::kChunkTokens / 2;
    states = v_new + rows * g.dv / 2;
  }
};

// One KDA part's forward-kept buffer: what the KDA backward reads of prep (w, qg, kd,
// P, eL, T: KdaPrep without u) and of the state pass (v_new, the 16-bit chunk states),
// back to back; each piece a multiple of 64 floats (rows are whole chunks, d in {64, 128}),
// so every one starts 256-byte aligned.
struct KdaForwardKept {
  gpu::KdaPrep prep;
  void* v_new = nullptr;
  void* states = nullptr;

  // chunks: bh * chunk count. 16-bit w, qg, kd, v_new ([rows][d]), P and T ([64][64] a
  // chunk) and chunk states ([dk][dv] a chunk); fp32 eL ([dk] a chunk).
  static int64_t floats(int64_t bh, int64_t chunks, int64_t dk, int64_t dv) {
    const int64_t c = bh * chunks, rows = c * gpu::kChunkTokens;
    return 3 * rows * dk / 2 + 2 * c * gpu::kChunkTokens * gpu::kChunkTokens / 2 + c * dk + rows * dv / 2 +
           c * dk * dv / 2;
  }
  KdaForwardKept(const gpu::Problem& g, const float* base) {
    const gpu::KdaPrepSizes z = gpu::kda_prep_sizes(g);
    float* p = const_cast<float*>(base);  // written by forward_keeping, read by the backward
    prep.w = p;
    prep.qg = p += z.rows_half;
    prep.kd = p += z.rows_half;
    prep.p = p += z.rows_half;
    prep.t = p += z.p_half;
    prep.eL = p += z.p_half;
    v_new = p += z.eL;
    states = p + chunk_rows(g) * g.dv / 2;
  }
};

// The backward's per-chunk inputs from prep (w, u, meta and T) and rprep (r). r goes
// in place of u unless `separate_r` (then the state pass can still read u after rprep:
// what entering_dstate keeps for backward).
class ChunkBackwardPrep final : public KeptPartWork {
 public:
  ChunkBackwardPrep(const gpu::Problem& g, bool separate_r, const ScratchAllocator* allocator, cudaStream_t s)
      : scratch_({chunk_rows(g) * g.dk / 2, chunk_rows(g) * g.dk / 2, 2 * chunk_rows(g),
                  g.bh() * gpu::chunk_count(g) * gpu::kChunkTokens * gpu::kChunkTokens / 2,
                  separate_r ? chunk_rows(g) * g.dk / 2 : 0},
                 allocator, s) {
    prep = {scratch_[0], scratch_[1], scratch_[2]};
    prep.t = scratch_[3];
    reverse = prep;
    if (separate_r) reverse.u = scratch_[4];
  }
  // The forward's prep and state pass from `kept` (forward_keeping): only r is allocated.
  ChunkBackwardPrep(const gpu::Problem& g, const ForwardKept& kept, const ScratchAllocator* allocator,
                    cudaStream_t s)
      : scratch_({chunk_rows(g) * g.dk / 2}, allocator, s) {
    prep = {kept.w, nullptr, kept.meta};
    prep.t = kept.t;
    reverse = prep;
    reverse.u = scratch_[0];
    v_new = kept.v_new;
    states = kept.states;
  }
  gpu::ChunkPrep prep;     // u in .u
  gpu::ChunkPrep reverse;  // r in .u
  // Non-null: the forward's state pass wrote them (nothing to run again).
  const void* v_new = nullptr;
  const void* states = nullptr;

 private:
  Scratch scratch_;
};

}  // namespace lasp2::delta::cuda_buffers
