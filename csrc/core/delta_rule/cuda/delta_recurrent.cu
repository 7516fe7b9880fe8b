// The delta-rule CUDA kernels (see delta_launch.h): token-recurrent walks over a
// part with each state column held by a group of G lanes (R rows per lane), fp32
// arithmetic, inputs in fp32, fp16 or bf16. The same recurrence as the CPU
// reference: per token, X = D_t S; S = X + beta k (v - X^T k)^T; o = scale S^T q.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <string>

#include "delta_rule/cuda/delta_launch.h"
#include "lasp2/types.h"

namespace lasp2::delta::gpu {
namespace {

// ---- element access --------------------------------------------------------------
template <typename T>
__device__ __forceinline__ float load_elem(const T* p);
template <>
__device__ __forceinline__ float load_elem<float>(const float* p) { return *p; }
template <>
__device__ __forceinline__ float load_elem<__half>(const __half* p) { return __half2float(*p); }
template <>
__device__ __forceinline__ float load_elem<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __bfloat162float(*p);
}
template <typename T>
__device__ __forceinline__ void store_elem(T* p, float x);
template <>
__device__ __forceinline__ void store_elem<float>(float* p, float x) { *p = x; }
template <>
__device__ __forceinline__ void store_elem<__half>(__half* p, float x) { *p = __float2half_rn(x); }
template <>
__device__ __forceinline__ void store_elem<__nv_bfloat16>(__nv_bfloat16* p, float x) {
  *p = __float2bfloat16_rn(x);
}

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

// ---- per-token inputs ----------------------------------------------------------------
template <typename T, int G, int R>
__device__ __forceinline__ void load_rows(const Problem& p, const View& v, int b, int64_t t, int h,
                                          int g, float (&out)[R]) {
  const T* base = row_of<T>(v, b, t, h);
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = g + G * r;
    out[r] = i < p.dk ? load_elem<T>(base + i) : 0.f;
  }
}

// a = exp(g) per row (rows past dk: 1, their state stays 0).
template <int G, int R>
__device__ __forceinline__ void load_decay(const Problem& p, int b, int64_t t, int h, int g,
                                           float (&a)[R]) {
  const float* gp = p.g + b * p.gsb + t * p.gst + h * p.gsh;
  if (p.per_key) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = g + G * r;
      a[r] = i < p.dk ? expf(gp[i]) : 1.f;
    }
  } else {
    const float e = expf(gp[0]);
#pragma unroll
    for (int r = 0; r < R; ++r) a[r] = e;
  }
}

__device__ __forceinline__ float load_beta(const Problem& p, int b, int64_t t, int h) {
  return p.beta[b * p.bsb + t * p.bst + h * p.bsh];
}

__device__ __forceinline__ bool starts_doc(const Problem& p, int b, int64_t t) {
  return p.doc_start != nullptr && p.doc_start[b * p.doc_sb + t] != 0;
}
__device__ __forceinline__ int64_t doc_of(const Problem& p, int b, int64_t t) {
  return p.doc_id != nullptr ? p.doc_id[b * p.doc_sb + t] : b;
}

// Column `col` of a [.., dk, dv] state block (zero where `base` is null).
template <int G, int R>
__device__ __forceinline__ void load_column(const Problem& p, const float* base, int col, bool valid,
                                            int g, float (&s)[R]) {
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = g + G * r;
    s[r] = (base != nullptr && valid && i < p.dk) ? base[static_cast<int64_t>(i) * p.dv + col] : 0.f;
  }
}
template <int G, int R>
__device__ __forceinline__ void store_column(const Problem& p, float* base, int ld, int col,
                                             bool valid, int g, const float (&s)[R]) {
  if (base == nullptr || !valid || g >= G) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = g + G * r;
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
  float kx = 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    s[r] *= a[r];
    kx += k[r] * s[r];
  }
  kx = group_sum<G>(kx);
  const float c = beta * (v - kx);
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] += k[r] * c;
}

struct Lanes {
  int lane, warp, g, col;
  int64_t bh;
  int b, h;
};
template <int G, int NW>
__device__ __forceinline__ Lanes lanes_of(const Problem& p) {
  Lanes l;
  l.lane = threadIdx.x & 31;
  l.warp = threadIdx.x >> 5;
  l.g = l.lane % G;
  l.col = (blockIdx.x * NW + l.warp) * (32 / G) + l.lane / G;
  l.bh = blockIdx.y;
  l.b = static_cast<int>(l.bh / p.heads);
  l.h = static_cast<int>(l.bh % p.heads);
  return l;
}

// ---- forward ---------------------------------------------------------------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) forward_kernel(Problem p, ForwardOut out) {
  const Lanes L = lanes_of<G, NW>(p);
  const bool valid = L.col < p.dv;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv, nck = p.checkpoints();
  float s[R];
  load_column<G, R>(p, out.entering ? out.entering + L.bh * se : nullptr, L.col, valid, L.g, s);
  for (int64_t x = 0; x < p.n; ++x) {
    const int64_t t = p.begin + x;
    if (out.ckpt != nullptr && x % kCheckpoint == 0 && valid) {
      float* c = out.ckpt + ((L.bh * nck + x / kCheckpoint) * p.dv + L.col) * p.dk;
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (L.g + G * r < p.dk) c[L.g + G * r] = s[r];
    }
    if (starts_doc(p, L.b, t)) reset_column<G, R>(p, L.b, t, L.h, L.col, valid, L.g, s);
    float k[R], a[R];
    load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
    load_decay<G, R>(p, L.b, t, L.h, L.g, a);
    const float beta = load_beta(p, L.b, t, L.h);
    const float v = valid ? load_elem<T>(row_of<T>(p.v, L.b, t, L.h) + L.col) : 0.f;
    step<G, R>(s, k, a, beta, v);
    if (out.o != nullptr) {
      float q[R];
      load_rows<T, G, R>(p, p.q, L.b, t, L.h, L.g, q);
      float acc = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) acc += q[r] * s[r];
      acc = group_sum<G>(acc);
      if (valid && L.g == 0)
        store_elem<T>(static_cast<T*>(out.o) + L.b * out.osb + t * out.ost + L.h * out.osh + L.col,
                      p.scale * acc);
    }
  }
}

// ---- part summary: columns [A | M] -------------------------------------------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) summary_kernel(Problem p, SummaryOut out) {
  const Lanes L = lanes_of<G, NW>(p);
  const int ncols = p.dk + p.dv;
  const bool valid = L.col < ncols, is_map = L.col < p.dk;
  const int mcol = L.col - p.dk;  // column of M
  const int64_t me = static_cast<int64_t>(p.dk) * p.dk, se = static_cast<int64_t>(p.dk) * p.dv;
  float s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = (valid && is_map && L.g + G * r == L.col) ? 1.f : 0.f;
  auto store = [&](float* map_base, float* state_base) {
    if (is_map) {
      store_column<G, R>(p, map_base, p.dk, L.col, valid, L.g, s);
    } else {
      store_column<G, R>(p, state_base, p.dv, mcol, valid, L.g, s);
    }
  };
  bool reset_seen = false;
  for (int64_t x = 0; x < p.n; ++x) {
    const int64_t t = p.begin + x;
    if (starts_doc(p, L.b, t)) {
      if (!reset_seen) {  // the head ends here
        store(out.head_A + L.bh * me, out.head_M + L.bh * se);
      } else if (out.finals != nullptr && !is_map) {  // a document begun and ended in the part
        store_column<G, R>(p, out.finals + (doc_of(p, L.b, t - 1) * p.heads + L.h) * se, p.dv, mcol,
                           valid, L.g, s);
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
    load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
    load_decay<G, R>(p, L.b, t, L.h, L.g, a);
    const float beta = load_beta(p, L.b, t, L.h);
    const float v = (valid && !is_map) ? load_elem<T>(row_of<T>(p.v, L.b, t, L.h) + mcol) : 0.f;
    step<G, R>(s, k, a, beta, v);
  }
  if (!reset_seen) store(out.head_A + L.bh * me, out.head_M + L.bh * se);
  store(out.A + L.bh * me, out.M + L.bh * se);
}

// ---- gradient of the entering state from the head's outputs -------------------------------
template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) entering_dstate_kernel(Problem p, View dout,
                                                                  float* dentering) {
  const Lanes L = lanes_of<G, NW>(p);
  const bool valid = L.col < p.dv;
  int64_t head_end = p.n;
  if (p.doc_start != nullptr) {
    for (int64_t x0 = 0; x0 < p.n; x0 += 32) {
      const int64_t x = x0 + L.lane;
      const bool start = x < p.n && p.doc_start[L.b * p.doc_sb + p.begin + x] != 0;
      const unsigned m = __ballot_sync(0xffffffffu, start);
      if (m != 0u) {
        head_end = x0 + __ffs(m) - 1;
        break;
      }
    }
  }
  float lam[R];
#pragma unroll
  for (int r = 0; r < R; ++r) lam[r] = 0.f;
  for (int64_t x = head_end - 1; x >= 0; --x) {
    const int64_t t = p.begin + x;
    float q[R], k[R], a[R];
    load_rows<T, G, R>(p, p.q, L.b, t, L.h, L.g, q);
    load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
    load_decay<G, R>(p, L.b, t, L.h, L.g, a);
    const float beta = load_beta(p, L.b, t, L.h);
    const float d = valid ? load_elem<T>(row_of<T>(dout, L.b, t, L.h) + L.col) * p.scale : 0.f;
    float lk = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      lam[r] += q[r] * d;
      lk += k[r] * lam[r];
    }
    lk = group_sum<G>(lk);
#pragma unroll
    for (int r = 0; r < R; ++r) lam[r] = a[r] * (lam[r] - beta * k[r] * lk);
  }
  store_column<G, R>(p, dentering + L.bh * static_cast<int64_t>(p.dk) * p.dv, p.dv, L.col, valid,
                     L.g, lam);
}

// ---- backward ------------------------------------------------------------------------------
constexpr int kStretches = kCheckpoint / kStretch;

template <int G, int R, int NW>
constexpr int backward_smem_floats() {
  // stretch entry states per column + per-token reduction rows (dq, dk, dg, dbeta) per warp
  return NW * (32 / G) * kStretches * G * R + kStretch * NW * (3 * G * R + 1);
}

template <typename T, int G, int R, int NW>
__global__ void __launch_bounds__(NW * 32) backward_kernel(Problem p, BackwardArgs a) {
  constexpr int DKP = G * R, CPW = 32 / G, RQ = 3 * DKP + 1;
  extern __shared__ float smem[];
  const Lanes L = lanes_of<G, NW>(p);
  float* entries = smem + (L.warp * CPW + L.lane / G) * kStretches * DKP;  // this column's
  float* red = smem + NW * CPW * kStretches * DKP;
  const bool valid = L.col < p.dv;
  const int64_t se = static_cast<int64_t>(p.dk) * p.dv, nck = p.checkpoints();
  const int Q = 3 * p.dk + 1;
  const float scale = p.scale;

  float lam[R];
  load_column<G, R>(p, a.leaving_dstate ? a.leaving_dstate + L.bh * se : nullptr, L.col, valid, L.g,
                    lam);
  for (int64_t c = nck - 1; c >= 0; --c) {
    const int64_t c0 = c * kCheckpoint;
    const int clen = static_cast<int>(p.n - c0 < kCheckpoint ? p.n - c0 : kCheckpoint);
    const int nst = (clen + kStretch - 1) / kStretch;
    // Forward through the checkpoint interval, keeping each stretch's entry state.
    float s[R];
    {
      const float* ck = a.ckpt + ((L.bh * nck + c) * p.dv + L.col) * p.dk;
#pragma unroll
      for (int r = 0; r < R; ++r) s[r] = (valid && L.g + G * r < p.dk) ? ck[L.g + G * r] : 0.f;
    }
    for (int sb = 0; sb < nst; ++sb) {
#pragma unroll
      for (int r = 0; r < R; ++r) entries[sb * DKP + L.g + G * r] = s[r];
      if (sb == nst - 1) break;  // the last stretch's tokens are recomputed below
      for (int xx = 0; xx < kStretch; ++xx) {
        const int64_t t = p.begin + c0 + sb * kStretch + xx;
        if (starts_doc(p, L.b, t)) reset_column<G, R>(p, L.b, t, L.h, L.col, valid, L.g, s);
        float k[R], dec[R];
        load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
        load_decay<G, R>(p, L.b, t, L.h, L.g, dec);
        const float v = valid ? load_elem<T>(row_of<T>(p.v, L.b, t, L.h) + L.col) : 0.f;
        step<G, R>(s, k, dec, load_beta(p, L.b, t, L.h), v);
      }
    }
    for (int sb = nst - 1; sb >= 0; --sb) {
      const int64_t x0 = c0 + sb * kStretch;
      const int len = static_cast<int>(p.n - x0 < kStretch ? p.n - x0 : kStretch);
      float E[R];
#pragma unroll
      for (int r = 0; r < R; ++r) E[r] = entries[sb * DKP + L.g + G * r];
      // States after each token of the stretch.
      float P[kStretch][R];
      {
        float st[R];
#pragma unroll
        for (int r = 0; r < R; ++r) st[r] = E[r];
#pragma unroll
        for (int xx = 0; xx < kStretch; ++xx) {
          if (xx < len) {
            const int64_t t = p.begin + x0 + xx;
            if (starts_doc(p, L.b, t)) reset_column<G, R>(p, L.b, t, L.h, L.col, valid, L.g, st);
            float k[R], dec[R];
            load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
            load_decay<G, R>(p, L.b, t, L.h, L.g, dec);
            const float v = valid ? load_elem<T>(row_of<T>(p.v, L.b, t, L.h) + L.col) : 0.f;
            step<G, R>(st, k, dec, load_beta(p, L.b, t, L.h), v);
          }
#pragma unroll
          for (int r = 0; r < R; ++r) P[xx][r] = st[r];
        }
      }
#pragma unroll
      for (int xx = kStretch - 1; xx >= 0; --xx) {
        if (xx >= len) continue;
        const int64_t t = p.begin + x0 + xx;
        const bool start = starts_doc(p, L.b, t);
        float q[R], k[R], dec[R], pre[R];
        load_rows<T, G, R>(p, p.q, L.b, t, L.h, L.g, q);
        load_rows<T, G, R>(p, p.k, L.b, t, L.h, L.g, k);
        load_decay<G, R>(p, L.b, t, L.h, L.g, dec);
        const float beta = load_beta(p, L.b, t, L.h);
        const float v = valid ? load_elem<T>(row_of<T>(p.v, L.b, t, L.h) + L.col) : 0.f;
        const float d = valid ? load_elem<T>(row_of<T>(a.dout, L.b, t, L.h) + L.col) : 0.f;
        if (start) {
          reset_column<G, R>(p, L.b, t, L.h, L.col, valid, L.g, pre);
        } else {
#pragma unroll
          for (int r = 0; r < R; ++r) pre[r] = xx == 0 ? E[r] : P[xx > 0 ? xx - 1 : 0][r];
        }
        // dS_t += scale q do^T; dq = scale S_t do; X = D_t S_{t-1}
        float dq[R], X[R], kx = 0.f, lk = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          lam[r] += scale * q[r] * d;
          dq[r] = scale * P[xx][r] * d;
          X[r] = dec[r] * pre[r];
          kx += k[r] * X[r];
          lk += k[r] * lam[r];
        }
        kx = group_sum<G>(kx);
        lk = group_sum<G>(lk);
        if (valid && L.g == 0)
          store_elem<T>(static_cast<T*>(a.dv) + L.b * a.dvsb + t * a.dvst + L.h * a.dvsh + L.col,
                        beta * lk);
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
        // Sum the warp's columns, then write this warp's row of the token's reduction.
#pragma unroll
        for (int r = 0; r < R; ++r) {
          dq[r] = across_groups<G>(dq[r]);
          dkr[r] = across_groups<G>(dkr[r]);
          dgr[r] = across_groups<G>(dgr[r]);
        }
        db = across_groups<G>(db);
        if (L.lane < G) {
          float* rr = red + (xx * NW + L.warp) * RQ;
#pragma unroll
          for (int r = 0; r < R; ++r) {
            rr[L.g + G * r] = dq[r];
            rr[DKP + L.g + G * r] = dkr[r];
            rr[2 * DKP + L.g + G * r] = dgr[r];
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
      __syncthreads();
      for (int e = threadIdx.x; e < len * Q; e += NW * 32) {
        const int xx = e / Q, qi = e % Q;
        const int slot = qi < 3 * p.dk ? (qi / p.dk) * DKP + qi % p.dk : 3 * DKP;
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < NW; ++w) sum += red[(xx * NW + w) * RQ + slot];
        atomicAdd(a.acc + ((x0 + xx) * p.bh() + L.bh) * Q + qi, sum);
      }
      __syncthreads();
    }
  }
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
  const int Q = 3 * p.dk + 1, i = threadIdx.x;
  const float* acc = a.acc + blockIdx.x * static_cast<int64_t>(Q);
  const int64_t bth = (b * p.seqlen + t) * p.heads + h;
  float dg_row = 0.f;
  if (i < p.dk) {
    store_elem<T>(static_cast<T*>(a.dq) + b * a.dqsb + t * a.dqst + h * a.dqsh + i, acc[i]);
    store_elem<T>(static_cast<T*>(a.dk) + b * a.dksb + t * a.dkst + h * a.dksh + i, acc[p.dk + i]);
    dg_row = acc[2 * p.dk + i];
    if (a.dg != nullptr && p.per_key) a.dg[bth * p.dk + i] = dg_row;
  }
  if (a.dg != nullptr && !p.per_key) {
    float s = group_sum<32>(dg_row);
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

// ---- combines ------------------------------------------------------------------------------
constexpr int kMapThreads = 256;
constexpr int kMapPerThread = kMaxDim * kMaxDim / kMapThreads;

__global__ void __launch_bounds__(kMapThreads)
    apply_map_kernel(const float* A, const float* x, const float* y, int dk, int dv,
                     bool transposed_add, float* out) {
  const int64_t r = blockIdx.x;
  const float* a = A + r * dk * dk;
  const float* xs = x + r * dk * dv;
  float acc[kMapPerThread];
#pragma unroll
  for (int c = 0; c < kMapPerThread; ++c) {
    const int e = threadIdx.x + c * kMapThreads;
    acc[c] = 0.f;
    if (e < dk * dv) {
      const int i = e / dv, j = e % dv;
      float s = 0.f;
      if (transposed_add) {
        for (int m = 0; m < dk; ++m) s += a[m * dk + i] * xs[m * dv + j];
        s += out[r * dk * dv + e];
      } else {
        for (int m = 0; m < dk; ++m) s += a[i * dk + m] * xs[m * dv + j];
        if (y != nullptr) s += y[r * dk * dv + e];
      }
      acc[c] = s;
    }
  }
  __syncthreads();  // every read of this (b, h) before any write: out may alias x or y
#pragma unroll
  for (int c = 0; c < kMapPerThread; ++c) {
    const int e = threadIdx.x + c * kMapThreads;
    if (e < dk * dv) out[r * dk * dv + e] = acc[c];
  }
}

__global__ void add_kernel(float* dst, const float* src, int64_t count) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    dst[i] += src[i];
}

// ---- dispatch ------------------------------------------------------------------------------
template <typename F>
void dispatch_elem(Elem e, F&& f) {
  switch (e) {
    case Elem::kF32:
      f(float{});
      return;
    case Elem::kF16:
      f(__half{});
      return;
    case Elem::kBF16:
      f(__nv_bfloat16{});
      return;
  }
}

// Walk kernels: 8 lanes per column, 8 or 16 rows per lane; 2 warps (8 columns) a block.
constexpr int kWalkWarps = 2;
// Backward: 8 warps; d_k <= 64: 8 lanes x 8 rows; <= 128: 16 lanes x 8 rows.
constexpr int kBwdWarps = 8;

template <int G>
dim3 grid_for(const Problem& p, int ncols, int nw) {
  const int cols_per_block = nw * (32 / G);
  return dim3(static_cast<unsigned>((ncols + cols_per_block - 1) / cols_per_block),
              static_cast<unsigned>(p.bh()));
}

}  // namespace

void check_launch(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) fail(std::string("lasp2 (CUDA delta rule): ") + what + ": " + cudaGetErrorString(e));
}

void launch_forward(const Problem& p, const ForwardOut& out, cudaStream_t s) {
  dispatch_elem(p.elem, [&](auto tag) {
    using T = decltype(tag);
    if (p.dk <= 64) {
      forward_kernel<T, 8, 8, kWalkWarps>
          <<<grid_for<8>(p, p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, out);
    } else {
      forward_kernel<T, 8, 16, kWalkWarps>
          <<<grid_for<8>(p, p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, out);
    }
  });
  check_launch("forward kernel");
}

void launch_summary(const Problem& p, const SummaryOut& out, cudaStream_t s) {
  dispatch_elem(p.elem, [&](auto tag) {
    using T = decltype(tag);
    if (p.dk <= 64) {
      summary_kernel<T, 8, 8, kWalkWarps>
          <<<grid_for<8>(p, p.dk + p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, out);
    } else {
      summary_kernel<T, 8, 16, kWalkWarps>
          <<<grid_for<8>(p, p.dk + p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, out);
    }
  });
  check_launch("part summary kernel");
}

void launch_entering_dstate(const Problem& p, View dout, float* dentering, cudaStream_t s) {
  dispatch_elem(p.elem, [&](auto tag) {
    using T = decltype(tag);
    if (p.dk <= 64) {
      entering_dstate_kernel<T, 8, 8, kWalkWarps>
          <<<grid_for<8>(p, p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, dout, dentering);
    } else {
      entering_dstate_kernel<T, 8, 16, kWalkWarps>
          <<<grid_for<8>(p, p.dv, kWalkWarps), kWalkWarps * 32, 0, s>>>(p, dout, dentering);
    }
  });
  check_launch("entering-state gradient kernel");
}

int backward_smem_bytes(int dk) {
  return static_cast<int>(sizeof(float)) * (dk <= 64 ? backward_smem_floats<8, 8, kBwdWarps>()
                                                     : backward_smem_floats<16, 8, kBwdWarps>());
}

template <typename T, int G, int R>
static void launch_backward_cfg(const Problem& p, const BackwardArgs& a, cudaStream_t s) {
  constexpr int bytes = sizeof(float) * backward_smem_floats<G, R, kBwdWarps>();
  auto kernel = backward_kernel<T, G, R, kBwdWarps>;
  const cudaError_t e =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess)
    fail(std::string("lasp2 (CUDA delta rule): the backward kernel needs ") + std::to_string(bytes) +
         " bytes of shared memory: " + cudaGetErrorString(e));
  kernel<<<grid_for<G>(p, p.dv, kBwdWarps), kBwdWarps * 32, bytes, s>>>(p, a);
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

void launch_apply_map(const float* A, const float* x, const float* y, int64_t bh, int dk, int dv,
                      bool transposed_add, float* out, cudaStream_t s) {
  if (bh == 0) return;
  apply_map_kernel<<<static_cast<unsigned>(bh), kMapThreads, 0, s>>>(A, x, y, dk, dv,
                                                                      transposed_add, out);
  check_launch("apply_map kernel");
}

void launch_add(float* dst, const float* src, int64_t count, cudaStream_t s) {
  if (count <= 0) return;
  const int64_t blocks = std::min<int64_t>((count + 255) / 256, 4096);
  add_kernel<<<static_cast<unsigned>(blocks), 256, 0, s>>>(dst, src, count);
  check_launch("add kernel");
}

}  // namespace lasp2::delta::gpu
