// The schedules over a family whose maps do not commute: S_t = A_t S_{t-1} + k_t v_t^T,
// o_t = q_t^T S_t with a dense d_k x d_k A_t per token (the shape of the delta rule's
// summaries). Scalar decays commute, so only a family like this one catches a fold
// applied in the wrong order or without its transpose. Every family call is a plain
// step-by-step loop; the schedules must compose them into the single-device result,
// with and without an initial state, a final state and its gradient.
#include <gtest/gtest.h>

#include <mutex>
#include <random>

#include "lasp2/copy_rows.h"
#include "lasp2/lasp1.h"
#include "lasp2/lasp2.h"
#include "local_slice.h"
#include "thread_communicator.h"

namespace lasp2::testing {
namespace {

struct AffineData {
  int64_t batch = 2, seqlen = 0, heads = 2, dk = 3, dv = 2;
  std::vector<double> q, k, v, a, dout;  // [B, T, H, D]; a holds dk*dk per token
};

AffineData random_data(int64_t seqlen, uint32_t seed) {
  AffineData d;
  d.seqlen = seqlen;
  std::mt19937 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto fill = [&](std::vector<double>& x, int64_t width, double scale) {
    x.resize(d.batch * seqlen * d.heads * width);
    for (auto& e : x) e = scale * normal(rng);
  };
  fill(d.q, d.dk, 0.5);
  fill(d.k, d.dk, 0.5);
  fill(d.v, d.dv, 0.5);
  fill(d.dout, d.dv, 0.5);
  fill(d.a, d.dk * d.dk, 0.35);  // contracting on average: states stay O(1)
  return d;
}

// The family over host arrays of one rank. States are [B*H][dk][dv], maps [B*H][dk][dk].
class AffineFamily final : public PartFamily {
 public:
  AffineFamily(const AffineData& d, std::vector<double>* o) : d_(d), o_(o) {}
  AffineFamily(const AffineData& d, std::vector<double>* dq, std::vector<double>* dk,
               std::vector<double>* dv)
      : d_(d), dq_(dq), dk_(dk), dv_(dv) {}

  SummaryShape shape() const override { return {bh() * d_.dk * d_.dv, bh() * d_.dk * d_.dk}; }
  int64_t local_tokens() const override { return d_.seqlen; }
  Device device() const override { return Device::kCPU; }

  void summarize(TokenRange part, const DocStates&, const PartSummary& out, void*) const override {
    float *state = out.state, *map = out.map;
    for (int64_t r = 0; r < bh(); ++r) {
      std::vector<double> S(d_.dk * d_.dv, 0.0), A = identity();
      for (int64_t t = part.begin; t < part.end; ++t) {
        step(r, t, S);
        A = matmul(at(d_.a, r, t, d_.dk * d_.dk), A.data(), d_.dk, d_.dk, d_.dk);
      }
      store(S, state + r * d_.dk * d_.dv);
      store(A, map + r * d_.dk * d_.dk);
    }
  }
  void combine_prefix(const std::vector<const float*>& states, const float* maps, int target,
                      float* out, void*) const override {
    fold(states, maps, 0, target, false, out);
  }
  void forward(TokenRange part, const float* entering, const DocStates&, void*) const override {
    for (int64_t r = 0; r < bh(); ++r) {
      std::vector<double> S = load(entering, r);
      for (int64_t t = part.begin; t < part.end; ++t) {
        step(r, t, S);
        const double* q = at(d_.q, r, t, d_.dk);
        double* o = at(*o_, r, t, d_.dv);
        for (int64_t j = 0; j < d_.dv; ++j) {
          o[j] = 0;
          for (int64_t i = 0; i < d_.dk; ++i) o[j] += q[i] * S[i * d_.dv + j];
        }
      }
    }
  }

  void entering_grad(TokenRange part, float* dstate, void*) const override {
    for (int64_t r = 0; r < bh(); ++r) {
      std::vector<double> dS(d_.dk * d_.dv, 0.0);
      for (int64_t t = part.end - 1; t >= part.begin; --t) back_step(r, t, dS, nullptr);
      store(dS, dstate + r * d_.dk * d_.dv);
    }
  }
  void combine_suffix(const std::vector<const float*>& dstates, const float* maps, int target,
                      float* out, void*) const override {
    fold(dstates, maps, target + 1, static_cast<int>(dstates.size()), true, out);
  }
  void backward(TokenRange part, const PartStates& s, const DocStates&, void*, void*) const override {
    for (int64_t r = 0; r < bh(); ++r) {
      std::vector<std::vector<double>> S(part.length() + 1);  // S[x] enters token begin + x
      S[0] = load(s.entering, r);
      for (int64_t x = 0; x < part.length(); ++x) {
        S[x + 1] = S[x];
        step(r, part.begin + x, S[x + 1]);
      }
      std::vector<double> dS = load(s.leaving_grad, r);
      for (int64_t x = part.length() - 1; x >= 0; --x) {
        back_step(r, part.begin + x, dS, &S[x + 1]);
      }
    }
  }

  void copy(float* dst, const float* src, int64_t count, void*) const override {
    std::copy_n(src, count, dst);
  }
  void fill_zero(float* dst, int64_t count, void*) const override { std::fill_n(dst, count, 0.f); }
  void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const override {
    copy_rows_one_by_one(*this, dst, rows, count, stream);
  }
  void add(float* dst, const float* src, int64_t count, void*) const override {
    for (int64_t i = 0; i < count; ++i) dst[i] += src[i];
  }

 private:
  int64_t bh() const { return d_.batch * d_.heads; }
  // Row r = b * H + h of a [B, T, H, width] array at token t.
  template <typename V>
  auto at(V& x, int64_t r, int64_t t, int64_t width) const -> decltype(&x[0]) {
    const int64_t b = r / d_.heads, h = r % d_.heads;
    return &x[((b * d_.seqlen + t) * d_.heads + h) * width];
  }
  std::vector<double> identity() const {
    std::vector<double> I(d_.dk * d_.dk, 0.0);
    for (int64_t i = 0; i < d_.dk; ++i) I[i * d_.dk + i] = 1.0;
    return I;
  }
  // (n x m) * (m x p), row-major.
  static std::vector<double> matmul(const double* a, const double* b, int64_t n, int64_t m, int64_t p) {
    std::vector<double> c(n * p, 0.0);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t l = 0; l < m; ++l)
        for (int64_t j = 0; j < p; ++j) c[i * p + j] += a[i * m + l] * b[l * p + j];
    return c;
  }
  std::vector<double> load(const float* src, int64_t r) const {
    std::vector<double> S(d_.dk * d_.dv, 0.0);
    if (src != nullptr)
      for (int64_t e = 0; e < d_.dk * d_.dv; ++e) S[e] = src[r * d_.dk * d_.dv + e];
    return S;
  }
  static void store(const std::vector<double>& x, float* dst) {
    for (size_t e = 0; e < x.size(); ++e) dst[e] = static_cast<float>(x[e]);
  }
  // S <- A_t S + k_t v_t^T
  void step(int64_t r, int64_t t, std::vector<double>& S) const {
    S = matmul(at(d_.a, r, t, d_.dk * d_.dk), S.data(), d_.dk, d_.dk, d_.dv);
    const double *k = at(d_.k, r, t, d_.dk), *v = at(d_.v, r, t, d_.dv);
    for (int64_t i = 0; i < d_.dk; ++i)
      for (int64_t j = 0; j < d_.dv; ++j) S[i * d_.dv + j] += k[i] * v[j];
  }
  // dS (gradient of S_t) gains q_t dO_t^T; with S_t given, writes dq, dk, dv of token t;
  // then dS <- A_t^T dS (the gradient of S_{t-1}).
  void back_step(int64_t r, int64_t t, std::vector<double>& dS, const std::vector<double>* S) const {
    const double *q = at(d_.q, r, t, d_.dk), *dout = at(d_.dout, r, t, d_.dv);
    for (int64_t i = 0; i < d_.dk; ++i)
      for (int64_t j = 0; j < d_.dv; ++j) dS[i * d_.dv + j] += q[i] * dout[j];
    if (S != nullptr) {
      const double *k = at(d_.k, r, t, d_.dk), *v = at(d_.v, r, t, d_.dv);
      double *dq = at(*dq_, r, t, d_.dk), *dk = at(*dk_, r, t, d_.dk), *dv = at(*dv_, r, t, d_.dv);
      for (int64_t i = 0; i < d_.dk; ++i) {
        dq[i] = dk[i] = 0;
        for (int64_t j = 0; j < d_.dv; ++j) {
          dq[i] += (*S)[i * d_.dv + j] * dout[j];
          dk[i] += dS[i * d_.dv + j] * v[j];
        }
      }
      for (int64_t j = 0; j < d_.dv; ++j) {
        dv[j] = 0;
        for (int64_t i = 0; i < d_.dk; ++i) dv[j] += dS[i * d_.dv + j] * k[i];
      }
    }
    const double* A = at(d_.a, r, t, d_.dk * d_.dk);
    std::vector<double> next(d_.dk * d_.dv, 0.0);
    for (int64_t i = 0; i < d_.dk; ++i)
      for (int64_t l = 0; l < d_.dk; ++l)
        for (int64_t j = 0; j < d_.dv; ++j) next[i * d_.dv + j] += A[l * d_.dk + i] * dS[l * d_.dv + j];
    dS = next;
  }
  // Prefix: acc = A_m acc + M_m for m in [from, to). Suffix: acc = A_m^T acc + M_m for m
  // from to-1 down to from.
  void fold(const std::vector<const float*>& states, const float* maps, int from, int to,
            bool suffix, float* out) const {
    const int64_t se = d_.dk * d_.dv, me = d_.dk * d_.dk, map_floats = bh() * me;
    for (int64_t r = 0; r < bh(); ++r) {
      std::vector<double> acc(se, 0.0), next(se);
      for (int i = 0; i < to - from; ++i) {
        const int m = suffix ? to - 1 - i : from + i;
        const float* A = maps + m * map_floats + r * me;
        std::fill(next.begin(), next.end(), 0.0);
        for (int64_t a = 0; a < d_.dk; ++a)
          for (int64_t l = 0; l < d_.dk; ++l) {
            const double w = suffix ? A[l * d_.dk + a] : A[a * d_.dk + l];
            for (int64_t j = 0; j < d_.dv; ++j) next[a * d_.dv + j] += w * acc[l * d_.dv + j];
          }
        for (int64_t e = 0; e < se; ++e) acc[e] = next[e] + states[m][r * se + e];
      }
      store(acc, out + r * se);
    }
  }

  const AffineData& d_;
  std::vector<double>* o_ = nullptr;
  std::vector<double>*dq_ = nullptr, *dk_ = nullptr, *dv_ = nullptr;
};

AffineData local_data(const AffineData& g, const PartLayout& l) {
  AffineData d = g;
  d.seqlen = g.seqlen / l.world_size;
  d.q = take_tokens(g.q, l, g.batch, g.seqlen, g.heads, g.dk);
  d.k = take_tokens(g.k, l, g.batch, g.seqlen, g.heads, g.dk);
  d.v = take_tokens(g.v, l, g.batch, g.seqlen, g.heads, g.dv);
  d.a = take_tokens(g.a, l, g.batch, g.seqlen, g.heads, g.dk * g.dk);
  d.dout = take_tokens(g.dout, l, g.batch, g.seqlen, g.heads, g.dv);
  return d;
}

struct Results {
  std::vector<double> o, dq, dk, dv;
  std::vector<float> final_state, initial_grad;
};

// One device, one part, one step-by-step pass: the reference.
Results single_device(const AffineData& d, const std::vector<float>* h0, const std::vector<float>* dfinal) {
  Results r{std::vector<double>(d.v.size()), std::vector<double>(d.q.size()),
            std::vector<double>(d.k.size()), std::vector<double>(d.v.size()), {}, {}};
  const TokenRange all{0, d.seqlen};
  const int64_t state = d.batch * d.heads * d.dk * d.dv;
  r.final_state.assign(state, 0.f);
  r.initial_grad.assign(state, 0.f);
  AffineFamily fwd(d, &r.o);
  fwd.forward(all, h0 ? h0->data() : nullptr, DocStates{}, nullptr);
  // final = A_all h0 + M_all; d h0 = A_all^T dfinal + dP_0
  std::vector<float> M(state), A(d.batch * d.heads * d.dk * d.dk);
  std::vector<float> head(M.size() + A.size());
  fwd.summarize(all, DocStates{}, {M.data(), A.data(), head.data(), head.data() + M.size(), false}, nullptr);
  std::vector<float> A2(3 * A.size(), 0.f);
  std::copy(A.begin(), A.end(), A2.begin() + A.size());
  std::vector<float> zero(state, 0.f);
  fwd.combine_prefix({h0 ? h0->data() : zero.data(), M.data()}, A2.data(), 2, r.final_state.data(), nullptr);
  AffineFamily bwd(d, &r.dq, &r.dk, &r.dv);
  std::vector<float> dP(state);
  bwd.entering_grad(all, dP.data(), nullptr);
  bwd.combine_suffix({dP.data(), dP.data(), dfinal ? dfinal->data() : zero.data()}, A2.data(), 0,
                     r.initial_grad.data(), nullptr);
  PartStates s;
  s.entering = h0 ? h0->data() : nullptr;
  s.leaving_grad = dfinal ? dfinal->data() : nullptr;
  bwd.backward(all, s, DocStates{}, nullptr, nullptr);
  return r;
}

struct FamilyCase {
  int world;
  bool balanced;
  bool lasp1;
  bool with_states;
};

std::string family_name(const ::testing::TestParamInfo<FamilyCase>& info) {
  const auto& c = info.param;
  return std::string(c.lasp1 ? "lasp1_" : "lasp2_") + "P" + std::to_string(c.world) +
         (c.balanced ? "_balanced" : "_contiguous") + (c.with_states ? "_states" : "");
}

class MatrixMapFamily : public ::testing::TestWithParam<FamilyCase> {};

TEST_P(MatrixMapFamily, RanksMatchSingleDevice) {
  const FamilyCase c = GetParam();
  const AffineData global = random_data(2 * c.world * 3, 77);
  const int64_t state = global.batch * global.heads * global.dk * global.dv;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal;
  std::vector<float> h0(state), dfinal(state);
  for (auto& x : h0) x = normal(rng);
  for (auto& x : dfinal) x = normal(rng);
  const Results want = single_device(global, c.with_states ? &h0 : nullptr, c.with_states ? &dfinal : nullptr);

  Results got{std::vector<double>(global.v.size()), std::vector<double>(global.q.size()),
              std::vector<double>(global.k.size()), std::vector<double>(global.v.size()), {}, {}};
  std::vector<double> initial_grad_sum(state, 0.0);
  const double weight_sum = c.world * (c.world + 1) / 2.0;
  std::mutex mu;
  run_ranks(c.world, [&](int rank, ThreadCommunicator& comm) {
    const PartLayout layout = c.balanced ? PartLayout::balanced(c.world, rank) : PartLayout::contiguous(c.world, rank);
    const AffineData local = local_data(global, layout);
    std::vector<double> o(local.v.size()), dq(local.q.size()), dk(local.k.size()), dv(local.v.size());
    const AffineFamily fwd(local, &o), bwd(local, &dq, &dk, &dv);
    const SummaryShape sh = fwd.shape();
    std::vector<float> final_state(state, -1.f), initial_grad(state, 0.f), my_dfinal(dfinal);
    for (auto& x : my_dfinal) x = static_cast<float>(x * (rank + 1) / weight_sum);  // this rank's share
    SequenceStates seq;
    if (c.with_states) {
      seq.initial = h0.data();
      seq.final_state = final_state.data();
      seq.final_grad = my_dfinal.data();
      seq.initial_grad = initial_grad.data();
    }
    if (c.lasp1) {
      std::vector<float> entering(Lasp1Saved::entering_state_floats(sh)), record(Lasp1Saved::local_record_floats(sh));
      const Lasp1Saved saved{entering.data(), record.data()};
      Workspace fws(lasp1_forward_workspace_bytes(fwd, layout)), bws(lasp1_backward_workspace_bytes(bwd, layout));
      lasp1_forward(fwd, &comm, layout, saved, fws.data(), nullptr);
      lasp1_backward(bwd, &comm, layout, saved, bws.data(), nullptr);
    } else {
      std::vector<float> records(Lasp2Saved::local_records_floats(sh, layout));
      std::vector<float> prefixes(Lasp2Saved::prefix_states_floats(sh, layout));
      std::vector<float> maps(Lasp2Saved::maps_floats(sh, layout));
      const Lasp2Saved saved{records.data(), prefixes.data(), maps.data()};
      Workspace fws(lasp2_forward_workspace_bytes(fwd, layout, seq)), bws(lasp2_backward_workspace_bytes(bwd, layout, seq));
      // One collective per direction; one device without states runs the plain pass.
      const int per_direction = c.world > 1 || c.with_states ? 1 : 0;
      lasp2_forward(fwd, &comm, layout, saved, seq, fws.data(), Lasp2Options{}, nullptr);
      EXPECT_EQ(comm.collectives(), per_direction);
      lasp2_backward(bwd, &comm, layout, saved, seq, bws.data(), nullptr);
      EXPECT_EQ(comm.collectives(), 2 * per_direction);
      if (c.with_states) {  // the same on every rank
        EXPECT_LT(rel_error(final_state, want.final_state), 1e-5) << "rank " << rank;
      }
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int64_t e = 0; e < state; ++e) initial_grad_sum[e] += initial_grad[e];
    put_tokens(got.o, o, layout, global.batch, global.seqlen, global.heads, global.dv);
    put_tokens(got.dq, dq, layout, global.batch, global.seqlen, global.heads, global.dk);
    put_tokens(got.dk, dk, layout, global.batch, global.seqlen, global.heads, global.dk);
    put_tokens(got.dv, dv, layout, global.batch, global.seqlen, global.heads, global.dv);
  });
  // States travel in fp32.
  EXPECT_LT(rel_error(got.o, want.o), 1e-5);
  EXPECT_LT(rel_error(got.dq, want.dq), 1e-5);
  EXPECT_LT(rel_error(got.dk, want.dk), 1e-5);
  EXPECT_LT(rel_error(got.dv, want.dv), 1e-5);
  if (c.with_states && !c.lasp1) EXPECT_LT(rel_error(initial_grad_sum, want.initial_grad), 1e-5);
}

std::vector<FamilyCase> family_cases() {
  std::vector<FamilyCase> cases;
  for (int world : {1, 2, 3, 4}) {
    for (bool balanced : {false, true})
      for (bool states : {false, true})
        if (world > 1 || !balanced) cases.push_back({world, balanced, false, states});
    if (world > 1) cases.push_back({world, false, true, false});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Schedules, MatrixMapFamily, ::testing::ValuesIn(family_cases()), family_name);

}  // namespace
}  // namespace lasp2::testing
