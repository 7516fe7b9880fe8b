// Shared pieces of the CPU chunked kernels: typed element access and the per-chunk
// bookkeeping (cumulative log decay and document segments) that every pass uses.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "lasp2/params.h"

namespace lasp2::cpu {

template <typename T>
const T* row(ConstView view, int64_t b, int64_t t, int64_t h) {
  return static_cast<const T*>(view.data) + view.stride.offset(b, t, h);
}
template <typename T>
T* row(MutView view, int64_t b, int64_t t, int64_t h) {
  return static_cast<T*>(view.data) + view.stride.offset(b, t, h);
}

template <typename Acc, typename T>
Acc dot(const T* a, const T* b, int64_t n) {
  Acc s = 0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<Acc>(a[i]) * static_cast<Acc>(b[i]);
  return s;
}

// A log gate whose exp is 0 in double (-inf, or below about -745) forgets the state
// before its token exactly, as the float64 recurrence does: the same as a document
// start there. Treating it as one keeps such gates out of the cumulative sums
// below, where -inf - (-inf) would give NaN and a huge finite gate would cancel
// catastrophically against its neighbours. A NaN gate is not a reset (it propagates).
inline bool resets_state(double log_gate) { return std::exp(log_gate) == 0.0; }

// True when token t of row b, head h sees nothing of the state before it.
inline bool starts_segment(const AttentionParams& p, int64_t b, int64_t t, int64_t h) {
  return p.starts_doc(b, t) || resets_state(p.decay.at(b, t, h));
}

// Per-chunk (or per-part) bookkeeping for tokens x in [0, n) starting at `begin`:
// G[x] is the cumulative log decay from the first token through x, seg[x] the
// number of segment starts (document starts, -inf gates) in [0, x]. Pairs (s, t)
// interact only within one segment; the state entering the chunk reaches only
// segment 0. A segment's first gate never enters a weight, so a -inf one is skipped.
template <typename Acc>
struct ChunkInfo {
  std::vector<Acc> G;
  std::vector<int> seg;
  int64_t n = 0;

  void compute(const AttentionParams& p, int64_t b, int64_t h, int64_t begin, int64_t count) {
    n = count;
    G.resize(count);
    seg.resize(count);
    Acc g = 0;
    int s = 0;
    for (int64_t x = 0; x < count; ++x) {
      const double gate = p.decay.at(b, begin + x, h);
      if (p.starts_doc(b, begin + x) || resets_state(gate)) {
        ++s;
      } else {
        g += static_cast<Acc>(gate);
      }
      G[x] = g;
      seg[x] = s;
    }
  }
  // Weight of key y in the output of query x (y <= x).
  Acc pair_weight(int64_t x, int64_t y) const {
    return seg[x] == seg[y] ? std::exp(G[x] - G[y]) : Acc(0);
  }
  // Weight of the entering state in the output of token x.
  Acc entry_weight(int64_t x) const { return seg[x] == 0 ? std::exp(G[x]) : Acc(0); }
  // Weight of key y in the state leaving the chunk.
  Acc exit_weight(int64_t y) const { return pair_weight(n - 1, y); }
  // Factor carrying the entering state through the whole chunk.
  Acc through_weight() const { return entry_weight(n - 1); }
  // The intra-chunk causal part of row x: acc += sum over y <= x of pair_weight(x, y)
  // (ax . b_y) c_y, with b_y = b_row(y) of length nb and c_y = c_row(y) of length nc.
  // The output (a = q, b = k, c = v) and dq (a = dO, b = v, c = k) share it.
  template <typename T, typename BRow, typename CRow>
  void add_causal(int64_t x, const T* ax, BRow&& b_row, int64_t nb, CRow&& c_row, int64_t nc, Acc* acc) const {
    for (int64_t y = 0; y <= x; ++y) {
      const Acc w = pair_weight(x, y);
      if (w == Acc(0)) continue;
      const Acc a = w * dot<Acc>(ax, b_row(y), nb);
      const T* cy = c_row(y);
      for (int64_t j = 0; j < nc; ++j) acc[j] += a * static_cast<Acc>(cy[j]);
    }
  }
};

// A dk x dv fp32-or-better state held row-major.
template <typename Acc>
struct State {
  std::vector<Acc> m;
  int64_t dk = 0, dv = 0;

  State(int64_t dk_, int64_t dv_) : m(dk_ * dv_, Acc(0)), dk(dk_), dv(dv_) {}
  void load(const float* src) {
    if (src == nullptr) {
      std::fill(m.begin(), m.end(), Acc(0));
    } else {
      for (int64_t i = 0; i < dk * dv; ++i) m[i] = static_cast<Acc>(src[i]);
    }
  }
  void store(float* dst) const {
    for (int64_t i = 0; i < dk * dv; ++i) dst[i] = static_cast<float>(m[i]);
  }
  // A zero factor (a document start or reset between the state and its reader) skips the
  // state instead of multiplying it: 0 * inf or 0 * NaN from one document's non-finite
  // values would otherwise reach every later document (the float64 recurrence restarts).
  void scale(Acc f) {
    if (f == Acc(0)) {
      std::fill(m.begin(), m.end(), Acc(0));
      return;
    }
    for (auto& x : m) x *= f;
  }
  // m += f * a b^T
  template <typename T, typename U>
  void add_outer(Acc f, const T* a, const U* b) {
    if (f == Acc(0)) return;
    for (int64_t i = 0; i < dk; ++i) {
      const Acc ai = f * static_cast<Acc>(a[i]);
      Acc* r = &m[i * dv];
      for (int64_t j = 0; j < dv; ++j) r[j] += ai * static_cast<Acc>(b[j]);
    }
  }
  // out[j] += f * sum_i a[i] m[i][j]   (a^T M)
  template <typename T>
  void left_mul_add(Acc f, const T* a, Acc* out) const {
    if (f == Acc(0)) return;
    for (int64_t i = 0; i < dk; ++i) {
      const Acc ai = f * static_cast<Acc>(a[i]);
      const Acc* r = &m[i * dv];
      for (int64_t j = 0; j < dv; ++j) out[j] += ai * r[j];
    }
  }
  // out[i] += f * sum_j m[i][j] b[j]   (M b)
  template <typename T>
  void right_mul_add(Acc f, const T* b, Acc* out) const {
    if (f == Acc(0)) return;
    for (int64_t i = 0; i < dk; ++i) {
      const Acc* r = &m[i * dv];
      Acc s = 0;
      for (int64_t j = 0; j < dv; ++j) s += r[j] * static_cast<Acc>(b[j]);
      out[i] += f * s;
    }
  }
};

// fp32 inputs accumulate in fp32 (as the GPU kernels do); fp64 inputs in fp64.
template <typename T>
using AccOf = T;

// Per-token scalars (q . dq, dg) are stored in the decay's precision.
inline void store_real(void* base, ScalarType type, int64_t index, double value) {
  if (type == ScalarType::kFloat64) {
    static_cast<double*>(base)[index] = value;
  } else {
    static_cast<float*>(base)[index] = static_cast<float>(value);
  }
}
inline double load_real(const void* base, ScalarType type, int64_t index) {
  return type == ScalarType::kFloat64 ? static_cast<const double*>(base)[index]
                                      : static_cast<const float*>(base)[index];
}

// Offset of the [B, H] block for (b, h) and of a [B, T, H] fp32 contiguous buffer.
inline int64_t bh_index(const AttentionParams& p, int64_t b, int64_t h) { return b * p.heads + h; }
inline int64_t bth_index(const AttentionParams& p, int64_t b, int64_t t, int64_t h) {
  return (b * p.seqlen + t) * p.heads + h;
}

// The forward scan that chunk_forward and chunk_backward_dq share (one walk, so the two
// passes cannot disagree on the state a chunk sees): for every (b, h) in order, S starts
// from initial_state (null: zero) and is carried through part's chunks. At chunk
// [c0, c0 + n), info is computed for it and at_chunk(b, h, c0, n, S) runs with S the
// state entering the chunk; after the last chunk, at_end(b, h, S).
template <typename T, typename Acc, typename AtChunk, typename AtEnd>
void forward_state_scan(const AttentionParams& p, TokenRange part, const float* initial_state,
                        ChunkInfo<Acc>& info, AtChunk&& at_chunk, AtEnd&& at_end) {
  const int64_t dk = p.dim_k, dv = p.dim_v;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      State<Acc> S(dk, dv);
      S.load(initial_state ? initial_state + bh_index(p, b, h) * dk * dv : nullptr);
      for (int64_t c0 = part.begin; c0 < part.end; c0 += p.chunk_size) {
        const int64_t n = std::min<int64_t>(p.chunk_size, part.end - c0);
        info.compute(p, b, h, c0, n);
        at_chunk(b, h, c0, n, static_cast<const State<Acc>&>(S));
        S.scale(info.through_weight());
        for (int64_t y = 0; y < n; ++y) {
          const Acc w = info.exit_weight(y);
          if (w != Acc(0)) S.add_outer(w, row<T>(p.k, b, c0 + y, h), row<T>(p.v, b, c0 + y, h));
        }
      }
      at_end(b, h, static_cast<const State<Acc>&>(S));
    }
  }
}

}  // namespace lasp2::cpu
