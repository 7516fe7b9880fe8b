// The fused L2 norm's CPU kernels (lasp2/qk_l2norm.h) against the formula in long double:
// y = x / sqrt(|x|^2 + eps) and, for the gradient, the chain rule written out the other
// way, dx = r dy - r^3 x <dy, x> (the kernels use rstd (dy - y <dy, y>)). Two tensors per
// call with different strides (contiguous and Megatron's [T, B, H, D] order, padded head
// rows), head dims 1 .. 300, zero rows, Inf / NaN rows, and the argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "lasp2/qk_l2norm.h"

namespace lasp2 {
namespace {

constexpr double kEps = 1e-6;

// A [B, T, H, D] tensor in a buffer of its own layout (tbhd: [T, B, H, D] memory order;
// pad: extra elements after each row, never touched by the kernels).
template <typename T>
struct HostTensor {
  int64_t B, S, H, D;
  BTHStrides st;
  std::vector<T> buf;
  HostTensor(int64_t b, int64_t s, int64_t h, int64_t d, bool tbhd, int pad) : B(b), S(s), H(h), D(d) {
    const int64_t dp = d + pad;
    st = tbhd ? BTHStrides{h * dp, b * h * dp, dp} : BTHStrides{s * h * dp, h * dp, dp};
    buf.assign(static_cast<size_t>(b * s * h * dp), T(-7));  // -7 marks untouched padding
  }
  T& at(int64_t b, int64_t s, int64_t h, int64_t d) { return buf[st.offset(b, s, h) + d]; }
  ConstView cview() const { return {buf.data(), st}; }
  MutView mview() { return {buf.data(), st}; }
};

template <typename T>
void fill_random(HostTensor<T>& x, unsigned seed, double scale) {
  std::mt19937 gen(seed);
  std::normal_distribution<double> n(0.0, scale);
  for (int64_t b = 0; b < x.B; ++b)
    for (int64_t s = 0; s < x.S; ++s)
      for (int64_t h = 0; h < x.H; ++h)
        for (int64_t d = 0; d < x.D; ++d) x.at(b, s, h, d) = static_cast<T>(n(gen));
}

template <typename T>
void check_case(int64_t D, double tol) {
  const int64_t B = 2, S = 3, H = 2;
  HostTensor<T> q(B, S, H, D, false, 0), k(B, S, H, D, true, 3);
  fill_random(q, 1 + static_cast<unsigned>(D), 1.0);
  fill_random(k, 2 + static_cast<unsigned>(D), 4.0);
  for (int64_t d = 0; d < D; ++d) q.at(1, 2, 0, d) = 0;  // a zero row: rstd = 1 / sqrt(eps)
  HostTensor<T> yq(B, S, H, D, true, 1), yk(B, S, H, D, false, 0);
  std::vector<T> rq(B * S * H), rk(B * S * H);

  L2NormForwardArgs f;
  f.shape = {std::is_same_v<T, double> ? ScalarType::kFloat64 : ScalarType::kFloat32, B, S, H, D};
  f.eps = kEps;
  f.count = 2;
  f.t[0] = {q.cview(), yq.mview(), rq.data()};
  f.t[1] = {k.cview(), yk.mview(), rk.data()};
  l2norm_forward(Device::kCPU, f, nullptr);

  HostTensor<T> dyq(B, S, H, D, false, 2), dyk(B, S, H, D, true, 0);
  fill_random(dyq, 3, 1.0);
  fill_random(dyk, 4, 1.0);
  HostTensor<T> dq(B, S, H, D, true, 0), dk(B, S, H, D, false, 1);
  L2NormBackwardArgs g;
  g.shape = f.shape;
  g.count = 2;
  g.t[0] = {dyq.cview(), yq.cview(), rq.data(), dq.mview()};
  g.t[1] = {dyk.cview(), yk.cview(), rk.data(), dk.mview()};
  l2norm_backward(Device::kCPU, g, nullptr);

  struct Pair {
    HostTensor<T>*x, *y, *dy, *dx;
    std::vector<T>* r;
  };
  for (const Pair& p : {Pair{&q, &yq, &dyq, &dq, &rq}, Pair{&k, &yk, &dyk, &dk, &rk}}) {
    int64_t row = 0;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h, ++row) {
          long double ss = 0, dot = 0, scale = 0;
          for (int64_t d = 0; d < D; ++d) {
            const long double x = p.x->at(b, s, h, d);
            ss += x * x;
            dot += static_cast<long double>(p.dy->at(b, s, h, d)) * x;
          }
          const long double r = 1.0L / std::sqrt(ss + static_cast<long double>(static_cast<T>(kEps)));
          EXPECT_NEAR(static_cast<double>((*p.r)[row]), static_cast<double>(r), tol * static_cast<double>(r))
              << "rstd row " << row << " D=" << D;
          for (int64_t d = 0; d < D; ++d) scale = std::max(scale, std::fabs(r * p.dy->at(b, s, h, d)));
          for (int64_t d = 0; d < D; ++d) {
            const long double x = p.x->at(b, s, h, d);
            const long double y = x * r;
            const long double dx = r * p.dy->at(b, s, h, d) - r * r * r * x * dot;
            EXPECT_NEAR(static_cast<double>(p.y->at(b, s, h, d)), static_cast<double>(y), tol) << "y D=" << D;
            // dx cancels (at D = 1 down to ~eps / x^2): its error is relative to r |dy|
            EXPECT_NEAR(static_cast<double>(p.dx->at(b, s, h, d)), static_cast<double>(dx),
                        tol * static_cast<double>(scale) + 1e-300)
                << "dx D=" << D;
          }
        }
  }
  // the zero row
  EXPECT_EQ(yq.at(1, 2, 0, 0), T(0));
  EXPECT_NEAR(static_cast<double>(rq[(1 * S + 2) * H]), 1.0 / std::sqrt(static_cast<double>(static_cast<T>(kEps))),
              1e-3);
  // the padding of every padded buffer is untouched
  for (const HostTensor<T>* t : {&k, &yq, &dyq, &dk})
    for (int64_t b = 0; b < B; ++b)
      for (int64_t s = 0; s < S; ++s)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t row_end = t->st.offset(b, s, h) + D;
          const int64_t next = h + 1 < H ? t->st.offset(b, s, h + 1) : row_end;
          for (int64_t i = row_end; i < next; ++i) EXPECT_EQ(t->buf[i], T(-7)) << "padding written";
        }
}

TEST(QkL2NormCpu, MatchesFormulaFloat64) {
  for (int64_t D : {1, 5, 64, 128, 300}) check_case<double>(D, 1e-13);
}

TEST(QkL2NormCpu, MatchesFormulaFloat32) {
  for (int64_t D : {1, 5, 64, 128, 300}) check_case<float>(D, 3e-6);
}

TEST(QkL2NormCpu, InfAndNanFollowTheFormula) {
  HostTensor<float> x(1, 1, 3, 4, false, 0), y(1, 1, 3, 4, false, 0);
  for (int h = 0; h < 3; ++h)
    for (int d = 0; d < 4; ++d) x.at(0, 0, h, d) = 1.0f + d;
  x.at(0, 0, 0, 1) = std::numeric_limits<float>::infinity();
  x.at(0, 0, 1, 2) = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> r(3);
  L2NormForwardArgs f;
  f.shape = {ScalarType::kFloat32, 1, 1, 3, 4};
  f.count = 1;
  f.t[0] = {x.cview(), y.mview(), r.data()};
  l2norm_forward(Device::kCPU, f, nullptr);
  EXPECT_EQ(r[0], 0.0f);  // sum = Inf: rstd 0, Inf * 0 = NaN, finite * 0 = 0
  EXPECT_TRUE(std::isnan(y.at(0, 0, 0, 1)));
  EXPECT_EQ(y.at(0, 0, 0, 0), 0.0f);
  EXPECT_TRUE(std::isnan(r[1]) && std::isnan(y.at(0, 0, 1, 0)));  // NaN spreads over its row
  EXPECT_NEAR(y.at(0, 0, 2, 3), 4.0f / std::sqrt(30.0f), 1e-6);   // other rows untouched
}

TEST(QkL2NormCpu, ArgumentChecks) {
  L2NormForwardArgs f;
  f.shape = {ScalarType::kFloat32, 1, 1, 1, 4};
  f.count = 3;
  EXPECT_THROW(l2norm_forward(Device::kCPU, f, nullptr), Error);
  f.count = 1;
  EXPECT_THROW(l2norm_forward(Device::kCPU, f, nullptr), Error);  // null pointers
  f.shape.dim = 0;
  EXPECT_THROW(l2norm_forward(Device::kCPU, f, nullptr), Error);
  f.shape = {ScalarType::kFloat16, 1, 1, 1, 4};
  std::vector<uint16_t> x(4), y(4);
  std::vector<float> r(1);
  f.t[0] = {{x.data(), {4, 4, 4}}, {y.data(), {4, 4, 4}}, r.data()};
  EXPECT_THROW(l2norm_forward(Device::kCPU, f, nullptr), Error);  // half precisions: converted by the caller
  f.shape = {ScalarType::kFloat32, 0, 1, 1, 4};  // no rows: nothing to do
  f.t[0] = {};
  EXPECT_NO_THROW(l2norm_forward(Device::kCPU, f, nullptr));
}

}  // namespace
}  // namespace lasp2
