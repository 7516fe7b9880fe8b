// CPU kernels of the delta-rule family (see delta_backend.h): the part summary
// and the output pass in the chunked WY form (delta_chunk.h), and the backward as
// a chunk-checkpointed exact reverse sweep: the state entering each chunk is
// kept from a forward pass, the chunk's token states are recomputed from it, and
// the adjoint runs back through the tokens (fp32 accumulation for fp32 inputs,
// fp64 for fp64). The CPU path is the reference-grade path CI runs.
#include "delta_rule/cpu/delta_cpu.h"

#include "delta_rule/cpu/delta_chunk.h"

namespace lasp2::delta::cpu {
namespace {

int64_t bh_index(const DeltaParams& p, int64_t b, int64_t h) { return b * p.heads + h; }
int64_t doc_index(const DeltaParams& p, int64_t doc, int64_t h) { return doc * p.heads + h; }

// The state a document starting at token t begins from (its initial state or zero).
template <typename Acc>
void reset_state(const DeltaParams& p, const DocStates& doc, int64_t b, int64_t t, int64_t h,
                 Mat<Acc>& S) {
  const float* init =
      doc.initial ? doc.initial + doc_index(p, p.doc_of(b, t), h) * p.state_elems() : nullptr;
  load_state(S, init, p.state_elems());
}

// X = D_t S (the decayed state the delta update of token t acts on).
template <typename Acc>
void decay_state(const DeltaParams& p, int64_t b, int64_t t, int64_t h, const Mat<Acc>& S,
                 Mat<Acc>& X) {
  X.resize(S.size());
  for (int64_t i = 0; i < p.dim_k; ++i) {
    const Acc a = std::exp(static_cast<Acc>(p.gate(b, t, h, i)));
    for (int64_t j = 0; j < p.dim_v; ++j) X[i * p.dim_v + j] = a * S[i * p.dim_v + j];
  }
}

// One token of the recurrence: S <- (I - beta k k^T) D_t S + beta k v^T.
template <typename T, typename Acc>
void token_step(const DeltaParams& p, int64_t b, int64_t t, int64_t h, Mat<Acc>& S) {
  const int64_t dk = p.dim_k, dv = p.dim_v;
  const T* kt = row<T>(p.k, b, t, h);
  const T* vt = row<T>(p.v, b, t, h);
  const Acc beta = static_cast<Acc>(p.beta_at(b, t, h));
  Mat<Acc> X;
  decay_state(p, b, t, h, S, X);
  std::vector<Acc> kx(dv, Acc(0));  // X^T k
  for (int64_t i = 0; i < dk; ++i)
    for (int64_t j = 0; j < dv; ++j) kx[j] += static_cast<Acc>(kt[i]) * X[i * dv + j];
  for (int64_t i = 0; i < dk; ++i) {
    const Acc bk = beta * static_cast<Acc>(kt[i]);
    for (int64_t j = 0; j < dv; ++j)
      S[i * dv + j] = X[i * dv + j] + bk * (static_cast<Acc>(vt[j]) - kx[j]);
  }
}

// The first document start of row b inside the part (part.end when none).
int64_t first_doc_start(const DeltaParams& p, int64_t b, TokenRange part) {
  for (int64_t t = part.begin; t < part.end; ++t)
    if (p.starts_doc(b, t)) return t;
  return part.end;
}

}  // namespace

template <typename T>
void part_summary(const DeltaParams& p, TokenRange part, const DocStates& doc, float* A_out,
                  float* M_out, float* head_A, float* head_M) {
  using Acc = T;
  const int64_t dk = p.dim_k, se = p.state_elems(), me = p.map_elems();
  WYChunk<T> chunk;
  for (int64_t b = 0; b < p.batch; ++b) {
    const std::vector<Chunk> chunks = chunks_of(p, b, part);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t bh = bh_index(p, b, h);
      Mat<Acc> A(me, Acc(0)), M(se, Acc(0));
      for (int64_t i = 0; i < dk; ++i) A[i * dk + i] = Acc(1);
      bool reset_seen = false;
      for (const Chunk& c : chunks) {
        if (p.starts_doc(b, c.begin)) {
          if (!reset_seen) {  // the head ends here: its map is the one so far
            store_state(A, head_A + bh * me);
            store_state(M, head_M + bh * se);
          } else if (doc.finals != nullptr) {  // a document begun and ended in the part
            store_state(M, doc.finals + doc_index(p, p.doc_of(b, c.begin - 1), h) * se);
          }
          reset_seen = true;
          std::fill(A.begin(), A.end(), Acc(0));
          reset_state(p, doc, b, c.begin, h, M);
        }
        chunk.load(p, b, h, c);
        if (!reset_seen) chunk.compose_map(A);  // after a reset A stays exactly 0
        chunk.advance(p, M, b, h, c.begin, nullptr);
      }
      if (!reset_seen) {
        store_state(A, head_A + bh * me);
        store_state(M, head_M + bh * se);
      }
      store_state(A, A_out + bh * me);
      store_state(M, M_out + bh * se);
    }
  }
}

template <typename T>
void forward(const DeltaParams& p, TokenRange part, const float* entering, const DocStates& doc,
             MutView o) {
  using Acc = T;
  const int64_t se = p.state_elems();
  WYChunk<T> chunk;
  Mat<Acc> S;
  for (int64_t b = 0; b < p.batch; ++b) {
    const std::vector<Chunk> chunks = chunks_of(p, b, part);
    for (int64_t h = 0; h < p.heads; ++h) {
      load_state(S, entering ? entering + bh_index(p, b, h) * se : nullptr, se);
      for (const Chunk& c : chunks) {
        if (p.starts_doc(b, c.begin)) reset_state(p, doc, b, c.begin, h, S);
        chunk.load(p, b, h, c);
        chunk.advance(p, S, b, h, c.begin, &o);
      }
    }
  }
}

template <typename T>
void entering_dstate(const DeltaParams& p, TokenRange part, ConstView dout, float* dentering) {
  using Acc = T;
  const int64_t dk = p.dim_k, dv = p.dim_v, se = p.state_elems();
  Mat<Acc> lam;
  std::vector<Acc> lk(dv);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t head_end = first_doc_start(p, b, part);
    for (int64_t h = 0; h < p.heads; ++h) {
      lam.assign(se, Acc(0));
      for (int64_t t = head_end - 1; t >= part.begin; --t) {
        const T* qt = row<T>(p.q, b, t, h);
        const T* kt = row<T>(p.k, b, t, h);
        const T* dot = row<T>(dout, b, t, h);
        const Acc beta = static_cast<Acc>(p.beta_at(b, t, h));
        for (int64_t i = 0; i < dk; ++i)
          for (int64_t j = 0; j < dv; ++j)
            lam[i * dv + j] += static_cast<Acc>(p.scale) * static_cast<Acc>(qt[i]) * static_cast<Acc>(dot[j]);
        // lam <- D_t (I - beta k k^T) lam
        std::fill(lk.begin(), lk.end(), Acc(0));
        for (int64_t i = 0; i < dk; ++i)
          for (int64_t j = 0; j < dv; ++j) lk[j] += static_cast<Acc>(kt[i]) * lam[i * dv + j];
        for (int64_t i = 0; i < dk; ++i) {
          const Acc a = std::exp(static_cast<Acc>(p.gate(b, t, h, i)));
          const Acc bk = beta * static_cast<Acc>(kt[i]);
          for (int64_t j = 0; j < dv; ++j) lam[i * dv + j] = a * (lam[i * dv + j] - bk * lk[j]);
        }
      }
      store_state(lam, dentering + bh_index(p, b, h) * se);
    }
  }
}

template <typename T>
void backward(const DeltaParams& p, TokenRange part, ConstView dout, const float* entering,
              const float* leaving_dstate, const DocStates& doc, MutView dq, MutView dk_out,
              MutView dv_out, void* dg, void* dbeta, float* dentering) {
  using Acc = T;
  const int64_t dk = p.dim_k, dv = p.dim_v, se = p.state_elems();
  const Acc scale = static_cast<Acc>(p.scale);
  const bool per_key = p.gate_kind == GateKind::kPerKey;
  WYChunk<T> chunk;
  Mat<Acc> S, lam, X, dX;
  std::vector<Acc> kx(dv), lk(dv), tmp(dk);
  for (int64_t b = 0; b < p.batch; ++b) {
    const std::vector<Chunk> chunks = chunks_of(p, b, part);
    for (int64_t h = 0; h < p.heads; ++h) {
      const int64_t bh = bh_index(p, b, h);
      // States entering each chunk (after a document reset), from the WY pass.
      std::vector<Mat<Acc>> checkpoints(chunks.size());
      load_state(S, entering ? entering + bh * se : nullptr, se);
      for (size_t ci = 0; ci < chunks.size(); ++ci) {
        if (p.starts_doc(b, chunks[ci].begin)) reset_state(p, doc, b, chunks[ci].begin, h, S);
        checkpoints[ci] = S;
        chunk.load(p, b, h, chunks[ci]);
        chunk.advance(p, S, b, h, chunks[ci].begin, nullptr);
      }
      load_state(lam, leaving_dstate ? leaving_dstate + bh * se : nullptr, se);
      for (size_t ci = chunks.size(); ci-- > 0;) {
        const Chunk c = chunks[ci];
        std::vector<Mat<Acc>> states(c.length() + 1);  // states[x] enters token c.begin + x
        states[0] = checkpoints[ci];
        for (int64_t x = 0; x < c.length(); ++x) {
          states[x + 1] = states[x];
          token_step<T>(p, b, c.begin + x, h, states[x + 1]);
        }
        for (int64_t x = c.length() - 1; x >= 0; --x) {
          const int64_t t = c.begin + x;
          const T* qt = row<T>(p.q, b, t, h);
          const T* kt = row<T>(p.k, b, t, h);
          const T* vt = row<T>(p.v, b, t, h);
          const T* dot = row<T>(dout, b, t, h);
          const Acc beta = static_cast<Acc>(p.beta_at(b, t, h));
          const Mat<Acc>& St = states[x + 1];
          // dS_t += scale q_t do_t^T; dq_t = scale S_t do_t
          T* dqt = row<T>(dq, b, t, h);
          for (int64_t i = 0; i < dk; ++i) {
            Acc s = 0;
            for (int64_t j = 0; j < dv; ++j) {
              lam[i * dv + j] += scale * static_cast<Acc>(qt[i]) * static_cast<Acc>(dot[j]);
              s += St[i * dv + j] * static_cast<Acc>(dot[j]);
            }
            dqt[i] = static_cast<T>(scale * s);
          }
          // S_t = X - beta k (X^T k)^T + beta k v^T with X = D_t S_{t-1}
          decay_state(p, b, t, h, states[x], X);
          std::fill(kx.begin(), kx.end(), Acc(0));
          std::fill(lk.begin(), lk.end(), Acc(0));
          for (int64_t i = 0; i < dk; ++i)
            for (int64_t j = 0; j < dv; ++j) {
              kx[j] += static_cast<Acc>(kt[i]) * X[i * dv + j];
              lk[j] += static_cast<Acc>(kt[i]) * lam[i * dv + j];
            }
          T* dvt = row<T>(dv_out, b, t, h);
          Acc db = 0;
          for (int64_t j = 0; j < dv; ++j) {
            dvt[j] = static_cast<T>(beta * lk[j]);
            db += lk[j] * (static_cast<Acc>(vt[j]) - kx[j]);
          }
          T* dkt = row<T>(dk_out, b, t, h);
          for (int64_t i = 0; i < dk; ++i) {
            Acc s = 0;
            for (int64_t j = 0; j < dv; ++j)
              s += lam[i * dv + j] * (static_cast<Acc>(vt[j]) - kx[j]) - X[i * dv + j] * lk[j];
            dkt[i] = static_cast<T>(beta * s);
          }
          const int64_t bth = (b * p.seqlen + t) * p.heads + h;
          if (dbeta != nullptr) store_real(dbeta, p.gate_dtype, bth, db);
          // dX = lam - beta k lk^T; dg_i = <dX_i, X_i>; lam <- D_t dX
          dX.resize(se);
          Acc dg_sum = 0;
          for (int64_t i = 0; i < dk; ++i) {
            const Acc bk = beta * static_cast<Acc>(kt[i]);
            Acc s = 0;
            for (int64_t j = 0; j < dv; ++j) {
              dX[i * dv + j] = lam[i * dv + j] - bk * lk[j];
              s += dX[i * dv + j] * X[i * dv + j];
            }
            tmp[i] = s;
            dg_sum += s;
          }
          if (dg != nullptr) {
            if (per_key) {
              for (int64_t i = 0; i < dk; ++i) store_real(dg, p.gate_dtype, bth * dk + i, tmp[i]);
            } else {
              store_real(dg, p.gate_dtype, bth, dg_sum);
            }
          }
          for (int64_t i = 0; i < dk; ++i) {
            const Acc a = std::exp(static_cast<Acc>(p.gate(b, t, h, i)));
            for (int64_t j = 0; j < dv; ++j) lam[i * dv + j] = a * dX[i * dv + j];
          }
        }
        if (p.starts_doc(b, c.begin)) {
          // lam is the gradient of this document's initial state; before the start
          // lies the end of the previous document, with its own gradient.
          const int64_t d = p.doc_of(b, c.begin);
          if (doc.d_initial != nullptr) store_state(lam, doc.d_initial + doc_index(p, d, h) * se);
          const float* prev = nullptr;
          if (doc.final_dstate != nullptr && c.begin > part.begin)
            prev = doc.final_dstate + doc_index(p, p.doc_of(b, c.begin - 1), h) * se;
          load_state(lam, prev, se);
        }
      }
      if (dentering != nullptr) store_state(lam, dentering + bh * se);
    }
  }
}

#define LASP2_DELTA_INSTANTIATE(T)                                                              \
  template void part_summary<T>(const DeltaParams&, TokenRange, const DocStates&, float*,       \
                                float*, float*, float*);                                        \
  template void forward<T>(const DeltaParams&, TokenRange, const float*, const DocStates&,      \
                           MutView);                                                            \
  template void entering_dstate<T>(const DeltaParams&, TokenRange, ConstView, float*);          \
  template void backward<T>(const DeltaParams&, TokenRange, ConstView, const float*,            \
                            const float*, const DocStates&, MutView, MutView, MutView, void*,   \
                            void*, float*);
LASP2_DELTA_INSTANTIATE(float)
LASP2_DELTA_INSTANTIATE(double)

}  // namespace lasp2::delta::cpu
