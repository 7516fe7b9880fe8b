// The small kernels: per-token decay bookkeeping (meta), the scan over segment
// states, the dg fix-up across segments, and the LASP-2 combines of gathered
// per-part states (sizes independent of the sequence length).
#include <algorithm>
#include <cmath>
#include <string>

#include "device_utils.cuh"
#include "lasp2/types.h"
#include "pdl.cuh"
#include "segment_scan.h"

namespace lasp2::cuda {

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) {
    fail(std::string("lasp2 (CUDA): launching ") + what + " failed: " + cudaGetErrorString(e));
  }
}

namespace {

// One chunk's meta (and weights) from its log decays gv and document flags dv of
// tokens 2 lane, 2 lane + 1; adds the chunk's total log decay and starts to the
// warp's running sums.
__device__ __forceinline__ void meta_chunk(const MetaArgs& a, int64_t bh, int c, int lane,
                                           const float gv[2], const int dv[2], float& total,
                                           int& docs) {
  const Geom& g = a.g;
  // Inclusive scan over the 64 tokens: pair sums, then across lanes.
  float gs = gv[0] + gv[1];
  int ds = dv[0] + dv[1];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float gu = __shfl_up_sync(0xffffffffu, gs, o);
    const int du = __shfl_up_sync(0xffffffffu, ds, o);
    if (lane >= o) {
      gs += gu;
      ds += du;
    }
  }
  const float gex = gs - (gv[0] + gv[1]);
  const int dex = ds - (dv[0] + dv[1]);
  float4 out;
  out.x = gex + gv[0];
  out.y = static_cast<float>(dex + dv[0]);
  out.z = gs;
  out.w = static_cast<float>(ds);
  reinterpret_cast<float4*>(a.meta)[((bh * g.nchunks + c) * kChunk + 2 * lane) / 2] = out;
  if (a.wmeta != nullptr) {
    // the same expressions the kernels evaluate from (G, s), so the same values
    const float Gl = __shfl_sync(0xffffffffu, out.z, 31);
    const float sl = __shfl_sync(0xffffffffu, out.w, 31);
    float4 w;
    w.x = out.y == 0.f ? __expf(out.x) : 0.f;
    w.y = out.y == sl ? __expf(Gl - out.x) : 0.f;
    w.z = out.w == 0.f ? __expf(out.z) : 0.f;
    w.w = out.w == sl ? __expf(Gl - out.z) : 0.f;
    reinterpret_cast<float4*>(a.wmeta)[((bh * g.nchunks + c) * kChunk + 2 * lane) / 2] = w;
  }
  total += __shfl_sync(0xffffffffu, gs, 31);
  docs += __shfl_sync(0xffffffffu, ds, 31);
}

// One block of kMetaWarps warps per (segment, bh); warp w handles chunks w, w + 32,
// ... of the segment; lane l handles tokens 2l, 2l + 1 of a chunk. A warp first loads
// the log decays of kMetaBatch of its chunks, then computes them one by one, so that
// the loads of a batch are in flight together. (H200, 64K tokens x 16 heads: 17-18 us
// with 8 warps and one load round trip per chunk, 16.6 with batched loads, 14.6 with
// 32 warps; what remains is the gate reads, one float per 64-byte [B, T, H] row, and
// the 16 MiB of meta and weights written.)
constexpr int kMetaWarps = 32;
constexpr int kMetaBatch = 4;

__global__ void __launch_bounds__(32 * kMetaWarps) meta_kernel(MetaArgs a) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const Geom& g = a.g;
  // the place only, not segment_block(g): with it, nvcc ordered the chunk range's
  // arithmetic differently (other PTX)
  const auto [seg, bh, b, h] = segment_place(g);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c0 = seg * g.seg_chunks;
  const int c1 = min(g.nchunks, c0 + g.seg_chunks);
  float total = 0.f;
  int docs = 0;
  for (int cb = c0 + warp; cb < c1; cb += kMetaWarps * kMetaBatch) {
    float gv[kMetaBatch][2];
    int dv[kMetaBatch][2];
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int x = (cb + kMetaWarps * u) * kChunk + 2 * lane + e;
        const bool valid = cb + kMetaWarps * u < c1 && x < g.n;
        const int64_t t = g.begin + x;
        float gl = 0.f;
        if (valid) {
          if (a.mode == 1) gl = a.log_decay[h];
          else if (a.mode == 2) gl = a.gate[b * a.gsb + t * a.gst + h * a.gsh];
        }
        // A log decay of -inf forgets the state (exp(g) = 0): the same as a document
        // starting at this token, which keeps every G finite (no -inf minus -inf).
        const bool forget = gl == -INFINITY;
        gv[u][e] = forget ? 0.f : gl;
        dv[u][e] = (valid && (forget || (a.doc != nullptr && a.doc[b * a.doc_sb + t] != 0))) ? 1 : 0;
      }
    }
#pragma unroll
    for (int u = 0; u < kMetaBatch; ++u) {
      const int c = cb + kMetaWarps * u;
      if (c < c1) meta_chunk(a, bh, c, lane, gv[u], dv[u], total, docs);
    }
  }
  __shared__ float wt[kMetaWarps];
  __shared__ int wd[kMetaWarps];
  if (lane == 0) {
    wt[warp] = total;
    wd[warp] = docs;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float L = 0.f;
    int d = 0;
    for (int w = 0; w < kMetaWarps; ++w) {
      L += wt[w];
      d += wd[w];
    }
    a.segL[bh * g.nseg + seg] = d > 0 ? -INFINITY : L;
  }
}

// A later piece's state is loaded only where its flag says it walked, once the batch's
// flags arrived (a second round trip per batch, and no bytes for the pieces that did not
// walk: most of them with fixed decays, whose walks end at the floor; session 16, 16 ->
// 14 us a scan at 64K fixed against loading every slot with its flag).
__global__ void __launch_bounds__(256) scan_kernel(float* X, const float* segL, int64_t bh_count, int nseg,
                                                   int64_t elems, bool suffix, bool write_segments,
                                                   float* final_out, float* log_out, StatePieces pieces,
                                                   int last_unread) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const int64_t bh = blockIdx.y;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  const float* L = segL + bh * nseg;
  if (log_out != nullptr && blockIdx.x == 0 && threadIdx.x == 0) {
    double total = 0.0;
    bool blocked = false;
    for (int s = 0; s < nseg; ++s) {
      blocked = blocked || isinf(L[s]);
      total += L[s];
    }
    log_out[bh] = blocked ? -INFINITY : static_cast<float>(total);
  }
  if (e >= elems) return;
  float* x = X + bh * nseg * elems + e;
  const int np = pieces.nsub - 1;  // later pieces per segment
  // segments whose state (and pieces) was computed, in scan order: all but the last one
  // when nothing reads it (segment_scan.h: last_unread)
  const int live = last_unread ? nseg - 1 : nseg;
  float acc = 0.f;  // from zero: an entering state is added later (launch_add_through_segments)
  // batches of 8 segments: the loads of a batch (the states and, 4 at a time, their later
  // pieces' flags, then the walked pieces) are issued before its stores (which the
  // compiler cannot move them past), so they are in flight together; in place, each
  // segment's slot read before it is written
  constexpr int kSegs = 8, kPieces = 4;
  for (int i0 = 0; i0 < nseg; i0 += kSegs) {
    float m[kSegs];
#pragma unroll
    for (int j = 0; j < kSegs; ++j) {
      const int i = i0 + j;
      const int s = suffix ? nseg - 1 - i : i;
      m[j] = i < live ? x[s * elems] : 0.f;
    }
    for (int p0 = 0; p0 < np; p0 += kPieces) {
      float add[kSegs][kPieces], flag[kSegs][kPieces];
#pragma unroll
      for (int j = 0; j < kSegs; ++j) {
        const int i = i0 + j;
        const int64_t slot0 = (bh * nseg + (suffix ? nseg - 1 - i : i)) * np + p0;
#pragma unroll
        for (int u = 0; u < kPieces; ++u) {
          const bool in = i < live && p0 + u < np;
          flag[j][u] = in ? pieces.sub_flags[slot0 + u] : 0.f;
          add[j][u] = flag[j][u] != 0.f ? pieces.sub_out[(slot0 + u) * elems + e] : 0.f;
        }
      }
      // in walk order, walked pieces only (an unwalked slot holds whatever was there)
#pragma unroll
      for (int j = 0; j < kSegs; ++j)
#pragma unroll
        for (int u = 0; u < kPieces; ++u)
          if (flag[j][u] != 0.f) m[j] += add[j][u];
    }
#pragma unroll
    for (int j = 0; j < kSegs; ++j) {
      const int i = i0 + j;
      if (i >= nseg) break;
      const int s = suffix ? nseg - 1 - i : i;
      if (write_segments) x[s * elems] = acc;
      acc = __expf(L[s]) * acc + m[j];  // exp(-inf) = 0: a document start blocks the state
    }
  }
  if (final_out != nullptr) final_out[bh * elems + e] = acc;
}

// dg[t] += dg_offset[bh] + sum of the totals of the segments after t's segment.
__global__ void __launch_bounds__(256) dg_fixup_kernel(Geom g, float* dg, const float* seg_total,
                                                       const float* dg_offset) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const SegmentBlock blk = segment_block(g);
  __shared__ float offset;
  if (threadIdx.x == 0) {
    float o = dg_offset != nullptr ? dg_offset[blk.bh] : 0.f;
    for (int s = g.nseg - 1; s > blk.seg; --s) o += seg_total[blk.bh * g.nseg + s];
    offset = o;
  }
  __syncthreads();
  const int x0 = blk.seg * g.seg_chunks * kChunk;
  const int x1 = min(g.n, x0 + g.seg_chunks * kChunk);
  // batches of 8 tokens per thread: the loads first, so that they are in flight together
  for (int xb = x0 + threadIdx.x; xb < x1; xb += 8 * blockDim.x) {
    float v[8];
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int x = xb + u * blockDim.x;
      v[u] = x < x1 ? dg[bth(g, blk.b, g.begin + x, blk.h)] : 0.f;
    }
#pragma unroll
    for (int u = 0; u < 8; ++u) {
      const int x = xb + u * blockDim.x;
      if (x < x1) dg[bth(g, blk.b, g.begin + x, blk.h)] = v[u] + offset;
    }
  }
}

// The fold over the parts' states: each part's decay exp(L) in float64 once a block (the
// block's (b, h) row), not once a value, and the states loaded kFoldBatch at a time before
// they are folded in, in the same order (the same bits as before). With an exp a value the
// fold was bound by float64 math: 17.6-17.9 us over 15 parts against 3.4-3.8 over none, now
// 10.1 (ncu, H100, H = 16, D = 128: a balanced P = 8 rank at 4K tokens, session 29); the
// batched loads alone, with the exp a value, gained nothing. The fold grows with P.
constexpr int kFoldBatch = 8;

__global__ void __launch_bounds__(256) combine_kernel(PartTable parts, int num_parts,
                                                      const float* log_decays, int target,
                                                      int64_t bh_count, int64_t elems, bool suffix,
                                                      float* out) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const int64_t i = blockIdx.y;
  __shared__ double decay[kMaxParts];
  for (int m = threadIdx.x; m < num_parts; m += blockDim.x)
    decay[m] = exp(static_cast<double>(log_decays[m * bh_count + i]));
  __syncthreads();
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= elems) return;
  // fold order: prefix parts 0 .. target - 1, suffix parts num_parts - 1 down to target + 1
  const int n = suffix ? num_parts - 1 - target : target;
  double acc = 0.0;
  for (int j0 = 0; j0 < n; j0 += kFoldBatch) {
    float v[kFoldBatch];
#pragma unroll
    for (int j = 0; j < kFoldBatch; ++j) {
      const int m = suffix ? num_parts - 1 - (j0 + j) : j0 + j;
      v[j] = j0 + j < n ? parts.p[m][i * elems + e] : 0.f;
    }
#pragma unroll
    for (int j = 0; j < kFoldBatch; ++j) {
      const int m = suffix ? num_parts - 1 - (j0 + j) : j0 + j;
      if (j0 + j < n) acc = decay[m] * acc + v[j];
    }
  }
  out[i * elems + e] = static_cast<float>(acc);
}

__global__ void __launch_bounds__(256) add_through_segments_kernel(const float* X, const float* segL,
                                                                   const float* add, int nseg, int64_t elems,
                                                                   bool suffix, float* out) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const int64_t bh = blockIdx.y;
  const int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (e >= elems) return;
  const float a = add[bh * elems + e];
  const float* L = segL + bh * nseg;
  float lam = 0.f;  // the segments between the part's edge and segment s, in walk order
  for (int i = 0; i < nseg; ++i) {
    const int s = suffix ? nseg - 1 - i : i;
    const int64_t at = (bh * nseg + s) * elems + e;
    out[at] = fmaf(__expf(lam), a, X[at]);  // exp(-inf) = 0: nothing passes a document start
    lam += L[s];
  }
}

__global__ void __launch_bounds__(256) copy_rows_kernel(PartTable rows, int64_t count, float* dst) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const float* src = rows.p[blockIdx.y];
  float* out = dst + blockIdx.y * count;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < count; e += step) {
    out[e] = src != nullptr ? src[e] : 0.f;
  }
}

// One block of kStateDotThreads per (b, h). 1024 threads, not 256 (before session 27): a
// block walks its 16K-value state (D = 128) in a quarter of the dependent steps, the loads of
// four steps in flight at once. Every SP rank but the last runs it once a backward; with 256
// threads it took 34.7 us (ncu, H100, H = 16, 4K tokens a rank), and such a rank's graph
// fwd + bwd at 4K went 0.291 -> 0.266 ms with 1024 (docs/results.md, session 27).
constexpr int kStateDotThreads = 1024;
__global__ void __launch_bounds__(kStateDotThreads) state_dot_kernel(const float* prefix, const float* state,
                                                                     const float* log_decay,
                                                                     const float* dstate, int64_t elems,
                                                                     float* out) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  const int64_t i = blockIdx.x;
  const double a = exp(static_cast<double>(log_decay[i]));
  double s = 0.0;
#pragma unroll 4
  for (int64_t e = threadIdx.x; e < elems; e += kStateDotThreads) {
    const int64_t idx = i * elems + e;
    s += (a * prefix[idx] + state[idx]) * static_cast<double>(dstate[idx]);
  }
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  constexpr int kWarps = kStateDotThreads / 32;
  __shared__ double part[kWarps];
  if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = s;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += part[w];  // a fixed order: the same bits run to run
    out[i] = static_cast<float>(t);
  }
}

dim3 elem_grid(int64_t elems, int64_t bh) {
  return dim3(static_cast<unsigned>((elems + 255) / 256), static_cast<unsigned>(bh));
}

}  // namespace

void launch_meta(const MetaArgs& a, cudaStream_t s) {
  launch_kernel("meta_kernel", meta_kernel, static_cast<unsigned>(a.g.bh() * a.g.nseg), 32 * kMetaWarps,
                0, s, a);
}

void launch_segment_scan(float* X, const float* segL, int64_t bh, int nseg, int64_t elems, bool suffix,
                         bool write_segments, float* final_out, float* log_out, const StatePieces& pieces,
                         bool last_unread, cudaStream_t s) {
  if (last_unread && final_out != nullptr) {
    fail("lasp2 (CUDA): launch_segment_scan: final_out needs the last segment's state");
  }
  launch_kernel("scan_kernel", scan_kernel, elem_grid(elems, bh), 256, 0, s, X, segL, bh, nseg, elems, suffix,
                write_segments, final_out, log_out, pieces, last_unread ? 1 : 0);
}

void launch_dg_fixup(const Geom& g, float* dg, const float* seg_total, const float* dg_offset,
                     cudaStream_t s) {
  launch_kernel("dg_fixup_kernel", dg_fixup_kernel, static_cast<unsigned>(g.bh() * g.nseg), 256, 0, s, g, dg,
                seg_total, dg_offset);
}

void launch_combine(const PartTable& parts, int num_parts, const float* log_decays, int target,
                    int64_t bh, int64_t elems, bool suffix, float* out, cudaStream_t s) {
  launch_kernel("combine_kernel", combine_kernel, elem_grid(elems, bh), 256, 0, s, parts, num_parts,
                log_decays, target, bh, elems, suffix, out);
}

void launch_add_through_segments(const float* X, const float* segL, const float* add, int64_t bh, int nseg,
                                 int64_t elems, bool suffix, float* out, cudaStream_t s) {
  launch_kernel("add_through_segments_kernel", add_through_segments_kernel, elem_grid(elems, bh), 256, 0, s, X, segL,
                add, nseg, elems, suffix, out);
}

void launch_copy_rows(const float* const* rows, int64_t n, int64_t count, float* dst, cudaStream_t s) {
  if (count <= 0) return;
  // a row of a delta-rule map is bh * dk * dk values (1 MiB at H = 16, D = 128): enough
  // blocks to stream it, a grid-stride loop past that
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>((count + 255) / 256, 64));
  for (int64_t r0 = 0; r0 < n; r0 += kMaxParts) {
    const int rn = static_cast<int>(std::min<int64_t>(kMaxParts, n - r0));
    PartTable table{};
    for (int r = 0; r < rn; ++r) table.p[r] = rows[r0 + r];
    launch_kernel("copy_rows_kernel", copy_rows_kernel, dim3(blocks, static_cast<unsigned>(rn)), 256, 0, s, table,
                  count, dst + r0 * count);
  }
}

void launch_state_dot(const float* prefix, const float* state, const float* log_decay,
                      const float* dstate, int64_t bh, int64_t elems, float* out,
                      cudaStream_t s) {
  launch_kernel("state_dot_kernel", state_dot_kernel, static_cast<unsigned>(bh), kStateDotThreads, 0, s, prefix, state,
                log_decay, dstate, elems, out);
}

}  // namespace lasp2::cuda
