// The independent reference: the step-by-step recurrence S_t = a_t S_{t-1} + k v^T,
// o_t = scale q_t^T S_t in float64, and its hand-written backward (BPTT). Optionally
// with a state entering token 0 (h0, [B*H*dk*dv]) and the gradient of the state after
// the last token (dfinal); a document start resets the state to zero. With
// per_document (packed documents, B = 1), h0 and dfinal hold one state per document
// [N][H*dk*dv]: a document starts from its own h0 (its first token's decay applies to
// it, as in fla), final_state / initial_grad are per document too.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "problem.h"

namespace lasp2::testing {

struct ReferenceGrads {
  std::vector<double> o, dq, dk, dv, dg;
  std::vector<double> final_state, initial_grad;  // [B*H*dk*dv]
};

template <typename T>
ReferenceGrads recurrent_reference(const Problem<T>& pr, const std::vector<float>* h0 = nullptr,
                                   const std::vector<float>* dfinal = nullptr,
                                   bool per_document = false) {
  const auto& s = pr.spec;
  const AttentionParams p = pr.params();
  const int64_t dk = s.dim_k, dv = s.dim_v, T_ = s.seqlen;
  ReferenceGrads r;
  r.o.assign(pr.v.size(), 0);
  r.dq.assign(pr.q.size(), 0);
  r.dk.assign(pr.k.size(), 0);
  r.dv.assign(pr.v.size(), 0);
  r.dg.assign(pr.gate.size(), 0);
  const int64_t docs = per_document ? 1 + static_cast<int64_t>(s.doc_starts.size()) : 1;
  r.final_state.assign(docs * s.batch * s.heads * dk * dv, 0);
  r.initial_grad.assign(docs * s.batch * s.heads * dk * dv, 0);
  // Document of token t and the offset of document d's (b, h) state (per_document: B = 1).
  std::vector<int64_t> doc_of(T_, 0);
  for (int64_t t = 1; t < T_; ++t) doc_of[t] = doc_of[t - 1] + (per_document && p.starts_doc(0, t) ? 1 : 0);
  auto doc_block = [&](int64_t d, int64_t b, int64_t h) { return ((d * s.batch + b) * s.heads + h) * dk * dv; };
  auto last_of_doc = [&](int64_t t) { return t == T_ - 1 || (per_document && p.starts_doc(0, t + 1)); };
  auto at = [&](int64_t b, int64_t t, int64_t h, int64_t d) { return ((b * T_ + t) * s.heads + h) * d; };
  for (int64_t b = 0; b < s.batch; ++b) {
    for (int64_t h = 0; h < s.heads; ++h) {
      // states[t+1] = S_t, states[0] = zero initial state
      std::vector<std::vector<double>> states(T_ + 1, std::vector<double>(dk * dv, 0.0));
      const int64_t block = (b * s.heads + h) * dk * dv;
      // The state token t starts from: S_{t-1}, or its document's own initial state.
      std::vector<std::vector<double>> doc_h0(docs, std::vector<double>(dk * dv, 0.0));
      if (per_document && h0 != nullptr)
        for (int64_t d = 0; d < docs; ++d)
          for (int64_t e = 0; e < dk * dv; ++e) doc_h0[d][e] = (*h0)[doc_block(d, b, h) + e];
      auto entering = [&](int64_t t) -> const std::vector<double>& {
        return per_document && t > 0 && p.starts_doc(b, t) ? doc_h0[doc_of[t]] : states[t];
      };
      if (h0 != nullptr)
        for (int64_t e = 0; e < dk * dv; ++e) states[0][e] = (*h0)[block + e];
      for (int64_t t = 0; t < T_; ++t) {
        const bool reset = p.starts_doc(b, t) && !per_document;
        const double a = reset ? 0.0 : std::exp(static_cast<double>(p.decay.at(b, t, h)));
        auto& S = states[t + 1];
        const auto& prev = entering(t);
        for (int64_t i = 0; i < dk; ++i)
          for (int64_t j = 0; j < dv; ++j)
            S[i * dv + j] = a * prev[i * dv + j] + double(pr.k[at(b, t, h, dk) + i]) * double(pr.v[at(b, t, h, dv) + j]);
        for (int64_t j = 0; j < dv; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < dk; ++i) acc += double(pr.q[at(b, t, h, dk) + i]) * S[i * dv + j];
          r.o[at(b, t, h, dv) + j] = s.scale * acc;
        }
      }
      for (int64_t t = 0; t < T_; ++t)
        if (last_of_doc(t))
          for (int64_t e = 0; e < dk * dv; ++e) r.final_state[doc_block(doc_of[t], b, h) + e] = states[t + 1][e];
      std::vector<double> dS(dk * dv, 0.0);
      for (int64_t t = T_ - 1; t >= 0; --t) {
        if (dfinal != nullptr && last_of_doc(t))
          for (int64_t e = 0; e < dk * dv; ++e) dS[e] += (*dfinal)[doc_block(doc_of[t], b, h) + e];
        for (int64_t i = 0; i < dk; ++i)
          for (int64_t j = 0; j < dv; ++j)
            dS[i * dv + j] += s.scale * double(pr.q[at(b, t, h, dk) + i]) * double(pr.dout[at(b, t, h, dv) + j]);
        const auto& S = states[t + 1];
        for (int64_t i = 0; i < dk; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < dv; ++j) acc += S[i * dv + j] * double(pr.dout[at(b, t, h, dv) + j]);
          r.dq[at(b, t, h, dk) + i] = s.scale * acc;
        }
        for (int64_t i = 0; i < dk; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < dv; ++j) acc += dS[i * dv + j] * double(pr.v[at(b, t, h, dv) + j]);
          r.dk[at(b, t, h, dk) + i] = acc;
        }
        for (int64_t j = 0; j < dv; ++j) {
          double acc = 0;
          for (int64_t i = 0; i < dk; ++i) acc += dS[i * dv + j] * double(pr.k[at(b, t, h, dk) + i]);
          r.dv[at(b, t, h, dv) + j] = acc;
        }
        const bool reset = p.starts_doc(b, t) && !per_document;
        const double a = reset ? 0.0 : std::exp(static_cast<double>(p.decay.at(b, t, h)));
        double da = 0;
        for (int64_t e = 0; e < dk * dv; ++e) da += dS[e] * entering(t)[e];
        r.dg[(b * T_ + t) * s.heads + h] = reset ? 0.0 : a * da;
        for (auto& e : dS) e *= a;
        if (per_document && t > 0 && p.starts_doc(b, t)) {  // the document's initial state
          for (int64_t e = 0; e < dk * dv; ++e) r.initial_grad[doc_block(doc_of[t], b, h) + e] = dS[e];
          std::fill(dS.begin(), dS.end(), 0.0);
        }
      }
      for (int64_t e = 0; e < dk * dv; ++e) r.initial_grad[block + e] = dS[e];
    }
  }
  return r;
}

}  // namespace lasp2::testing
