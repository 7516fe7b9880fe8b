// The delta-rule CUDA kernels (see delta_launch.h): token-recurrent walks over the
// segments of a part with each state column held by a group of G lanes (R rows per
// lane), the inputs of 64 tokens staged in shared memory at a time, fp32 arithmetic,
// inputs in fp32, fp16 or bf16. The same recurrence as the CPU reference: per token,
// X = D_t S; S = X + beta k (v - X^T k)^T; o = scale S^T q.
// The composition of the walks' segment summaries is delta_compose.cu.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <string>

#include "cuda/device_utils.cuh"
#include "cuda/elem_dispatch.cuh"
#include "cuda/route.h"
#include "delta_rule/cuda/delta_documents.cuh"
#include "delta_rule/cuda/delta_launch.h"
#include "env_knob.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

constexpr int CT = kCheckpoint;  // tokens staged at a time (and between checkpoints)
constexpr int kStretches = kCheckpoint / kStretch;

// ---- element access --------------------------------------------------------------
// fp32 <-> fp32 / fp16 / bf16 conversions: the scalar family's (csrc/core/cuda/device_utils.cuh).
using lasp2::cuda::from_float;
using lasp2::cuda::to_float;
// dispatch_elem: the input dtype's C++ type, as the scalar family's launchers pick it.
using lasp2::cuda::dispatch_elem;

template <typename T>
__device__ __forceinline__ T zero_elem() { return from_float<T>(0.f); }

template <typename T>
__device__ __forceinline__ const T* row_of(const View& v, int b, int64_t t, int h) {
  return static_cast<const T*>(v.ptr) + b * v.sb + t * v.st + h * v.sh;
}

// Sum over the G lanes of a group (G a power of two <= 32), in every lane of it.
template <int G>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
  for (int o = G / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
// Sum over the groups of a warp (lanes with the same position in their group).
template <int G>
__device__ __forceinline__ float across_groups(float v) {
#pragma unroll
  for (int o = G; o < 32; o <<= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// ---- the stage: inputs of CT tokens in shared memory ---------------------------------
// q, k (input dtype, DKP per token, zero past dk), decays exp(g) (DKP per token with
// per-key gates, one otherwise), beta, two per-column arrays (CW columns: v, dO or a
// staged output), document starts.
struct StageSizes {
  int q, k, dec, beta, c0, c1, start, total;
};
__host__ __device__ inline int align16(int bytes) { return (bytes + 15) / 16 * 16; }
__host__ __device__ inline StageSizes stage_sizes(int esize, int DKP, int CW, bool per_key,
                                                  bool with_q) {
  StageSizes s;
  s.q = with_q ? CT * DKP * esize : 0;
  s.k = CT * DKP * esize;
  s.dec = align16((per_key ? CT * DKP : CT) * 4);
  s.beta = CT * 4;
  s.c0 = CT * CW * 4;
  s.c1 = CT * CW * 4;
  s.start = align16(CT);
  s.total = s.q + s.k + s.dec + s.beta + s.c0 + s.c1 + s.start;
  return s;
}

template <typename T>
struct Stage {
  T* q;
  T* k;
  float* dec;
  float* beta;
  float* c0;
  float* c1;
  uint8_t* start;
  unsigned char* end;  // first byte after the stage
};
template <typename T>
__device__ __forceinline__ Stage<T> carve(unsigned char* smem, int DKP, int CW, bool per_key,
                                          bool with_q) {
  const StageSizes s = stage_sizes(sizeof(T), DKP, CW, per_key, with_q);
  Stage<T> st;
  unsigned char* p = smem;
  st.q = reinterpret_cast<T*>(p);
  p += s.q;
  st.k = reinterpret_cast<T*>(p);
  p += s.k;
  st.dec = reinterpret_cast<float*>(p);
  p += s.dec;
  st.beta = reinterpret_cast<float*>(p);
  p += s.beta;
  st.c0 = reinterpret_cast<float*>(p);
  p += s.c0;
  st.c1 = reinterpret_cast<float*>(p);
  p += s.c1;
  st.start = p;
  p += s.start;
  st.end = p;
  return st;
}

// A column source for the stage: `view` columns [col0, col0 + CW) of `ncols`
// (outside: zero).
struct ColSource {
  const View* view = nullptr;
  int col0 = 0, ncols = 0;
};

// Every thread of the block (NT threads): tokens [x0, x0 + len) of the part
// (part-relative). Each thread issues all its loads before it stores any, so a chunk
// costs about one memory latency; q and k rows move in 16-byte pieces where the
// views allow it (Problem::vec).
template <typename T, int DKP, int CW, int NT>
__device__ void stage_load(const Problem& p, const Stage<T>& st, int b, int h, int64_t x0, int len,
                           bool with_q, ColSource c0, ColSource c1) {
  const int tid = threadIdx.x;
  const int64_t t0 = p.begin + x0;
  if (p.vec) {
    constexpr int PER = 16 / sizeof(T), CPR = DKP / PER, ITEMS = (CT * CPR + NT - 1) / NT;
    uint4 kb[ITEMS], qb[ITEMS];
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int e = tid + it * NT, x = e / CPR, i0 = (e % CPR) * PER;
      const bool in = e < len * CPR && i0 < p.dk;
      kb[it] = in ? *reinterpret_cast<const uint4*>(row_of<T>(p.k, b, t0 + x, h) + i0) : uint4{0, 0, 0, 0};
      qb[it] = (in && with_q) ? *reinterpret_cast<const uint4*>(row_of<T>(p.q, b, t0 + x, h) + i0)
                              : uint4{0, 0, 0, 0};
    }
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int e = tid + it * NT;
      if (e < len * CPR) {
        reinterpret_cast<uint4*>(st.k)[e] = kb[it];
        if (with_q) reinterpret_cast<uint4*>(st.q)[e] = qb[it];
      }
    }
  } else {
    for (int e = tid; e < len * DKP; e += NT) {
      const int x = e / DKP, i = e % DKP;
      const bool in = i < p.dk;
      st.k[e] = in ? row_of<T>(p.k, b, t0 + x, h)[i] : zero_elem<T>();
      if (with_q) st.q[e] = in ? row_of<T>(p.q, b, t0 + x, h)[i] : zero_elem<T>();
    }
  }
  if (p.per_key) {
    for (int e = tid; e < len * DKP; e += NT) {
      const int x = e / DKP, i = e % DKP;
      st.dec[e] = i < p.dk ? expf(p.g[b * p.gsb + (t0 + x) * p.gst + h * p.gsh + i]) : 1.f;
    }
  }
  for (int e = tid; e < len; e += NT) {
    const int64_t t = t0 + e;
    if (!p.per_key) st.dec[e] = expf(p.g[b * p.gsb + t * p.gst + h * p.gsh]);
    st.beta[e] = p.beta[b * p.bsb + t * p.bst + h * p.bsh];
    st.start[e] = starts_doc(p, b, t) ? 1 : 0;
  }
  constexpr int CITEMS = (CT * CW + NT - 1) / NT;
  float v0[CITEMS], v1[CITEMS];
#pragma unroll
  for (int it = 0; it < CITEMS; ++it) {
    const int e = tid + it * NT, x = e / CW, c = e % CW;
    const int col0 = c0.col0 + c, col1 = c1.col0 + c;
    const bool in = e < len * CW;
    v0[it] = (in && c0.view != nullptr && col0 >= 0 && col0 < c0.ncols)
                 ? to_float<T>(row_of<T>(*c0.view, b, t0 + x, h)[col0]) : 0.f;
    v1[it] = (in && c1.view != nullptr && col1 >= 0 && col1 < c1.ncols)
                 ? to_float<T>(row_of<T>(*c1.view, b, t0 + x, h)[col1]) : 0.f;
  }
#pragma unroll
  for (int it = 0; it < CITEMS; ++it) {
    const int e = tid + it * NT;
    if (e < len * CW) {
      if (c0.view != nullptr) st.c0[e] = v0[it];
      if (c1.view != nullptr) st.c1[e] = v1[it];
    }
  }
}

// R consecutive staged elements (16-byte aligned) as floats.
template <typename T, int R>
__device__ __forceinline__ void read_rows(const T* src, float (&out)[R]) {
  constexpr int PER = 16 / sizeof(T);
  static_assert(R % PER == 0, "rows per lane must fill 16-byte loads");
#pragma unroll
  for (int c = 0; c < R / PER; ++c) {
    const uint4 u = reinterpret_cast<const uint4*>(src)[c];
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < PER; ++j) out[c * PER + j] = to_float<T>(e[j]);
  }
}
template <int R>
__device__ __forceinline__ void read_decay(const Problem& p, const float* dec, int x, int DKP, int g,
                                           float (&a)[R]) {
  if (p.per_key) {
    const float4* src = reinterpret_cast<const float4*>(dec + x * DKP + g * R);
#pragma unroll
    for (int c = 0; c < R / 4; ++c) {
      const float4 f = src[c];
      a[4 * c] = f.x;
      a[4 * c + 1] = f.y;
      a[4 * c + 2] = f.z;
      a[4 * c + 3] = f.w;
    }
  } else {
    const float e = dec[x];
#pragma unroll
    for (int r = 0; r < R; ++r) a[r] = e;
  }
}

// ---- columns of states -------------------------------------------------------------
// Lane g of a group holds rows g * R .. g * R + R - 1 of its column.
template <int G, int R>
__device__ __forceinline__ void load_column(const Problem& p, const float* base, int col, bool valid,
                                            int g, float (&s)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = g * R + r;
    s[r] = (base != nullptr && valid && i < p.dk) ? base[static_cast<int64_t>(i) * p.dv + col] : 0.f;
  }
}
template <int G, int R>
__device__ __forceinline__ void store_column(const Problem& p, float* base, int ld, int col,
                                             bool valid, int g, const float (&s)[R]) {
  if (base == nullptr || !valid) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = g * R + r;
    if (i < p.dk) base[static_cast<int64_t>(i) * ld + col] = s[r];
  }
}
// The state a document starting at token t begins from.
template <int G, int R>
__device__ __forceinline__ void reset_column(const Problem& p, int b, int64_t t, int h, int col,
                                             bool valid, int g, float (&s)[R]) {
  const float* init =
      p.doc_initial != nullptr
          ? p.doc_initial + (doc_of(p, b, t) * p.heads + h) * static_cast<int64_t>(p.dk) * p.dv
          : nullptr;
  load_column<G, R>(p, init, col, valid, g, s);
}

// One token: S <- (I - beta k k^T) D S + beta k v^T on one column.
template <int G, int R>
__device__ __forceinline__ void step(float (&s)[R], const float (&k)[R], const float (&a)[R],
                                     float beta, float v) {
  float kx[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] *= a[r];
    kx[r & 3] += k[r] * s[r];
  }
  const float c = beta * (v - group_sum<G>((kx[0] + kx[1]) + (kx[2] + kx[3])));
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] += k[r] * c;
}
template <int R>
__device__ __forceinline__ float dot(const float (&a)[R], const float (&b)[R]) {
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
  for (int r = 0; r < R; ++r) acc[r & 3] += a[r] * b[r];
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

struct Lanes {
  int lane, warp, g, cl, col0, col;
  int64_t bh, x0, x1;
  int b, h;
};
template <int G, int NW>
__device__ __forceinline__ Lanes lanes_of(const Problem& p) {
  Lanes l;
  l.lane = threadIdx.x & 31;
  l.warp = threadIdx.x >> 5;
  l.g = l.lane % G;
  l.cl = l.warp * (32 / G) + l.lane / G;
  l.col0 = blockIdx.x * NW * (32 / G);
  l.col = l.col0 + l.cl;
  l.bh = blockIdx.y;
  l.b = static_cast<int>(l.bh / p.heads);
  l.h = static_cast<int>(l.bh % p.heads);
  l.x0 = static_cast<int64_t>(blockIdx.z) * p.seg_len;
  l.x1 = l.x0 + p.seg_len < p.n ? l.x0 + p.seg_len : p.n;
  return l;
}

// ---- forward walk ------------------------------------------------------------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) forward_kernel(Problem p, ForwardOut out) {
  constexpr int DKP = G * R, CW = NW * (32 / G);
  extern __shared__ __align__(16) unsigned char smem[];
  const bool with_o = out.o != nullptr;
  const Stage<T> st = carve<T>(smem, DKP, CW, p.per_key, with_o);
  const Lanes L = lanes_of<G, NW>(p);
  const bool valid = L.col < p.dv;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv, nck = p.checkpoints();
  float s[R];
  load_column<G, R>(p, out.entering ? out.entering + (blockIdx.z * p.bh() + L.bh) * se : nullptr,
                    L.col, valid, L.g, s);
  const ColSource vsrc{&p.v, L.col0, p.dv};
  for (int64_t c0 = L.x0; c0 < L.x1; c0 += CT) {
    const int len = static_cast<int>(L.x1 - c0 < CT ? L.x1 - c0 : CT);
    __syncthreads();  // the previous chunk's readers (and its output flush) are done
    stage_load<T, DKP, CW, NW * 32>(p, st, L.b, L.h, c0, len, with_o, vsrc, ColSource{});
    __syncthreads();
    if (out.ckpt != nullptr && valid) {
      float* c = out.ckpt + ((L.bh * nck + c0 / CT) * p.dv + L.col) * p.dk;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (L.g * R + r < p.dk) c[L.g * R + r] = s[r];
    }
    for (int xx = 0; xx < len; ++xx) {
      if (st.start[xx]) reset_column<G, R>(p, L.b, p.begin + c0 + xx, L.h, L.col, valid, L.g, s);
      float k[R], a[R];
      read_rows<T, R>(st.k + xx * DKP + L.g * R, k);
      read_decay<R>(p, st.dec, xx, DKP, L.g, a);
      step<G, R>(s, k, a, st.beta[xx], st.c0[xx * CW + L.cl]);
      if (with_o) {
        float q[R];
        read_rows<T, R>(st.q + xx * DKP + L.g * R, q);
        const float o = group_sum<G>(dot<R>(q, s));
        if (L.g == 0) st.c1[xx * CW + L.cl] = p.scale * o;
      }
    }
    if (with_o) {
      __syncthreads();
      for (int e = threadIdx.x; e < len * CW; e += NW * 32) {
        const int x = e / CW, col = L.col0 + e % CW;
        if (col < p.dv)
          static_cast<T*>(out.o)[L.b * out.osb + (p.begin + c0 + x) * out.ost + L.h * out.osh + col] =
              from_float<T>(st.c1[e]);
      }
    }
  }
}

// ---- segment summaries: columns [A | M] ----------------------------------------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) summary_kernel(Problem p, SummaryOut out) {
  constexpr int DKP = G * R, CW = NW * (32 / G);
  extern __shared__ __align__(16) unsigned char smem[];
  const Stage<T> st = carve<T>(smem, DKP, CW, p.per_key, false);
  const Lanes L = lanes_of<G, NW>(p);
  const bool valid = L.col < out.ncols, is_map = L.col < p.dk;
  const int mcol = L.col - p.dk;  // column of M
  const int64_t me = static_cast<int64_t>(p.dk) * p.dk, se = static_cast<int64_t>(p.dk) * p.dv;
  const int64_t slot = blockIdx.z * p.bh() + L.bh;
  float s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = (valid && is_map && L.g * R + r == L.col) ? 1.f : 0.f;
  auto store = [&](float* map_base, float* state_base) {
    if (is_map) {
      store_column<G, R>(p, map_base, p.dk, L.col, valid, L.g, s);
    } else {
      store_column<G, R>(p, state_base, p.dv, mcol, valid, L.g, s);
    }
  };
  const ColSource vsrc{&p.v, L.col0 - p.dk, p.dv};
  bool reset_seen = false;
  for (int64_t c0 = L.x0; c0 < L.x1; c0 += CT) {
    const int len = static_cast<int>(L.x1 - c0 < CT ? L.x1 - c0 : CT);
    __syncthreads();
    stage_load<T, DKP, CW, NW * 32>(p, st, L.b, L.h, c0, len, false, vsrc, ColSource{});
    __syncthreads();
    for (int xx = 0; xx < len; ++xx) {
      if (st.start[xx]) {
        const int64_t t = p.begin + c0 + xx;
        if (!reset_seen) {  // the head ends here
          store(out.head_A + slot * me, out.head_M + slot * se);
        } else if (out.finals != nullptr && !is_map) {  // a document begun and ended here
          store_column<G, R>(p, out.finals + (doc_of(p, L.b, t - 1) * p.heads + L.h) * se, p.dv,
                             mcol, valid, L.g, s);
        }
        reset_seen = true;
        if (is_map) {
#pragma unroll
          for (int r = 0; r < R; ++r) s[r] = 0.f;  // and stays exactly 0
        } else {
          reset_column<G, R>(p, L.b, t, L.h, mcol, valid, L.g, s);
        }
      }
      float k[R], a[R];
      read_rows<T, R>(st.k + xx * DKP + L.g * R, k);
      read_decay<R>(p, st.dec, xx, DKP, L.g, a);
      step<G, R>(s, k, a, st.beta[xx], st.c0[xx * CW + L.cl]);
    }
  }
  if (!reset_seen) store(out.head_A + slot * me, out.head_M + slot * se);
  store(out.A + slot * me, out.M + slot * se);
}

// ---- first document start per segment ------------------------------------------------------
__global__ void __launch_bounds__(256) firsts_kernel(Problem p, int* firsts) {
  __shared__ int best;
  const int b = blockIdx.y;
  const int64_t x0 = static_cast<int64_t>(blockIdx.x) * p.seg_len;
  const int64_t x1 = x0 + p.seg_len < p.n ? x0 + p.seg_len : p.n;
  if (threadIdx.x == 0) best = INT_MAX;
  __syncthreads();
  for (int64_t x = x0 + threadIdx.x; x < x1; x += blockDim.x)
    if (p.doc_start[b * p.doc_sb + p.begin + x] != 0) {
      atomicMin(&best, static_cast<int>(x));
      break;
    }
  __syncthreads();
  if (threadIdx.x == 0) firsts[b * p.nseg + blockIdx.x] = best == INT_MAX ? -1 : best;
}

// ---- gradient of each segment's entering state from its head's outputs ---------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) entering_dstate_kernel(Problem p, View dout,
                                                                  const int* firsts,
                                                                  const float* final_dstate,
                                                                  float* out) {
  constexpr int DKP = G * R, CW = NW * (32 / G);
  extern __shared__ __align__(16) unsigned char smem[];
  const Stage<T> st = carve<T>(smem, DKP, CW, p.per_key, true);
  const Lanes L = lanes_of<G, NW>(p);
  const bool valid = L.col < p.dv;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv;
  int64_t head_end = L.x1;
  if (firsts != nullptr) {
    const int f = firsts[L.b * p.nseg + blockIdx.z];
    if (f >= 0) head_end = f;
  }
  float lam[R];
  const float* inject = (final_dstate != nullptr && head_end < L.x1 && head_end > 0)
                            ? final_dstate + (doc_of(p, L.b, p.begin + head_end - 1) * p.heads + L.h) * se
                            : nullptr;
  load_column<G, R>(p, inject, L.col, valid, L.g, lam);
  const ColSource dsrc{&dout, L.col0, p.dv};
  for (int64_t ce = head_end; ce > L.x0;) {
    const int64_t cs = ce - CT > L.x0 ? ce - CT : L.x0;
    const int len = static_cast<int>(ce - cs);
    __syncthreads();
    stage_load<T, DKP, CW, NW * 32>(p, st, L.b, L.h, cs, len, true, dsrc, ColSource{});
    __syncthreads();
    for (int xx = len - 1; xx >= 0; --xx) {
      float q[R], k[R], a[R];
      read_rows<T, R>(st.q + xx * DKP + L.g * R, q);
      read_rows<T, R>(st.k + xx * DKP + L.g * R, k);
      read_decay<R>(p, st.dec, xx, DKP, L.g, a);
      const float beta = st.beta[xx];
      const float d = st.c0[xx * CW + L.cl] * p.scale;
#pragma unroll
      for (int r = 0; r < R; ++r) lam[r] += q[r] * d;
      const float lk = group_sum<G>(dot<R>(k, lam));
#pragma unroll
      for (int r = 0; r < R; ++r) lam[r] = a[r] * (lam[r] - beta * k[r] * lk);
    }
    ce = cs;
  }
  store_column<G, R>(p, out + (blockIdx.z * p.bh() + L.bh) * se, p.dv, L.col, valid, L.g, lam);
}

// ---- backward --------------------------------------------------------------------------------
// The per-token sums' rows (each warp's dq, dk, dg rows and dbeta of one token): kHalves
// (LASP2_DELTA_RECURRENT_BWD=halves), one row per token of half a stretch, reused by the
// next half once a barrier after each half's sums says every thread has read them; kTokens
// (session 25, the default since session 26), one row per token of the stretch, so that the two
// halves of a stretch alternate between the rows of tokens 4..7 and those of 0..3 and the
// next half's barrier before its sums (which every thread reaches only after its reads of
// the previous half's rows) orders those reads before the rows are written again: one
// block barrier per half a stretch less, the same sums in the same order.
enum class BwdRows { kHalves, kTokens };

template <BwdRows ROWS>
constexpr int backward_sum_rows() {
  return ROWS == BwdRows::kTokens ? kStretch : kStretch / 2;
}

template <int G, int R, int NW, BwdRows ROWS>
__host__ __device__ constexpr int backward_extra_floats() {
  // stretch entry states per column + each warp's per-token sums (dq, dk, dg rows,
  // dbeta) over half a stretch (kHalves) or a stretch (kTokens)
  return NW * (32 / G) * kStretches * G * R + backward_sum_rows<ROWS>() * NW * (3 * G * R + 1);
}

template <typename T, int G, int R, int NW, BwdRows ROWS>
__global__ void __launch_bounds__(NW * 32) backward_kernel(Problem p, BackwardArgs a) {
  constexpr int DKP = G * R, CPW = 32 / G, CW = NW * CPW, RQ = 3 * DKP + 1;
  extern __shared__ __align__(16) unsigned char smem[];
  const Stage<T> st = carve<T>(smem, DKP, CW, p.per_key, true);
  const Lanes L = lanes_of<G, NW>(p);
  float* entries = reinterpret_cast<float*>(st.end) + (L.warp * CPW + L.lane / G) * kStretches * DKP;
  float* red = reinterpret_cast<float*>(st.end) + CW * kStretches * DKP;
  const bool valid = L.col < p.dv;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv, nck = p.checkpoints();
  const int Q = 3 * p.dk + 1;
  const float scale = p.scale;
  constexpr int kHalf = kStretch / 2;

  // One interval per block (grid z) when the chunked reverse pass gave each interval's
  // leaving gradient, else the whole part's reverse walk.
  const bool per_chunk = a.chunk_dstate != nullptr;
  if (per_chunk && a.flags != nullptr && a.flags[L.b * nck + blockIdx.z] == 0) return;  // the whole block
  const int64_t c_first = per_chunk ? static_cast<int64_t>(blockIdx.z) : nck - 1;
  const int64_t c_last = per_chunk ? c_first : 0;
  float lam[R];
  load_column<G, R>(p,
                    per_chunk ? a.chunk_dstate + (L.bh * nck + c_first) * se
                              : (a.leaving_dstate ? a.leaving_dstate + L.bh * se : nullptr),
                    L.col, valid, L.g, lam);
  const ColSource vsrc{&p.v, L.col0, p.dv}, dsrc{&a.dout, L.col0, p.dv};
  for (int64_t c = c_first; c >= c_last; --c) {
    const int64_t c0 = c * CT;
    const int clen = static_cast<int>(p.n - c0 < CT ? p.n - c0 : CT);
    const int nst = (clen + kStretch - 1) / kStretch;
    __syncthreads();
    stage_load<T, DKP, CW, NW * 32>(p, st, L.b, L.h, c0, clen, true, vsrc, dsrc);
    __syncthreads();
    // Forward through the checkpoint interval, keeping each stretch's entry state.
    float s[R];
    {
      const float* ck = a.ckpt + ((L.bh * nck + c) * p.dv + L.col) * p.dk;
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = (valid && L.g * R + r < p.dk) ? ck[L.g * R + r] : 0.f;
    }
    for (int sb = 0; sb < nst; ++sb) {
#pragma unroll
      for (int r = 0; r < R; ++r) entries[sb * DKP + L.g * R + r] = s[r];
      if (sb == nst - 1) break;  // the last stretch's tokens are recomputed below
      for (int xx = sb * kStretch; xx < (sb + 1) * kStretch; ++xx) {
        if (st.start[xx]) reset_column<G, R>(p, L.b, p.begin + c0 + xx, L.h, L.col, valid, L.g, s);
        float k[R], dec[R];
        read_rows<T, R>(st.k + xx * DKP + L.g * R, k);
        read_decay<R>(p, st.dec, xx, DKP, L.g, dec);
        step<G, R>(s, k, dec, st.beta[xx], st.c0[xx * CW + L.cl]);
      }
    }
    for (int sb = nst - 1; sb >= 0; --sb) {
      const int xb = sb * kStretch;  // stretch start inside the chunk
      const int len = clen - xb < kStretch ? clen - xb : kStretch;
      float E[R];
#pragma unroll
      for (int r = 0; r < R; ++r) E[r] = entries[sb * DKP + L.g * R + r];
      // States after each token of the stretch.
      float P[kStretch][R];
      {
        float cur[R];
#pragma unroll
        for (int r = 0; r < R; ++r) cur[r] = E[r];
#pragma unroll
        for (int xx = 0; xx < kStretch; ++xx) {
          if (xx < len) {
            const int x = xb + xx;
            if (st.start[x]) reset_column<G, R>(p, L.b, p.begin + c0 + x, L.h, L.col, valid, L.g, cur);
            float k[R], dec[R];
            read_rows<T, R>(st.k + x * DKP + L.g * R, k);
            read_decay<R>(p, st.dec, x, DKP, L.g, dec);
            step<G, R>(cur, k, dec, st.beta[x], st.c0[x * CW + L.cl]);
          }
#pragma unroll
          for (int r = 0; r < R; ++r) P[xx][r] = cur[r];
        }
      }
#pragma unroll
      for (int xx = kStretch - 1; xx >= 0; --xx) {
        if (xx < len) {
          const int x = xb + xx;
          const int64_t t = p.begin + c0 + x;
          const bool start = st.start[x] != 0;
          float q[R], k[R], dec[R], pre[R];
          read_rows<T, R>(st.q + x * DKP + L.g * R, q);
          read_rows<T, R>(st.k + x * DKP + L.g * R, k);
          read_decay<R>(p, st.dec, x, DKP, L.g, dec);
          const float beta = st.beta[x];
          const float v = st.c0[x * CW + L.cl];
          const float d = st.c1[x * CW + L.cl];
          if (start) {
            reset_column<G, R>(p, L.b, t, L.h, L.col, valid, L.g, pre);
          } else {
#pragma unroll
            for (int r = 0; r < R; ++r) pre[r] = xx == 0 ? E[r] : P[xx > 0 ? xx - 1 : 0][r];
          }
          // dS_t += scale q do^T; dq = scale S_t do; X = D_t S_{t-1}
          float dq[R], X[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            lam[r] += scale * q[r] * d;
            dq[r] = scale * P[xx][r] * d;
            X[r] = dec[r] * pre[r];
          }
          const float kx = group_sum<G>(dot<R>(k, X));
          const float lk = group_sum<G>(dot<R>(k, lam));
          if (valid && L.g == 0)
            static_cast<T*>(a.dv)[L.b * a.dvsb + t * a.dvst + L.h * a.dvsh + L.col] = from_float<T>(beta * lk);
          const float vm = v - kx;
          float db = L.g == 0 ? lk * vm : 0.f;
          float dkr[R], dgr[R];
#pragma unroll
          for (int r = 0; r < R; ++r) {
            dkr[r] = beta * (lam[r] * vm - X[r] * lk);
            const float dX = lam[r] - beta * k[r] * lk;
            dgr[r] = dX * X[r];
            lam[r] = dec[r] * dX;
          }
          // Sum the warp's columns, then add this warp's share to the token's sums.
#pragma unroll
          for (int r = 0; r < R; ++r) {
            dq[r] = across_groups<G>(dq[r]);
            dkr[r] = across_groups<G>(dkr[r]);
            dgr[r] = across_groups<G>(dgr[r]);
          }
          db = across_groups<G>(db);
          if (L.lane < G) {
            // token xx's row: xx itself (kTokens) or its place in its half (kHalves)
            float* rr = red + ((ROWS == BwdRows::kTokens ? xx : xx % kHalf) * NW + L.warp) * RQ;
#pragma unroll
            for (int r = 0; r < R; ++r) {
              rr[L.g * R + r] = dq[r];
              rr[DKP + L.g * R + r] = dkr[r];
              rr[2 * DKP + L.g * R + r] = dgr[r];
            }
            if (L.lane == 0) rr[3 * DKP] = db;
          }
          if (start) {
            // lam is the gradient of this document's initial state; before the start lies
            // the end of the previous document, with its own gradient.
            if (a.d_initial != nullptr)
              store_column<G, R>(p, a.d_initial + (doc_of(p, L.b, t) * p.heads + L.h) * se, p.dv,
                                 L.col, valid, L.g, lam);
            const float* prev =
                (a.final_dstate != nullptr && t > p.begin)
                    ? a.final_dstate + (doc_of(p, L.b, t - 1) * p.heads + L.h) * se
                    : nullptr;
            load_column<G, R>(p, prev, L.col, valid, L.g, lam);
          }
        }
        if (xx % kHalf == 0) {  // the sums of tokens [xx, xx + kHalf) of the stretch
          const int cnt = (len < xx + kHalf ? len : xx + kHalf) - xx;
          __syncthreads();  // every warp's rows of these tokens are written
          const int64_t x0 = c0 + xb + xx;
          const float* rows = red + (ROWS == BwdRows::kTokens ? xx : 0) * NW * RQ;
          for (int e = threadIdx.x; e < cnt * Q; e += NW * 32) {
            const int hx = e / Q, qi = e % Q;
            const int slot = qi < 3 * p.dk ? (qi / p.dk) * DKP + qi % p.dk : 3 * DKP;
            float sum = 0.f;
#pragma unroll
            for (int w = 0; w < NW; ++w) sum += rows[(hx * NW + w) * RQ + slot];
            atomicAdd(a.acc + ((x0 + hx) * p.bh() + L.bh) * Q + qi, sum);
          }
          // kHalves: the next half writes the same rows. kTokens: it writes the other half's
          // rows, and the half after it writes these only after the next half's barrier
          // above, which every thread reaches after the reads just made (at a chunk's end
          // the next chunk's stage barriers come first)
          if constexpr (ROWS == BwdRows::kHalves) __syncthreads();
        }
      }
    }
  }
  if (c_last == 0)
    store_column<G, R>(p, a.dentering ? a.dentering + L.bh * se : nullptr, p.dv, L.col, valid, L.g,
                       lam);
}

// dq, dk (input dtype), dg and dbeta (fp32) from the per-token sums; one block per
// (token, b, h), one thread per key row.
template <typename T>
__global__ void __launch_bounds__(kMaxDim) finish_kernel(Problem p, FinishArgs a) {
  __shared__ float warp_sums[kMaxDim / 32];
  const int64_t bh = p.bh();
  const int64_t x = blockIdx.x / bh, bhi = blockIdx.x % bh;
  const int b = static_cast<int>(bhi / p.heads), h = static_cast<int>(bhi % p.heads);
  const int64_t t = p.begin + x;
  if (a.flags != nullptr && a.flags[b * p.checkpoints() + x / kCheckpoint] == 0) return;  // the whole block
  const int Q = 3 * p.dk + 1, i = threadIdx.x;
  const float* acc = a.acc + blockIdx.x * static_cast<int64_t>(Q);
  const int64_t bth = (b * p.seqlen + t) * p.heads + h;
  float dg_row = 0.f;
  if (i < p.dk) {
    static_cast<T*>(a.dq)[b * a.dqsb + t * a.dqst + h * a.dqsh + i] = from_float<T>(acc[i]);
    static_cast<T*>(a.dk)[b * a.dksb + t * a.dkst + h * a.dksh + i] = from_float<T>(acc[p.dk + i]);
    dg_row = acc[2 * p.dk + i];
    if (a.dg != nullptr && p.per_key) a.dg[bth * p.dk + i] = dg_row;
  }
  if (a.dg != nullptr && !p.per_key) {
    const float s = group_sum<32>(dg_row);
    if ((i & 31) == 0) warp_sums[i >> 5] = s;
    __syncthreads();
    if (i == 0) {
      float total = 0.f;
      for (int w = 0; w < kMaxDim / 32; ++w) total += warp_sums[w];
      a.dg[bth] = total;
    }
  }
  if (a.dbeta != nullptr && i == 0) a.dbeta[bth] = acc[3 * p.dk];
}

// ---- dispatch ------------------------------------------------------------------------------
// Walks: 8 warps, 8 lanes per column (32 columns a block), 8 or 16 rows per lane.
constexpr int kWalkWarps = 8, kWalkG = 8;
// Backward: 8 warps; d_k <= 64: 8 lanes x 8 rows; <= 128: 16 lanes x 8 rows.
constexpr int kBwdWarps = 8;

void check_error(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(std::string("lasp2 (CUDA delta rule): ") + what + ": " + cudaGetErrorString(e));
}

template <typename Kernel>
void allow_smem(Kernel kernel, int bytes, const char* what) {
  if (bytes <= 48 * 1024) return;
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    fail(std::string("lasp2 (CUDA delta rule): the ") + what + " kernel needs " + std::to_string(bytes) +
         " bytes of shared memory: " + cudaGetErrorString(e));
}

template <int G>
dim3 walk_grid(const Problem& p, int ncols, int nw, int nseg) {
  const int cols_per_block = nw * (32 / G);
  return dim3(static_cast<unsigned>((ncols + cols_per_block - 1) / cols_per_block),
              static_cast<unsigned>(p.bh()), static_cast<unsigned>(nseg));
}

// Launches a walk kernel (kWalkWarps warps of kWalkG-lane column groups, R rows a
// lane, input type T) over `ncols` state columns and every segment of p; its stage
// holds q when `with_q`.
template <typename T, int R, typename Kernel, typename... Args>
void launch_walk(Kernel kernel, const char* what, const Problem& p, int ncols, bool with_q, cudaStream_t s,
                 const Args&... args) {
  constexpr int CW = kWalkWarps * (32 / kWalkG);
  const int bytes = stage_sizes(sizeof(T), kWalkG * R, CW, p.per_key, with_q).total;
  allow_smem(kernel, bytes, what);
  kernel<<<walk_grid<kWalkG>(p, ncols, kWalkWarps, p.nseg), kWalkWarps * 32, bytes, s>>>(args...);
}

// Calls f(T{}, integral_constant R) for the walk configuration of p.
template <typename F>
void dispatch_walk(const Problem& p, F&& f) {
  dispatch_elem(p.elem, [&](auto tag) {
    if (p.dk <= 64) {
      f(tag, std::integral_constant<int, 8>{});
    } else {
      f(tag, std::integral_constant<int, 16>{});
    }
  });
}

}  // namespace

void check_launch(const char* what) { check_error(cudaGetLastError(), what); }

int64_t plan_seg_len(const Problem& p, int sms) {
  // LASP2_DELTA_SEG_LEN: tokens a segment, rounded down to whole CT-token tiles (at least
  // one); anything but a whole number >= 1 is a lasp2::Error (env_knob.h).
  int64_t seg = env_int64("LASP2_DELTA_SEG_LEN", 0, 1, INT64_MAX);
  if (seg > 0) {
    seg = std::max<int64_t>(CT, seg / CT * CT);
  } else {
    // about two waves of the forward walk's blocks, segments of at least 512 tokens
    const int64_t blocks = (p.dv + 31) / 32 * p.bh();
    const int64_t want = std::max<int64_t>(1, (4 * sms + blocks - 1) / blocks);
    const int64_t nseg = std::max<int64_t>(1, std::min<int64_t>(want, p.n / 512));
    seg = ((p.n + nseg - 1) / nseg + CT - 1) / CT * CT;
  }
  return std::max<int64_t>(seg, CT);
}

void launch_forward(const Problem& p, const ForwardOut& out, cudaStream_t s) {
  dispatch_walk(p, [&](auto tag, auto rows) {
    using T = decltype(tag);
    constexpr int R = decltype(rows)::value;
    launch_walk<T, R>(forward_kernel<T, kWalkG, R, kWalkWarps>, "forward", p, p.dv, out.o != nullptr, s, p, out);
  });
  check_launch("forward kernel");
}

void launch_summary(const Problem& p, const SummaryOut& out, cudaStream_t s) {
  dispatch_walk(p, [&](auto tag, auto rows) {
    using T = decltype(tag);
    constexpr int R = decltype(rows)::value;
    launch_walk<T, R>(summary_kernel<T, kWalkG, R, kWalkWarps>, "part summary", p, out.ncols, false, s, p, out);
  });
  check_launch("part summary kernel");
}

void launch_firsts(const Problem& p, int* firsts, cudaStream_t s) {
  if (p.doc_start == nullptr) {
    check_error(cudaMemsetAsync(firsts, 0xFF, sizeof(int) * p.batch * p.nseg, s), "cudaMemsetAsync");
    return;
  }
  firsts_kernel<<<dim3(static_cast<unsigned>(p.nseg), static_cast<unsigned>(p.batch)), 256, 0, s>>>(
      p, firsts);
  check_launch("document-start kernel");
}

void launch_entering_dstate(const Problem& p, View dout, const int* firsts,
                            const float* final_dstate, float* out, cudaStream_t s) {
  dispatch_walk(p, [&](auto tag, auto rows) {
    using T = decltype(tag);
    constexpr int R = decltype(rows)::value;
    launch_walk<T, R>(entering_dstate_kernel<T, kWalkG, R, kWalkWarps>, "entering-state gradient", p, p.dv, true, s,
                      p, dout, firsts, final_dstate, out);
  });
  check_launch("entering-state gradient kernel");
}

template <typename T, int G, int R, BwdRows ROWS>
static int backward_bytes(bool per_key) {
  constexpr int CW = kBwdWarps * (32 / G);
  return stage_sizes(sizeof(T), G * R, CW, per_key, true).total +
         static_cast<int>(sizeof(float)) * backward_extra_floats<G, R, kBwdWarps, ROWS>();
}

// LASP2_DELTA_RECURRENT_BWD: unset, empty or "tokens" a row of the backward's sums per token
// of the stretch (BwdRows::kTokens, the default since session 26: one barrier per half a
// stretch less, the same bits; on an H100 the GDN token-recurrent backward at 64K with 66
// documents' states 153-154 -> 144-145 ms) where its shared memory fits the device's
// opt-in limit, else kHalves; "halves" a row per token of half a stretch (kHalves, the
// form before). kTokens adds 24 KiB at d_k <= 64, 48 KiB above: 201 KiB for 16-bit GDN at
// d_k = 128, which fits an H100's 227; fp32 and KDA at d_k > 64 need 233 KiB and take
// kHalves there. Any other value is a lasp2::Error (env_knob.h). Read per launch so that a
// test can switch it. Both run one 8-warp block an SM.
static bool backward_rows_tokens() { return env_choice("LASP2_DELTA_RECURRENT_BWD", {"halves", "tokens"}, 1) == 1; }

template <typename T, int G, int R>
static void launch_backward_cfg(const Problem& p, const BackwardArgs& a, cudaStream_t s) {
  Problem one = p;  // one segment: the reverse walk runs over the whole part
  one.nseg = 1;
  one.seg_len = p.n;
  const int z = a.chunk_dstate != nullptr ? static_cast<int>(p.checkpoints()) : 1;
  if (z == 0) return;
  const dim3 grid = walk_grid<G>(p, p.dv, kBwdWarps, z);
  auto run = [&](auto kernel, int bytes) {
    allow_smem(kernel, bytes, "backward");
    kernel<<<grid, kBwdWarps * 32, bytes, s>>>(one, a);
  };
  const bool per_key = p.per_key != 0;
  if (backward_rows_tokens()) {
    const int bytes = backward_bytes<T, G, R, BwdRows::kTokens>(per_key);
    if (bytes <= lasp2::cuda::device_info().smem_optin)
      return run(backward_kernel<T, G, R, kBwdWarps, BwdRows::kTokens>, bytes);
  }
  run(backward_kernel<T, G, R, kBwdWarps, BwdRows::kHalves>, backward_bytes<T, G, R, BwdRows::kHalves>(per_key));
}

void launch_backward(const Problem& p, const BackwardArgs& a, cudaStream_t s) {
  dispatch_elem(p.elem, [&](auto tag) {
    using T = decltype(tag);
    if (p.dk <= 64) {
      launch_backward_cfg<T, 8, 8>(p, a, s);
    } else {
      launch_backward_cfg<T, 16, 8>(p, a, s);
    }
  });
  check_launch("backward kernel");
}

void launch_finish(const Problem& p, const FinishArgs& a, cudaStream_t s) {
  const int64_t blocks = p.n * p.bh();
  if (blocks == 0) return;
  dispatch_elem(p.elem, [&](auto tag) {
    using T = decltype(tag);
    finish_kernel<T><<<static_cast<unsigned>(blocks), kMaxDim, 0, s>>>(p, a);
  });
  check_launch("backward finish kernel");
}

}  // namespace lasp2::delta::gpu
