// The tensor maps of the chunk-gradient kernels on tensor-map copies (GDN's
// chunk_bwd_kernel_tma, delta_chunk_bwd.cu; KDA's kda_bwd_kernel_tma, kda_chunk_bwd.cu):
// the part's tokens of a [B, T, H, d] input, or a [bh][rows][cols] scratch array read as
// "heads" bh of `rows` tokens and one batch, each read in boxes of C columns plus the
// tile's padding (tc_tile_map.cuh's encode_tile_map), and their launch. Host code; included
// by .cu files only.
#pragma once

#include <cstdint>

#include "cuda/tc_tile_map.cuh"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_dispatch.h"

namespace lasp2::delta::gpu {
namespace {

// Encodes maps into M (a struct with map[], hdim[], tdim[], bdim[]: BwdMaps, KdaBwdMaps).
template <typename T, typename M>
class ChunkGradMaps {
 public:
  ChunkGradMaps(M& maps, const Problem& p) : m_(maps), bh_(p.bh()) {
    part_.batch = p.batch;
    part_.heads = p.heads;
    part_.begin = p.begin;
    part_.n = static_cast<int>(p.n);
  }
  // map i: the part's tokens of input v
  template <int C>
  bool tokens(int i, const View& v) {
    return encode<C>(i, lasp2::cuda::View{const_cast<void*>(v.ptr), v.sb, v.st, v.sh}, part_);
  }
  // map i: the scratch array at ptr, [bh][rows][cols]
  template <int C>
  bool scratch(int i, const void* ptr, int64_t rows, int64_t cols) {
    lasp2::cuda::Geom g;
    g.batch = 1;
    g.heads = static_cast<int>(bh_);
    g.begin = 0;
    g.n = static_cast<int>(rows);
    return encode<C>(i, lasp2::cuda::View{const_cast<void*>(ptr), 0, cols, rows * cols}, g);
  }

 private:
  template <int C>
  bool encode(int i, const lasp2::cuda::View& v, const lasp2::cuda::Geom& g) {
    return lasp2::cuda::encode_tile_map<T, C>(&m_.map[i], m_.hdim[i], m_.tdim[i], m_.bdim[i], v, g, C);
  }
  M& m_;
  int64_t bh_;
  lasp2::cuda::Geom part_;
};

// Launches a chunk-gradient kernel on tensor-map copies, kernel<<<(chunks, b h), NTH,
// bytes>>>(p, a, maps), with the maps M that encode(e, nck, npad) fills through e (a
// ChunkGradMaps); false (nothing launched) where it cannot run: no sm_90 code or device,
// coordinates past 32 bits, a view no map can take. The GDN and KDA launches share it so
// that their checks cannot drift apart.
template <typename T, int D, typename M, int NTH, typename Kernel, typename Args, typename Encode>
bool launch_grad_kernel_tma(Kernel kernel, const Problem& p, const Args& a, int bytes, const char* who,
                            const char* what, cudaStream_t s, Encode&& encode) {
  if (!runs_sm90(kernel) || p.n > INT32_MAX) return false;
  const int64_t nck = chunk_count(p), bh = p.bh(), npad = nck * CH;
  if (bh > INT32_MAX || nck * D > INT32_MAX) return false;
  M m;
  ChunkGradMaps<T, M> e(m, p);
  if (!encode(e, nck, npad)) return false;
  chunk_allow_max_shared(kernel, bytes, who, what);
  kernel<<<dim3(static_cast<unsigned>(nck), static_cast<unsigned>(bh)), NTH, bytes, s>>>(p, a, m);
  return true;
}

}  // namespace
}  // namespace lasp2::delta::gpu
