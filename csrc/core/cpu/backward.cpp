// CPU backward passes: the gradient of a part's entering state (what LASP-2
// gathers in backward), dq by a forward scan, dk/dv/dg by a reverse scan.
#include <algorithm>

#include "chunk_scan.h"
#include "cpu_kernels.h"

namespace lasp2::cpu {

template <typename T>
void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate) {
  using Acc = AccOf<T>;
  const int64_t dk = p.dim_k, dv = p.dim_v;
  ChunkInfo<Acc> info;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      State<Acc> dM(dk, dv);
      info.compute(p, b, h, part.begin, part.length());
      for (int64_t x = 0; x < info.n && info.seg[x] == 0; ++x) {
        const int64_t t = part.begin + x;
        dM.add_outer(p.scale * info.entry_weight(x), row<T>(p.q, b, t, h), row<T>(dout, b, t, h));
      }
      dM.store(dstate + bh_index(p, b, h) * dk * dv);
    }
  }
}

template <typename T>
void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                       const float* initial_state, MutView dq, void* q_dot_dq) {
  using Acc = AccOf<T>;
  const int64_t dk = p.dim_k, dv = p.dim_v;
  std::vector<Acc> acc(dk);
  ChunkInfo<Acc> info;
  auto dq_rows = [&](int64_t b, int64_t h, int64_t c0, int64_t n, const State<Acc>& S) {
    for (int64_t x = 0; x < n; ++x) {
      const T* dox = row<T>(dout, b, c0 + x, h);
      std::fill(acc.begin(), acc.end(), Acc(0));
      S.right_mul_add(info.entry_weight(x), dox, acc.data());
      info.add_causal(
          x, dox, [&](int64_t y) { return row<T>(p.v, b, c0 + y, h); }, dv,
          [&](int64_t y) { return row<T>(p.k, b, c0 + y, h); }, dk, acc.data());
      T* dqx = row<T>(dq, b, c0 + x, h);
      const T* qx = row<T>(p.q, b, c0 + x, h);
      Acc qdot = 0;
      for (int64_t i = 0; i < dk; ++i) {
        const Acc g = p.scale * acc[i];
        dqx[i] = static_cast<T>(g);
        qdot += static_cast<Acc>(qx[i]) * g;
      }
      if (q_dot_dq) store_real(q_dot_dq, p.decay.dtype, bth_index(p, b, c0 + x, h), qdot);
    }
  };
  forward_state_scan<T>(p, part, initial_state, info, dq_rows, [](int64_t, int64_t, const State<Acc>&) {});
}

template <typename T>
void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                         const float* final_dstate, MutView dk_out, MutView dv_out,
                         const void* q_dot_dq, const float* dg_offset, void* dg) {
  using Acc = AccOf<T>;
  const int64_t dk = p.dim_k, dv = p.dim_v;
  std::vector<Acc> gk(dk), gv(dv);
  ChunkInfo<Acc> info;
  const int64_t num_chunks = (part.length() + p.chunk_size - 1) / p.chunk_size;
  for (int64_t b = 0; b < p.batch; ++b) {
    for (int64_t h = 0; h < p.heads; ++h) {
      State<Acc> dS(dk, dv);
      dS.load(final_dstate ? final_dstate + bh_index(p, b, h) * dk * dv : nullptr);
      Acc dg_running = dg_offset ? static_cast<Acc>(dg_offset[bh_index(p, b, h)]) : Acc(0);
      for (int64_t c = num_chunks - 1; c >= 0; --c) {
        const int64_t c0 = part.begin + c * p.chunk_size;
        const int64_t n = std::min<int64_t>(p.chunk_size, part.end - c0);
        info.compute(p, b, h, c0, n);
        for (int64_t y = n - 1; y >= 0; --y) {
          const T* ky = row<T>(p.k, b, c0 + y, h);
          const T* vy = row<T>(p.v, b, c0 + y, h);
          std::fill(gk.begin(), gk.end(), Acc(0));
          std::fill(gv.begin(), gv.end(), Acc(0));
          const Acc e = info.exit_weight(y);  // key y reaches later chunks through dS
          if (e != Acc(0)) {
            dS.right_mul_add(e, vy, gk.data());
            dS.left_mul_add(e, ky, gv.data());
          }
          for (int64_t x = y; x < n; ++x) {
            const Acc w = info.pair_weight(x, y);
            if (w == Acc(0)) continue;
            const T* qx = row<T>(p.q, b, c0 + x, h);
            const T* dox = row<T>(dout, b, c0 + x, h);
            const Acc a = p.scale * w * dot<Acc>(dox, vy, dv);
            const Acc c2 = p.scale * w * dot<Acc>(qx, ky, dk);
            for (int64_t i = 0; i < dk; ++i) gk[i] += a * static_cast<Acc>(qx[i]);
            for (int64_t j = 0; j < dv; ++j) gv[j] += c2 * static_cast<Acc>(dox[j]);
          }
          T* dky = row<T>(dk_out, b, c0 + y, h);
          T* dvy = row<T>(dv_out, b, c0 + y, h);
          Acc kdot = 0;
          for (int64_t i = 0; i < dk; ++i) {
            dky[i] = static_cast<T>(gk[i]);
            kdot += static_cast<Acc>(ky[i]) * gk[i];
          }
          for (int64_t j = 0; j < dv; ++j) dvy[j] = static_cast<T>(gv[j]);
          if (dg) {
            const int64_t idx = bth_index(p, b, c0 + y, h);
            dg_running += static_cast<Acc>(load_real(q_dot_dq, p.decay.dtype, idx)) - kdot;
            store_real(dg, p.decay.dtype, idx, dg_running);
          }
        }
        // Carry dS to the start of this chunk: through the chunk, plus its queries.
        dS.scale(info.through_weight());
        for (int64_t x = 0; x < n && info.seg[x] == 0; ++x) {
          dS.add_outer(p.scale * info.entry_weight(x), row<T>(p.q, b, c0 + x, h),
                       row<T>(dout, b, c0 + x, h));
        }
      }
    }
  }
}

#define LASP2_INSTANTIATE_BACKWARD(T)                                                        \
  template void part_dstate<T>(const AttentionParams&, TokenRange, ConstView, float*);       \
  template void chunk_backward_dq<T>(const AttentionParams&, TokenRange, ConstView,          \
                                     const float*, MutView, void*);                         \
  template void chunk_backward_dkdv<T>(const AttentionParams&, TokenRange, ConstView,        \
                                       const float*, MutView, MutView, const void*,          \
                                       const float*, void*);
LASP2_INSTANTIATE_BACKWARD(float)
LASP2_INSTANTIATE_BACKWARD(double)

}  // namespace lasp2::cpu
