// The chunked (WY / UT-transform) form of the gated delta rule on the CPU.
//
// Inside a chunk of n tokens that holds no document start, with G_x the
// cumulative log gate from the chunk's first token through token x (a dk vector;
// all entries equal for GDN) and S0 the state entering the chunk, write
// S_t = D_t S_{t-1} + k_t u_t^T. Then
//   u_x + sum_{y<x} L_xy u_y = beta_x (v_x - S0^T (e^{G_x} . k_x)),
//   L_xy = beta_x k_x^T diag(e^{G_x - G_y}) k_y   (strictly lower triangular),
// so U = (I + L)^{-1} (...) by forward substitution (the UT transform), and
//   o_x = scale (S0^T (e^{G_x} . q_x) + sum_{y<=x} q_x^T diag(e^{G_x - G_y}) k_y u_y)
//   S_n = diag(e^{G_last}) S0 + sum_y (e^{G_last - G_y} . k_y) u_y^T.
// The chunk's map S0 -> S_n is affine: A_c = diag(e^{G_last}) - sum_y (e^{G_last-G_y} . k_y) w_y^T
// with w = (I + L)^{-1} (beta_x e^{G_x} . k_x), and M_c = S_n for S0 = 0.
// Gate differences G_x - G_y (x >= y) are <= 0, so no exponent overflows.
// A log gate of -inf (a full reset: exp(g) = 0) is valid input; G_x - G_y would be
// -inf - -inf there (and a gate of -1e30 would swallow its neighbours in G), so a chunk
// also begins at every token with such a gate entry (resets_state below) and
// G is kept relative to the chunk's first token (`G`: the gates after it; `g0`: its
// own), whose gate enters only the factors on S0 (e^{g0 + G_x}).
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/chunk_scan.h"
#include "delta_rule/delta_params.h"

namespace lasp2::delta::cpu {

// Element access and per-token scalar stores as the scalar family's CPU kernels do them.
using lasp2::cpu::row;
using lasp2::cpu::store_real;

// A token range [begin, end) of one batch row with no document start and no -inf
// gate after begin.
struct Chunk {
  int64_t begin = 0, end = 0;
  int64_t length() const { return end - begin; }
};

// Whether token t of row b resets the state in any head or key dim: a log gate whose
// exp is 0 in double (-inf, or below about -745, which would cancel catastrophically
// against its neighbours in G), the scalar family's rule (cpu/chunk_scan.h).
inline bool resets_state(const DeltaParams& p, int64_t b, int64_t t) {
  const int64_t dims = p.gate_kind == GateKind::kScalar ? 1 : p.dim_k;
  for (int64_t h = 0; h < p.heads; ++h)
    for (int64_t i = 0; i < dims; ++i)
      if (lasp2::cpu::resets_state(p.gate(b, t, h, i))) return true;
  return false;
}

// The part cut into chunks of at most chunk_size tokens; a document start or a -inf
// gate always begins a chunk, so each chunk lies inside one document and its gate
// differences are finite.
inline std::vector<Chunk> chunks_of(const DeltaParams& p, int64_t b, TokenRange part) {
  std::vector<Chunk> out;
  int64_t c0 = part.begin;
  while (c0 < part.end) {
    int64_t c1 = c0 + 1;
    while (c1 < part.end && c1 - c0 < p.chunk_size && !p.starts_doc(b, c1) && !resets_state(p, b, c1)) ++c1;
    out.push_back({c0, c1});
    c0 = c1;
  }
  return out;
}

// Row-major dense matrices in the accumulation precision.
template <typename Acc>
using Mat = std::vector<Acc>;

template <typename Acc>
void load_state(Mat<Acc>& S, const float* src, int64_t n) {
  S.assign(n, Acc(0));
  if (src != nullptr)
    for (int64_t i = 0; i < n; ++i) S[i] = static_cast<Acc>(src[i]);
}
template <typename Acc>
void store_state(const Mat<Acc>& S, float* dst) {
  for (size_t i = 0; i < S.size(); ++i) dst[i] = static_cast<float>(S[i]);
}

// One chunk of one (b, h), loaded in the accumulation precision.
template <typename T, typename Acc = T>
struct WYChunk {
  int64_t n = 0, dk = 0, dv = 0;
  Mat<Acc> q, k, v, G, beta, L;
  Mat<Acc> g0;  // the first token's log gates (dk): they act on the entering state only

  // e^{G_x} with the first token's gate: the decay from the entering state to token x.
  Acc entry_decay(int64_t x, int64_t i) const { return std::exp(g0[i] + G[x * dk + i]); }

  void load(const DeltaParams& p, int64_t b, int64_t h, Chunk c) {
    n = c.length();
    dk = p.dim_k;
    dv = p.dim_v;
    q.resize(n * dk);
    k.resize(n * dk);
    v.resize(n * dv);
    G.resize(n * dk);
    g0.resize(dk);
    beta.resize(n);
    for (int64_t x = 0; x < n; ++x) {
      const int64_t t = c.begin + x;
      const T* qt = row<T>(p.q, b, t, h);
      const T* kt = row<T>(p.k, b, t, h);
      const T* vt = row<T>(p.v, b, t, h);
      for (int64_t i = 0; i < dk; ++i) {
        q[x * dk + i] = static_cast<Acc>(qt[i]);
        k[x * dk + i] = static_cast<Acc>(kt[i]);
        const Acc g = static_cast<Acc>(p.gate(b, t, h, i));
        if (x == 0) g0[i] = g;
        G[x * dk + i] = x > 0 ? G[(x - 1) * dk + i] + g : Acc(0);
      }
      for (int64_t j = 0; j < dv; ++j) v[x * dv + j] = static_cast<Acc>(vt[j]);
      beta[x] = static_cast<Acc>(p.beta_at(b, t, h));
    }
    L.assign(n * n, Acc(0));
    for (int64_t x = 0; x < n; ++x)
      for (int64_t y = 0; y < x; ++y) L[x * n + y] = beta[x] * gated_dot(k.data(), x, y);
  }

  // a_x^T diag(e^{G_x - G_y}) k_y for a row x of `a` (q or k), y <= x.
  Acc gated_dot(const Acc* a, int64_t x, int64_t y) const {
    Acc s = 0;
    for (int64_t i = 0; i < dk; ++i)
      s += a[x * dk + i] * k[y * dk + i] * std::exp(G[x * dk + i] - G[y * dk + i]);
    return s;
  }

  // rows r_x <- r_x - sum_{y<x} L_xy r_y (in place): applies (I + L)^{-1}.
  void solve(Mat<Acc>& r, int64_t width) const {
    for (int64_t x = 0; x < n; ++x)
      for (int64_t y = 0; y < x; ++y) {
        const Acc l = L[x * n + y];
        if (l == Acc(0)) continue;
        for (int64_t j = 0; j < width; ++j) r[x * width + j] -= l * r[y * width + j];
      }
  }

  // U for the entering state S (dk x dv).
  Mat<Acc> pseudo_values(const Mat<Acc>& S) const {
    Mat<Acc> u(n * dv);
    for (int64_t x = 0; x < n; ++x)
      for (int64_t j = 0; j < dv; ++j) {
        Acc s = v[x * dv + j];
        for (int64_t i = 0; i < dk; ++i) s -= entry_decay(x, i) * k[x * dk + i] * S[i * dv + j];
        u[x * dv + j] = beta[x] * s;
      }
    solve(u, dv);
    return u;
  }

  // Writes o (when non-null) and advances S to the state leaving the chunk.
  void advance(const DeltaParams& p, Mat<Acc>& S, int64_t b, int64_t h, int64_t begin,
               MutView* o) const {
    const Mat<Acc> u = pseudo_values(S);
    if (o != nullptr) {
      std::vector<Acc> acc(dv);
      for (int64_t x = 0; x < n; ++x) {
        std::fill(acc.begin(), acc.end(), Acc(0));
        for (int64_t i = 0; i < dk; ++i) {
          const Acc qi = entry_decay(x, i) * q[x * dk + i];
          for (int64_t j = 0; j < dv; ++j) acc[j] += qi * S[i * dv + j];
        }
        for (int64_t y = 0; y <= x; ++y) {
          const Acc a = gated_dot(q.data(), x, y);
          for (int64_t j = 0; j < dv; ++j) acc[j] += a * u[y * dv + j];
        }
        T* ox = row<T>(*o, b, begin + x, h);
        for (int64_t j = 0; j < dv; ++j) ox[j] = static_cast<T>(static_cast<Acc>(p.scale) * acc[j]);
      }
    }
    const int64_t last = n - 1;
    for (int64_t i = 0; i < dk; ++i) {
      const Acc decay = entry_decay(last, i);
      for (int64_t j = 0; j < dv; ++j) S[i * dv + j] *= decay;
    }
    for (int64_t y = 0; y < n; ++y)
      for (int64_t i = 0; i < dk; ++i) {
        const Acc ki = std::exp(G[last * dk + i] - G[y * dk + i]) * k[y * dk + i];
        for (int64_t j = 0; j < dv; ++j) S[i * dv + j] += ki * u[y * dv + j];
      }
  }

  // A <- A_c A for the chunk's homogeneous map A_c (dk x dk).
  void compose_map(Mat<Acc>& A) const {
    Mat<Acc> w(n * dk);
    for (int64_t x = 0; x < n; ++x)
      for (int64_t i = 0; i < dk; ++i) w[x * dk + i] = beta[x] * entry_decay(x, i) * k[x * dk + i];
    solve(w, dk);
    const int64_t last = n - 1;
    Mat<Acc> Ac(dk * dk, Acc(0));
    for (int64_t i = 0; i < dk; ++i) Ac[i * dk + i] = entry_decay(last, i);
    for (int64_t y = 0; y < n; ++y)
      for (int64_t i = 0; i < dk; ++i) {
        const Acc ki = std::exp(G[last * dk + i] - G[y * dk + i]) * k[y * dk + i];
        for (int64_t j = 0; j < dk; ++j) Ac[i * dk + j] -= ki * w[y * dk + j];
      }
    Mat<Acc> out(dk * dk, Acc(0));
    for (int64_t i = 0; i < dk; ++i)
      for (int64_t m = 0; m < dk; ++m) {
        const Acc a = Ac[i * dk + m];
        if (a == Acc(0)) continue;
        for (int64_t j = 0; j < dk; ++j) out[i * dk + j] += a * A[m * dk + j];
      }
    A.swap(out);
  }
};

}  // namespace lasp2::delta::cpu
