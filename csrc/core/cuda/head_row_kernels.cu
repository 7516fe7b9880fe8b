// The dg fix-up over all heads of a token range. dg is [B, T, H] fp32, one H-float row
// per token; the fix-up per (b, h, segment) in misc_kernels.cu reads one float of each
// row (one 32-byte sector and one L1 wavefront per value), this one reads and writes
// whole rows (coalesced), accumulating the offsets in the same order, so the same bits.
// (A meta over whole rows was tried too and removed: no gain in fwd + bwd, session 11
// in docs/history/kernels-log.md.)
#include <algorithm>

#include "device_utils.cuh"
#include "pdl.cuh"

namespace lasp2::cuda {
namespace {

constexpr int kRowThreads = 256;
// [B, T, H] values per thread (loads in flight together) and per block round
constexpr int kRowBatch = 8;
constexpr int kRowRound = kRowThreads * kRowBatch;  // also the values of one fix-up block
constexpr int kMaxFixupHeads = 1024;

// dg[t] += dg_offset[bh] + the totals of the segments after t's. One block per (b,
// segment, piece of kRowRound values): the segment's tokens of batch b are one
// contiguous run of H-float rows.
__global__ void __launch_bounds__(kRowThreads) dg_fixup_rows_kernel(Geom g, float* dg,
                                                                    const float* seg_total,
                                                                    const float* dg_offset,
                                                                    int pieces) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  extern __shared__ float offset[];  // [H]
  const int H = g.heads, b = blockIdx.y, tid = threadIdx.x;
  const int seg = blockIdx.x / pieces, piece = blockIdx.x - seg * pieces;
  const int x0 = seg * g.seg_chunks * kChunk;
  const int x1 = min(g.n, x0 + g.seg_chunks * kChunk);
  const int count = (x1 - x0) * H, i0 = piece * kRowRound;
  if (i0 >= count) return;  // the whole block (a short last segment)
  for (int h = tid; h < H; h += kRowThreads) {
    const int64_t bh = static_cast<int64_t>(b) * H + h;
    float o = dg_offset != nullptr ? dg_offset[bh] : 0.f;
    for (int s = g.nseg - 1; s > seg; --s) o += seg_total[bh * g.nseg + s];
    offset[h] = o;
  }
  __syncthreads();
  float* rows = dg + (static_cast<int64_t>(b) * g.seqlen + g.begin + x0) * H;
  float v[kRowBatch];
#pragma unroll
  for (int u = 0; u < kRowBatch; ++u) {
    const int i = i0 + u * kRowThreads + tid;
    v[u] = i < count ? rows[i] : 0.f;
  }
#pragma unroll
  for (int u = 0; u < kRowBatch; ++u) {
    const int i = i0 + u * kRowThreads + tid;
    if (i < count) rows[i] = v[u] + offset[i % H];
  }
}

}  // namespace

bool dg_fixup_rows_fit(const Geom& g) {
  const int64_t seg_values = static_cast<int64_t>(g.seg_chunks) * kChunk * g.heads;
  return g.heads >= 1 && g.heads <= kMaxFixupHeads && seg_values <= (int64_t{1} << 30);
}

void launch_dg_fixup_rows(const Geom& g, float* dg, const float* seg_total, const float* dg_offset,
                          cudaStream_t s) {
  const int64_t seg_values = static_cast<int64_t>(std::min(g.n, g.seg_chunks * kChunk)) * g.heads;
  const int pieces = static_cast<int>((seg_values + kRowRound - 1) / kRowRound);
  const dim3 grid(static_cast<unsigned>(g.nseg * pieces), static_cast<unsigned>(g.batch));
  launch_kernel("dg_fixup_rows_kernel", dg_fixup_rows_kernel, grid, kRowThreads, g.heads * sizeof(float), s,
                g, dg, seg_total, dg_offset, pieces);
}

}  // namespace lasp2::cuda
