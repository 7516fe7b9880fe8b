// Kernels of delta_chunk_docs.h: one block of 128 threads per (chunk, b, h), thread j
// owning column j of the head's d columns. Only chunks in which a document begins (prep,
// the output's addition) or ends (finals) do more than copy v's rows or return: the
// products are plain fp32 loops over at most 64 tokens, off the common path (packed
// documents without states never launch these).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <string>
#include <type_traits>

#include "cuda/device_utils.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"
#include "delta_rule/cuda/delta_chunk_docs.h"
#include "delta_rule/cuda/delta_documents.cuh"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

using lasp2::cuda::from_float;
using lasp2::cuda::to_float;

constexpr int CH = kChunkTokens;
constexpr int NTH = 128;

struct Pos {
  int c, b, h, nvalid;
  int64_t bh, t0, row0;  // row0: the chunk's first row of [bh][nchunks * 64] scratch
};
__device__ __forceinline__ Pos pos_of(const Problem& p) {
  Pos q;
  q.c = blockIdx.x;
  q.bh = blockIdx.y;
  q.b = static_cast<int>(q.bh / p.heads);
  q.h = static_cast<int>(q.bh % p.heads);
  q.t0 = p.begin + static_cast<int64_t>(q.c) * CH;
  const int64_t left = p.n - static_cast<int64_t>(q.c) * CH;
  q.nvalid = left < CH ? static_cast<int>(left) : CH;
  q.row0 = q.bh * chunk_count(p) * CH + static_cast<int64_t>(q.c) * CH;
  return q;
}
template <typename T>
__device__ __forceinline__ const T* row_at(const View& v, int b, int64_t t, int h) {
  return static_cast<const T*>(v.ptr) + b * v.sb + t * v.st + h * v.sh;
}

// f and idx of the chunk's tokens (delta_chunk_docs.h) into global scratch, then V' rows.
template <typename T, int D>
__global__ void __launch_bounds__(NTH) doc_prep_kernel(Problem p, ChunkDocs d) {
  __shared__ float gs[CH], f[CH];
  __shared__ int starts[CH], idx[CH];
  __shared__ int any;
  __shared__ float ks[CH][D];
  const Pos q = pos_of(p);
  const int tid = threadIdx.x;
  if (tid < CH) {
    const int64_t t = q.t0 + tid;
    const bool valid = tid < q.nvalid;
    gs[tid] = valid ? p.g[q.b * p.gsb + t * p.gst + q.h * p.gsh] : 0.f;
    starts[tid] = valid && p.doc_start[q.b * p.doc_sb + t] != 0
                      ? static_cast<int>(doc_of(p, q.b, t) * p.heads + q.h)
                      : -1;
  }
  __syncthreads();
  if (tid == 0) {
    // in token order: a document start sets its state, each gate (its first token's too)
    // decays it, a -inf gate (or underflow) ends it; documents begun before the chunk
    // are the state pass's
    int cur = -1, seen = 0;
    float lsum = 0.f;
    for (int x = 0; x < CH; ++x) {
      float fx = 0.f;
      if (x < q.nvalid) {
        if (starts[x] >= 0) {
          cur = starts[x];
          lsum = 0.f;
        }
        if (cur >= 0) {
          lsum += gs[x];
          fx = expf(lsum);
          if (!(fx > 0.f)) cur = -1;
        }
      }
      f[x] = fx;
      idx[x] = fx > 0.f ? cur : -1;
      seen |= fx > 0.f ? 1 : 0;
    }
    any = seen;
  }
  __syncthreads();
  if (tid < CH) {
    d.f[q.row0 + tid] = f[tid];
    d.idx[q.row0 + tid] = idx[tid];
  }
  if (any) {
    for (int e = tid; e < q.nvalid * D; e += NTH) ks[e / D][e % D] = to_float<T>(row_at<T>(p.k, q.b, q.t0 + e / D, q.h)[e % D]);
    __syncthreads();
  }
  if (tid >= D) return;
  T* vout = static_cast<T*>(d.v);
  for (int x = 0; x < q.nvalid; ++x) {
    const int64_t t = q.t0 + x;
    float v = to_float<T>(row_at<T>(p.v, q.b, t, q.h)[tid]);
    if (f[x] > 0.f) {
      const float* H = d.initial + static_cast<int64_t>(idx[x]) * D * D + tid;
      float acc = 0.f;
#pragma unroll 8
      for (int i = 0; i < D; ++i) acc += ks[x][i] * H[i * D];
      v -= f[x] * acc;
    }
    vout[((q.b * p.seqlen + t) * p.heads + q.h) * D + tid] = from_float<T>(v);
  }
}

// o_x += scale f_x q_x . H for the tokens of documents begun inside the chunk.
template <typename T, int D>
__global__ void __launch_bounds__(NTH) doc_output_kernel(Problem p, ChunkDocs d, ForwardOut out) {
  __shared__ float f[CH];
  __shared__ int idx[CH];
  __shared__ int any;
  __shared__ float qs[CH][D];
  const Pos q = pos_of(p);
  const int tid = threadIdx.x;
  if (tid == 0) any = 0;
  __syncthreads();
  if (tid < CH) {
    f[tid] = d.f[q.row0 + tid];
    idx[tid] = d.idx[q.row0 + tid];
    if (f[tid] > 0.f) any = 1;
  }
  __syncthreads();
  if (!any) return;
  for (int e = tid; e < q.nvalid * D; e += NTH) qs[e / D][e % D] = to_float<T>(row_at<T>(p.q, q.b, q.t0 + e / D, q.h)[e % D]);
  __syncthreads();
  if (tid >= D) return;
  for (int x = 0; x < q.nvalid; ++x) {
    if (!(f[x] > 0.f)) continue;
    const float* H = d.initial + static_cast<int64_t>(idx[x]) * D * D + tid;
    float acc = 0.f;
#pragma unroll 8
    for (int i = 0; i < D; ++i) acc += qs[x][i] * H[i * D];
    T* o = static_cast<T*>(out.o) + q.b * out.osb + (q.t0 + x) * out.ost + q.h * out.osh + tid;
    *o = from_float<T>(to_float<T>(*o) + p.scale * f[x] * acc);
  }
}

// The end states of documents whose last token lies in the chunk (delta_chunk_docs.h).
template <typename T, int D>
__global__ void __launch_bounds__(NTH) doc_finals_kernel(Problem p, ChunkDocs d, ChunkDocFinals a) {
  __shared__ T ks[CH][D], vs[CH][D];
  __shared__ float G[CH], sg[CH], wy[CH];
  __shared__ int ends[CH];
  __shared__ int any;
  const Pos q = pos_of(p);
  const int tid = threadIdx.x;
  const int first = a.firsts[q.b];
  if (first < 0) return;
  if (tid == 0) any = 0;
  __syncthreads();
  if (tid < CH) {
    const int64_t e = static_cast<int64_t>(q.c) * CH + tid;  // part-relative
    // the token after e starts a document and a document of the part starts at or before e
    const bool end = tid < q.nvalid && e + 1 < p.n && p.doc_start[q.b * p.doc_sb + p.begin + e + 1] != 0 && first <= e;
    ends[tid] = end ? 1 : 0;
    if (end) any = 1;
    G[tid] = a.meta[2 * (q.row0 + tid)];
    sg[tid] = a.meta[2 * (q.row0 + tid) + 1];
  }
  __syncthreads();
  if (!any) return;
  const T* vn = static_cast<const T*>(a.v_new) + q.row0 * D;
  for (int e = tid; e < CH * D; e += NTH) {
    const int x = e / D, i = e % D;
    ks[x][i] = x < q.nvalid ? row_at<T>(p.k, q.b, q.t0 + x, q.h)[i] : from_float<T>(0.f);
    vs[x][i] = vn[e];
  }
  __syncthreads();
  const int64_t se = static_cast<int64_t>(D) * D;
  const T* Sc = static_cast<const T*>(a.states) + (q.bh * chunk_count(p) + q.c) * se;
  for (int xe = 0; xe < q.nvalid; ++xe) {
    if (!ends[xe]) continue;  // the same for every thread
    if (tid < CH) wy[tid] = tid <= xe && sg[tid] == sg[xe] ? expf(G[xe] - G[tid]) : 0.f;
    __syncthreads();
    if (tid < D) {
      const bool seg0 = sg[xe] == 0.f;  // the segment entered the chunk: S_c carries it
      const float ge = expf(G[xe]);
      const float fe = d.f != nullptr ? d.f[q.row0 + xe] : 0.f;
      const float* H = fe > 0.f ? d.initial + static_cast<int64_t>(d.idx[q.row0 + xe]) * se : nullptr;
      float* dst = a.finals + (doc_of(p, q.b, q.t0 + xe) * p.heads + q.h) * se;
      for (int i = 0; i < D; ++i) {
        float acc = seg0 ? ge * to_float<T>(Sc[i * D + tid]) : H != nullptr ? fe * H[i * D + tid] : 0.f;
        for (int y = 0; y <= xe; ++y) acc += wy[y] * to_float<T>(ks[y][i]) * to_float<T>(vs[y][tid]);
        dst[i * D + tid] = acc;
      }
    }
    __syncthreads();  // wy is rewritten for the next end
  }
}

// One thread per (b, h, chunk): the chunk's first document start, the log gates before it.
__global__ void __launch_bounds__(NTH) doc_ends_kernel(Problem p, ChunkDocEnds a) {
  const int64_t nck = chunk_count(p);
  const int64_t i = static_cast<int64_t>(blockIdx.x) * NTH + threadIdx.x;
  if (i >= p.bh() * nck) return;
  const int64_t bh = i / nck;
  const int c = static_cast<int>(i % nck);
  const int b = static_cast<int>(bh / p.heads), h = static_cast<int>(bh % p.heads);
  const int64_t t0 = p.begin + static_cast<int64_t>(c) * CH, left = p.n - static_cast<int64_t>(c) * CH;
  const int nvalid = left < CH ? static_cast<int>(left) : CH;
  int xb = -1;
  bool cut = false;  // a -inf gate (a segment start) before the first document start
  float gsum = 0.f;
  for (int x = 0; x < nvalid; ++x) {
    const int64_t t = t0 + x;
    if (p.doc_start[b * p.doc_sb + t] != 0) {
      xb = x;
      break;
    }
    const float g = p.g[b * p.gsb + t * p.gst + h * p.gsh];
    if (g == -INFINITY) cut = true;
    if (!cut) gsum += g;
  }
  if (h == 0) a.flags[b * nck + c] = xb >= 0 ? 1 : 0;
  const bool inject = a.final_dstate != nullptr && xb >= 0 && t0 + xb > p.begin && !cut;
  a.end_idx[i] = inject ? static_cast<int>(doc_of(p, b, t0 + xb - 1) * p.heads + h) : -1;
  a.end_g[i] = inject ? gsum : 0.f;
}

template <typename T>
__global__ void __launch_bounds__(256) dh32_kernel(Problem p, const T* dh, const int* flags, float* out) {
  const int c = blockIdx.x;
  const int64_t bh = blockIdx.y, nck = chunk_count(p);
  if (flags[(bh / p.heads) * nck + c] == 0) return;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv, at = (bh * nck + c) * se;
  for (int64_t e = threadIdx.x; e < se; e += 256) out[at + e] = to_float<T>(dh[at + e]);
}

constexpr const char* kWho = "lasp2 (CUDA delta rule, chunked documents)";

void check(cudaError_t e, const char* what) { chunk_check(e, kWho, what); }

// Calls f(T{}, integral_constant D) for p (16-bit inputs, d_k = d_v = 64 or 128).
template <typename F>
void dispatch(const Problem& p, F&& f) {
  chunk_dispatch<true>(p, kWho, f);
}

dim3 grid_of(const Problem& p) { return dim3(static_cast<unsigned>(chunk_count(p)), static_cast<unsigned>(p.bh())); }

}  // namespace

void launch_chunk_doc_prep(const Problem& p, const ChunkDocs& d, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  if (p.doc_start == nullptr || d.initial == nullptr) ::lasp2::fail("lasp2 (CUDA delta rule, chunked documents): prep needs documents and their initial states");
  dispatch(p, [&](auto tag, auto dim) {
    doc_prep_kernel<decltype(tag), decltype(dim)::value><<<grid_of(p), NTH, 0, s>>>(p, d);
  });
  check(cudaGetLastError(), "prep kernel");
}

void launch_chunk_doc_output(const Problem& p, const ChunkDocs& d, const ForwardOut& out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto dim) {
    doc_output_kernel<decltype(tag), decltype(dim)::value><<<grid_of(p), NTH, 0, s>>>(p, d, out);
  });
  check(cudaGetLastError(), "output kernel");
}

void launch_chunk_doc_finals(const Problem& p, const ChunkDocs& d, const ChunkDocFinals& a, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0 || a.finals == nullptr) return;
  if (p.doc_start == nullptr) return;  // rows: no document ends inside a part
  dispatch(p, [&](auto tag, auto dim) {
    doc_finals_kernel<decltype(tag), decltype(dim)::value><<<grid_of(p), NTH, 0, s>>>(p, d, a);
  });
  check(cudaGetLastError(), "finals kernel");
}

void launch_chunk_doc_ends(const Problem& p, const ChunkDocEnds& e, cudaStream_t s) {
  const int64_t n = chunk_count(p) * p.bh();
  if (n == 0) return;
  if (p.doc_start == nullptr) ::lasp2::fail("lasp2 (CUDA delta rule, chunked documents): ends need documents");
  doc_ends_kernel<<<static_cast<unsigned>((n + NTH - 1) / NTH), NTH, 0, s>>>(p, e);
  check(cudaGetLastError(), "ends kernel");
}

void launch_chunk_doc_dh32(const Problem& p, const void* dh, const int* flags, float* out, cudaStream_t s) {
  if (chunk_count(p) == 0 || p.bh() == 0) return;
  dispatch(p, [&](auto tag, auto) {
    using T = decltype(tag);
    dh32_kernel<T><<<grid_of(p), 256, 0, s>>>(p, static_cast<const T*>(dh), flags, out);
  });
  check(cudaGetLastError(), "dh32 kernel");
}

}  // namespace lasp2::delta::gpu
