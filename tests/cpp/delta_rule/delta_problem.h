// Random gated delta-rule problems (GDN or KDA) in host vectors, and the float64
// step-by-step recurrence with hand-written BPTT that every kernel is held to.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "delta_rule/delta_params.h"
#include "lasp2/part_layout.h"

namespace lasp2::delta::testing {

struct DeltaSpec {
  int64_t batch = 2, seqlen = 23, heads = 2, dim_k = 5, dim_v = 4;
  GateKind gate_kind = GateKind::kScalar;
  int chunk_size = 4;
  double scale = 0.8;
  std::vector<int64_t> doc_starts;  // packed documents (batch must be 1); token 0 is not listed
  // tokens whose log gate is -inf in head 0 (every dim of a scalar gate, the first half of
  // a per-key one) and -1e30 (exp 0 in double) in the last head: full resets
  std::vector<int64_t> reset_tokens;
  bool packed() const { return !doc_starts.empty(); }
  int64_t num_docs() const { return packed() ? static_cast<int64_t>(doc_starts.size()) + 1 : batch; }
};

template <typename T>
struct DeltaProblem {
  DeltaSpec spec;
  std::vector<T> q, k, v, dout;
  std::vector<T> g, beta;                    // gates, betas in the inputs' precision
  std::vector<uint8_t> doc_start;
  std::vector<int32_t> doc_id;
  std::vector<float> initial, final_dstate;  // [N, H, dk, dv]

  explicit DeltaProblem(const DeltaSpec& s, uint32_t seed = 7) : spec(s) {
    std::mt19937 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::uniform_real_distribution<double> gate(-0.5, -0.02), unit(0.05, 0.95);
    auto fill = [&](std::vector<T>& x, int64_t d, double sd) {
      x.resize(s.batch * s.seqlen * s.heads * d);
      for (auto& e : x) e = static_cast<T>(sd * normal(rng));
    };
    fill(q, s.dim_k, 0.5);
    fill(k, s.dim_k, 0.5);  // |k| ~ 1: the delta update stays contractive
    fill(v, s.dim_v, 0.5);
    fill(dout, s.dim_v, 0.5);
    g.resize(s.batch * s.seqlen * s.heads * (s.gate_kind == GateKind::kPerKey ? s.dim_k : 1));
    for (auto& e : g) e = static_cast<T>(gate(rng));
    const int64_t gd = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;
    for (int64_t t : s.reset_tokens)
      for (int64_t b = 0; b < s.batch; ++b)
        for (int64_t i = 0; i < (gd + 1) / 2; ++i) {
          g[((b * s.seqlen + t) * s.heads) * gd + i] = -std::numeric_limits<T>::infinity();
          g[((b * s.seqlen + t) * s.heads + s.heads - 1) * gd + gd - 1 - i] = static_cast<T>(-1e30);
        }
    beta.resize(s.batch * s.seqlen * s.heads);
    for (auto& e : beta) e = static_cast<T>(unit(rng));
    doc_start.assign(s.seqlen, 0);
    doc_id.assign(s.seqlen, 0);
    for (int64_t t : s.doc_starts) doc_start[t] = 1;
    for (int64_t t = 1; t < s.seqlen; ++t) doc_id[t] = doc_id[t - 1] + doc_start[t];
    const int64_t n = s.num_docs() * s.heads * s.dim_k * s.dim_v;
    initial.resize(n);
    final_dstate.resize(n);
    for (auto& e : initial) e = static_cast<float>(0.3 * normal(rng));
    for (auto& e : final_dstate) e = static_cast<float>(0.3 * normal(rng));
  }

  BTHStrides strides(int64_t d) const { return {spec.seqlen * spec.heads * d, spec.heads * d, d}; }

  DeltaParams params() const {
    DeltaParams p;
    p.batch = spec.batch;
    p.seqlen = spec.seqlen;
    p.heads = spec.heads;
    p.dim_k = spec.dim_k;
    p.dim_v = spec.dim_v;
    p.dtype = std::is_same<T, double>::value ? ScalarType::kFloat64 : ScalarType::kFloat32;
    p.gate_dtype = p.dtype;
    p.q = {q.data(), strides(spec.dim_k)};
    p.k = {k.data(), strides(spec.dim_k)};
    p.v = {v.data(), strides(spec.dim_v)};
    p.gate_kind = spec.gate_kind;
    p.g = g.data();
    p.g_stride = spec.gate_kind == GateKind::kPerKey ? strides(spec.dim_k) : strides(1);
    p.beta = beta.data();
    p.beta_stride = strides(1);
    p.scale = spec.scale;
    if (spec.packed()) {
      p.doc_start = doc_start.data();
      p.doc_id = doc_id.data();
      p.doc_batch_stride = 0;
    }
    p.chunk_size = spec.chunk_size;
    return p;
  }
  ConstView dout_view() const { return {dout.data(), strides(spec.dim_v)}; }
};

struct DeltaReference {
  std::vector<double> o, dq, dk, dv, dg, dbeta;
  std::vector<double> finals, d_initial;  // [N, H, dk, dv]
};

// Step by step in float64: S_t = (I - b k k^T) D_t S_{t-1} + b k v^T, o_t = scale S_t^T q_t.
// Sequence n starts from initial[n]; the loss is sum <o, dout> + sum <finals, final_dstate>.
template <typename T>
DeltaReference delta_reference(const DeltaProblem<T>& pr) {
  const DeltaSpec& s = pr.spec;
  const int64_t B = s.batch, T_ = s.seqlen, H = s.heads, K = s.dim_k, V = s.dim_v, KV = K * V;
  const bool per_key = s.gate_kind == GateKind::kPerKey;
  DeltaReference r;
  r.o.assign(pr.v.size(), 0);
  r.dq.assign(pr.q.size(), 0);
  r.dk.assign(pr.k.size(), 0);
  r.dv.assign(pr.v.size(), 0);
  r.dg.assign(pr.g.size(), 0);
  r.dbeta.assign(pr.beta.size(), 0);
  r.finals.assign(pr.initial.size(), 0);
  r.d_initial.assign(pr.initial.size(), 0);
  auto idx = [&](int64_t b, int64_t t, int64_t h, int64_t d) { return ((b * T_ + t) * H + h) * d; };
  auto gate = [&](int64_t b, int64_t t, int64_t h, int64_t i) {
    return double(pr.g[per_key ? idx(b, t, h, K) + i : idx(b, t, h, 1)]);
  };
  for (int64_t b = 0; b < B; ++b) {
    auto doc = [&](int64_t t) -> int64_t { return s.packed() ? pr.doc_id[t] : b; };
    for (int64_t h = 0; h < H; ++h) {
      auto block = [&](int64_t d) { return (d * H + h) * KV; };
      // before[t]: the state token t's transition acts on; after[t]: S_t.
      std::vector<std::vector<double>> before(T_), after(T_);
      std::vector<double> S(KV);
      for (int64_t t = 0; t < T_; ++t) {
        if (t == 0 || pr.doc_start[t] != 0)
          for (int64_t e = 0; e < KV; ++e) S[e] = pr.initial[block(doc(t)) + e];
        before[t] = S;
        const double bt = double(pr.beta[idx(b, t, h, 1)]);
        std::vector<double> X(KV), kx(V, 0.0);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) X[i * V + j] = std::exp(gate(b, t, h, i)) * S[i * V + j];
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) kx[j] += double(pr.k[idx(b, t, h, K) + i]) * X[i * V + j];
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j)
            S[i * V + j] = X[i * V + j] + bt * double(pr.k[idx(b, t, h, K) + i]) *
                                              (double(pr.v[idx(b, t, h, V) + j]) - kx[j]);
        after[t] = S;
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < K; ++i) acc += double(pr.q[idx(b, t, h, K) + i]) * S[i * V + j];
          r.o[idx(b, t, h, V) + j] = s.scale * acc;
        }
        if (t == T_ - 1 || pr.doc_start[t + 1] != 0)
          for (int64_t e = 0; e < KV; ++e) r.finals[block(doc(t)) + e] = S[e];
      }
      // BPTT: lam = dLoss/dS_t.
      std::vector<double> lam(KV);
      for (int64_t e = 0; e < KV; ++e) lam[e] = pr.final_dstate[block(doc(T_ - 1)) + e];
      for (int64_t t = T_ - 1; t >= 0; --t) {
        const double bt = double(pr.beta[idx(b, t, h, 1)]);
        std::vector<double> kk(K), qq(K), vv(V), dd(V);
        for (int64_t i = 0; i < K; ++i) kk[i] = double(pr.k[idx(b, t, h, K) + i]), qq[i] = double(pr.q[idx(b, t, h, K) + i]);
        for (int64_t j = 0; j < V; ++j) vv[j] = double(pr.v[idx(b, t, h, V) + j]), dd[j] = double(pr.dout[idx(b, t, h, V) + j]);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) lam[i * V + j] += s.scale * qq[i] * dd[j];
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) acc += after[t][i * V + j] * dd[j];
          r.dq[idx(b, t, h, K) + i] = s.scale * acc;
        }
        std::vector<double> X(KV), kx(V, 0.0), lk(V, 0.0);
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) X[i * V + j] = std::exp(gate(b, t, h, i)) * before[t][i * V + j];
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) {
            kx[j] += kk[i] * X[i * V + j];
            lk[j] += kk[i] * lam[i * V + j];
          }
        // S = X + b k (v - X^T k)^T
        double db = 0;
        for (int64_t j = 0; j < V; ++j) {
          r.dv[idx(b, t, h, V) + j] = bt * lk[j];
          db += lk[j] * (vv[j] - kx[j]);
        }
        r.dbeta[idx(b, t, h, 1)] = db;
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) acc += lam[i * V + j] * (vv[j] - kx[j]) - X[i * V + j] * lk[j];
          r.dk[idx(b, t, h, K) + i] = bt * acc;
        }
        std::vector<double> dX(KV);
        for (int64_t i = 0; i < K; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < V; ++j) {
            dX[i * V + j] = lam[i * V + j] - bt * kk[i] * lk[j];
            acc += dX[i * V + j] * X[i * V + j];
          }
          if (per_key) r.dg[idx(b, t, h, K) + i] = acc;
          else r.dg[idx(b, t, h, 1)] += acc;
        }
        for (int64_t i = 0; i < K; ++i)
          for (int64_t j = 0; j < V; ++j) lam[i * V + j] = std::exp(gate(b, t, h, i)) * dX[i * V + j];
        if (t == 0 || pr.doc_start[t] != 0) {
          for (int64_t e = 0; e < KV; ++e) r.d_initial[block(doc(t)) + e] = lam[e];
          if (t > 0)
            for (int64_t e = 0; e < KV; ++e) lam[e] = pr.final_dstate[block(doc(t - 1)) + e];
        }
      }
    }
  }
  return r;
}

template <typename A>
double max_abs(const std::vector<A>& a) {
  double m = 0;
  for (auto x : a) m = std::max(m, std::abs(double(x)));
  return m;
}

// Global token index of local token t on this rank.
inline int64_t global_token(const PartLayout& l, int64_t global_seqlen, int64_t t) {
  const int64_t part_len = global_seqlen / l.total_parts();
  return l.global_part(static_cast<int>(t / part_len)) * part_len + t % part_len;
}

// [B, T, H, D] rows: local <- global (take) and global <- local (put).
template <typename T>
std::vector<T> take_tokens(const std::vector<T>& global, const PartLayout& l, int64_t B, int64_t T_,
                           int64_t HD) {
  const int64_t local = T_ / l.world_size;
  std::vector<T> out(B * local * HD);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < local; ++t)
      std::copy_n(&global[(b * T_ + global_token(l, T_, t)) * HD], HD, &out[(b * local + t) * HD]);
  return out;
}
template <typename T>
void put_tokens(std::vector<T>& global, const std::vector<T>& local_data, const PartLayout& l,
                int64_t B, int64_t T_, int64_t HD) {
  const int64_t local = T_ / l.world_size;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < local; ++t)
      std::copy_n(&local_data[(b * local + t) * HD], HD, &global[(b * T_ + global_token(l, T_, t)) * HD]);
}

// The rank's slice of a global problem as a problem of its own.
template <typename T>
DeltaProblem<T> local_problem(const DeltaProblem<T>& global, const PartLayout& l) {
  const DeltaSpec& s = global.spec;
  DeltaProblem<T> out = global;
  out.spec.seqlen = s.seqlen / l.world_size;
  const int64_t gk = s.gate_kind == GateKind::kPerKey ? s.dim_k : 1;
  out.q = take_tokens(global.q, l, s.batch, s.seqlen, s.heads * s.dim_k);
  out.k = take_tokens(global.k, l, s.batch, s.seqlen, s.heads * s.dim_k);
  out.v = take_tokens(global.v, l, s.batch, s.seqlen, s.heads * s.dim_v);
  out.dout = take_tokens(global.dout, l, s.batch, s.seqlen, s.heads * s.dim_v);
  out.g = take_tokens(global.g, l, s.batch, s.seqlen, s.heads * gk);
  out.beta = take_tokens(global.beta, l, s.batch, s.seqlen, s.heads);
  out.doc_start = take_tokens(global.doc_start, l, 1, s.seqlen, 1);
  out.doc_id = take_tokens(global.doc_id, l, 1, s.seqlen, 1);
  // spec.doc_starts keeps the global list: packed-ness and the document count.
  return out;
}

// max |a - b| / max |b|
template <typename A, typename B>
double rel_error(const std::vector<A>& a, const std::vector<B>& b) {
  double diff = 0, scale = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

}  // namespace lasp2::delta::testing
