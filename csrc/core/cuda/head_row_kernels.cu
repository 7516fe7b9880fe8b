// The per-token small kernels over all heads of a token range: the meta (MetaArgs in
// launch.h) and the dg fix-up. Gates and dg are [B, T, H] fp32, one H-float row per
// token; the kernels per (b, h, segment) in misc_kernels.cu read one float of each
// row (one 32-byte sector and one L1 wavefront per value), these read and write whole
// rows (coalesced). Same arithmetic in the same order, so the same bits: the meta
// through meta_chunk, the segment log decays summed as the per-(b, h) meta kernel
// sums them, the fix-up offsets accumulated as its fix-up does.
#include <algorithm>
#include <cmath>

#include "device_utils.cuh"
#include "meta_chunk.cuh"

namespace lasp2::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kRowWarps = kRowThreads / 32;
// Gates per meta block (8 KiB of shared memory at H = 16): kRowGates / (64 H) chunks.
constexpr int kRowGates = 2048;
constexpr int kMaxMetaHeads = 128;  // one chunk of 128 heads: 33 KiB of shared memory
// misc_kernels.cu's meta kernel sums a segment's chunk totals per warp (warp w: chunks
// w, w + 32, ...), then over its 32 warps in order; seg_decay_kernel repeats that.
constexpr int kMetaSumWays = 32;
// [B, T, H] values per thread (loads in flight together) and per block round
constexpr int kRowBatch = 8;
constexpr int kRowRound = kRowThreads * kRowBatch;  // also the values of one fix-up block
constexpr int kMaxFixupHeads = 1024;

int meta_row_chunks(int heads) { return std::max(1, kRowGates / (kChunk * heads)); }

// One block per (b, K consecutive chunks): first every thread reads gates of the K * 64
// tokens in memory order (consecutive threads: consecutive heads of a token, then the
// next token) into shared memory, transposed to [h][token]; then warp w computes the
// (chunk, head) items w, w + 8, ... with meta_chunk (lane l: tokens 2l, 2l + 1).
__global__ void __launch_bounds__(kRowThreads) meta_rows_kernel(MetaArgs a, int K) {
  extern __shared__ float smem[];
  const Geom& g = a.g;
  const int H = g.heads, b = blockIdx.y, tid = threadIdx.x;
  const int c_first = blockIdx.x * K;
  const int nc = min(K, g.nchunks - c_first);
  const int ntok = nc * kChunk, x0 = c_first * kChunk;
  // per-head stride K * 64 + 1: the stores of one token's row fall on different banks
  const int stride = K * kChunk + 1;
  float* gl_s = smem;                                     // [H][stride]: log decays as read
  int* doc_s = reinterpret_cast<int*>(smem + H * stride);  // [K * 64]: document starts
  const int count = ntok * H;
  for (int i0 = 0; i0 < count; i0 += kRowRound) {
    float v[kRowBatch];
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      const int i = i0 + u * kRowThreads + tid;
      const int xi = i / H, h = i - xi * H;
      float gl = 0.f;
      if (i < count && x0 + xi < g.n) {
        const int64_t t = g.begin + x0 + xi;
        if (a.mode == 1) gl = a.log_decay[h];
        else if (a.mode == 2) gl = a.gate[b * a.gsb + t * a.gst + h * a.gsh];
      }
      v[u] = gl;
    }
#pragma unroll
    for (int u = 0; u < kRowBatch; ++u) {
      const int i = i0 + u * kRowThreads + tid;
      const int xi = i / H, h = i - xi * H;
      if (i < count) gl_s[h * stride + xi] = v[u];
    }
  }
  for (int xi = tid; xi < ntok; xi += kRowThreads) {
    const int x = x0 + xi;
    doc_s[xi] = (x < g.n && a.doc != nullptr && a.doc[b * a.doc_sb + g.begin + x] != 0) ? 1 : 0;
  }
  __syncthreads();
  const int warp = tid >> 5, lane = tid & 31;
  for (int item = warp; item < nc * H; item += kRowWarps) {
    const int c = item / H, h = item - c * H;
    float gv[2];
    int dv[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int xi = c * kChunk + 2 * lane + e;
      const float gl = gl_s[h * stride + xi];
      // as in meta_kernel: a log decay of -inf forgets the state (a document start, G += 0)
      const bool forget = gl == -INFINITY;
      gv[e] = forget ? 0.f : gl;
      dv[e] = (x0 + xi < g.n && (forget || doc_s[xi] != 0)) ? 1 : 0;
    }
    float total = 0.f;  // the segment sums come from seg_decay_kernel
    int docs = 0;
    meta_chunk(a, static_cast<int64_t>(b) * H + h, c_first + c, lane, gv, dv, total, docs);
  }
}

// segL[bh][seg] from the meta: each chunk's total log decay and document count are the
// {G, s} of its last token (padded tokens add 0 and no start). One warp per (bh, seg).
__global__ void __launch_bounds__(kRowThreads) seg_decay_kernel(Geom g, const float* meta,
                                                                float* segL) {
  const int64_t item = (blockIdx.x * static_cast<int64_t>(kRowThreads) + threadIdx.x) >> 5;
  if (item >= static_cast<int64_t>(g.batch) * g.heads * g.nseg) return;  // whole warps
  const int lane = threadIdx.x & 31;
  const int seg = static_cast<int>(item % g.nseg);
  const int64_t bh = item / g.nseg;
  const int c0 = seg * g.seg_chunks, c1 = min(g.nchunks, c0 + g.seg_chunks);
  const float2* last = reinterpret_cast<const float2*>(meta) + bh * g.nchunks * kChunk + kChunk - 1;
  float total = 0.f;
  int docs = 0;
  for (int c = c0 + lane; c < c1; c += kMetaSumWays) {
    const float2 m = last[static_cast<int64_t>(c) * kChunk];
    total += m.x;
    docs += static_cast<int>(m.y);
  }
  float L = 0.f;
  int d = 0;
#pragma unroll
  for (int w = 0; w < kMetaSumWays; ++w) {
    L += __shfl_sync(0xffffffffu, total, w);
    d += __shfl_sync(0xffffffffu, docs, w);
  }
  if (lane == 0) segL[bh * g.nseg + seg] = d > 0 ? -INFINITY : L;
}

// dg[t] += dg_offset[bh] + the totals of the segments after t's. One block per (b,
// segment, piece of kRowRound values): the segment's tokens of batch b are one
// contiguous run of H-float rows.
__global__ void __launch_bounds__(kRowThreads) dg_fixup_rows_kernel(Geom g, float* dg,
                                                                    const float* seg_total,
                                                                    const float* dg_offset,
                                                                    int pieces) {
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

bool meta_rows_fit(const Geom& g) { return g.heads >= 1 && g.heads <= kMaxMetaHeads; }

void launch_meta_rows(const MetaArgs& a, bool seg_decays, cudaStream_t s) {
  const Geom& g = a.g;
  const int K = meta_row_chunks(g.heads);
  const dim3 grid(static_cast<unsigned>((g.nchunks + K - 1) / K), static_cast<unsigned>(g.batch));
  const size_t smem = (static_cast<size_t>(g.heads) * (K * kChunk + 1) + K * kChunk) * sizeof(float);
  meta_rows_kernel<<<grid, kRowThreads, smem, s>>>(a, K);
  check_launch("meta_rows_kernel");
  if (!seg_decays) return;
  const int64_t warps = g.bh() * g.nseg;
  seg_decay_kernel<<<static_cast<unsigned>((warps + kRowWarps - 1) / kRowWarps), kRowThreads, 0,
                     s>>>(g, a.meta, a.segL);
  check_launch("seg_decay_kernel");
}

bool dg_fixup_rows_fit(const Geom& g) {
  const int64_t seg_values = static_cast<int64_t>(g.seg_chunks) * kChunk * g.heads;
  return g.heads >= 1 && g.heads <= kMaxFixupHeads && seg_values <= (int64_t{1} << 30);
}

void launch_dg_fixup_rows(const Geom& g, float* dg, const float* seg_total, const float* dg_offset,
                          cudaStream_t s) {
  const int64_t seg_values = static_cast<int64_t>(std::min(g.n, g.seg_chunks * kChunk)) * g.heads;
  const int pieces = static_cast<int>((seg_values + kRowRound - 1) / kRowRound);
  const dim3 grid(static_cast<unsigned>(g.nseg * pieces), static_cast<unsigned>(g.batch));
  dg_fixup_rows_kernel<<<grid, kRowThreads, g.heads * sizeof(float), s>>>(g, dg, seg_total,
                                                                         dg_offset, pieces);
  check_launch("dg_fixup_rows_kernel");
}

}  // namespace lasp2::cuda
