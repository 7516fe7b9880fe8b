// One 64-token chunk's decay bookkeeping (meta, MetaArgs in launch.h), shared by the
// meta kernel per (b, h, segment) (misc_kernels.cu) and the one over all heads of a
// token range (head_row_kernels.cu), so that both write the same bits.
#pragma once

#include "device_utils.cuh"
#include "launch.h"

namespace lasp2::cuda {

// One chunk's meta (and weights) from its log decays gv and document flags dv of
// tokens 2 lane, 2 lane + 1; adds the chunk's total log decay and starts to the
// warp's running sums.
__device__ __forceinline__ void meta_chunk(const MetaArgs& a, int64_t bh, int c, int lane,
                                           const float gv[2], const int dv[2], float& total,
                                           int& docs) {
  const Geom& g = a.g;
  // Inclusive scan over the 64 tokens: pair sums, then across lanes.
  float gs = gv[0] + gv[1];
  int ds = dv[0] + dv[1];
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const float gu = __shfl_up_sync(0xffffffffu, gs, o);
    const int du = __shfl_up_sync(0xffffffffu, ds, o);
    if (lane >= o) {
      gs += gu;
      ds += du;
    }
  }
  const float gex = gs - (gv[0] + gv[1]);
  const int dex = ds - (dv[0] + dv[1]);
  float4 out;
  out.x = gex + gv[0];
  out.y = static_cast<float>(dex + dv[0]);
  out.z = gs;
  out.w = static_cast<float>(ds);
  reinterpret_cast<float4*>(a.meta)[((bh * g.nchunks + c) * kChunk + 2 * lane) / 2] = out;
  if (a.wmeta != nullptr) {
    // the same expressions the kernels evaluate from (G, s), so the same values
    const float Gl = __shfl_sync(0xffffffffu, out.z, 31);
    const float sl = __shfl_sync(0xffffffffu, out.w, 31);
    float4 w;
    w.x = out.y == 0.f ? __expf(out.x) : 0.f;
    w.y = out.y == sl ? __expf(Gl - out.x) : 0.f;
    w.z = out.w == 0.f ? __expf(out.z) : 0.f;
    w.w = out.w == sl ? __expf(Gl - out.z) : 0.f;
    reinterpret_cast<float4*>(a.wmeta)[((bh * g.nchunks + c) * kChunk + 2 * lane) / 2] = w;
  }
  total += __shfl_sync(0xffffffffu, gs, 31);
  docs += __shfl_sync(0xffffffffu, ds, 31);
}

}  // namespace lasp2::cuda
