// Tensor-map (TMA) copies of a chunk's [64 tokens][LD] tiles for the tensor-core passes
// (tc_dkdv.cu's, tc_forward.cu's and tc_state.cu's default copy path on sm_90, session 16:
// tc_forward's variant 6, tc_dkdv's and tc_state's kTma kernels): the host encodes one map per
// [B, T, H, d] view, the kernel's copy thread issues one box per tile. The box is the
// padded tile itself (LD = D + 8 columns x 64 tokens), so the copy engine writes the
// layout ldmatrix reads, and fills columns past the view's dims and tokens past the part
// with zeros (what load_tile's zero-fill does by hand). Included by .cu files only.
#pragma once

#include <array>
#include <cstdint>
#include <type_traits>

#include "delta_rule/cuda/delta_chunk_tma.cuh"  // encode_tiled, runs_sm90, token_dims_by_stride; tma_copy.cuh's wrappers
#include "env_knob.h"
#include "launch.h"
#include "tc_tiles.cuh"

namespace lasp2::cuda {
namespace {

// LASP2_CUDA_TILE_COPY=cp_async: the output, dq, dk/dv and segment-state passes copy their tiles by
// cp.async from every thread (the kernels of sessions 4-15, the fallback where a map
// cannot run) even where the tensor-map copies could; the same bits. Read per launch so
// that a test can compare the two paths; unset or empty: tensor maps where they run;
// anything else: a lasp2::Error (env_knob.h).
inline bool tile_copy_forced_cp_async() { return env_choice("LASP2_CUDA_TILE_COPY", {"cp_async"}, -1) == 0; }

// A box's coordinates {y, z, w} in a map's dimensions 1..3 for token t (of the part) of
// head h, batch b. hd, td: which of those dimensions hold h and t (encode_tile_map's order
// by stride); b takes the remaining one.
struct BoxCoords {
  int y, z, w;
};
__device__ __forceinline__ BoxCoords box_coords(int hd, int td, int h, int t, int b) {
  return {hd == 1 ? h : td == 1 ? t : b, hd == 2 ? h : td == 2 ? t : b, hd == 3 ? h : td == 3 ? t : b};
}

// One box of the chunk starting at token t of head h, batch b (box_coords) into the
// shared address dst, completing on bar. x: the box's first column (tc_state's column
// blocks; 0 elsewhere).
__device__ __forceinline__ void tile_map_box(uint32_t dst, const CUtensorMap* map, int hd, int td, int h, int t,
                                             int b, void* bar, int x = 0) {
  const BoxCoords c = box_coords(hd, td, h, t, b);
  lasp2::delta::gpu::tma_box_4d(dst, map, x, c.y, c.z, c.w, bar);
}

// A plain (1-d) bulk copy of `bytes` (a multiple of 16; both addresses 16-byte aligned)
// from global src to shared dst, its bytes counted on bar (the per-token weights of
// tc_state's and tc_forward's tensor-map kernels).
__device__ __forceinline__ void bulk_copy_1d(uint32_t dst, const void* src, uint32_t bytes, void* bar) {
  LASP2_ASM90("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
              "l"(reinterpret_cast<uint64_t>(src)), "r"(bytes), "r"(smem_u32(bar))
              : "memory");
}

// Output tiles staged in shared memory and written by tensor-map stores (sm_90; nothing on
// the sm_80 pass, whose host never launches such kernels): four 8 x 8 16-bit matrices from
// mma accumulator pairs, stored transposed (lane l gives the row address of matrix l / 8's
// row l % 8); and the bulk-group tensor store of a staged [64][LD] box at token t of head
// h, batch b (tile_map_box's coordinates; the copy engine writes only the elements inside
// the map: the part's tokens, the view's dims).
__device__ __forceinline__ void stsm_x4_t(uint32_t addr, const uint32_t (&r)[4]) {
  LASP2_ASM90("stmatrix.sync.aligned.m8n8.x4.trans.shared.b16 [%0], {%1, %2, %3, %4};\n" ::"r"(addr), "r"(r[0]),
              "r"(r[1]), "r"(r[2]), "r"(r[3])
              : "memory");
}
__device__ __forceinline__ void tma_store_4d(const CUtensorMap* map, int x, int y, int z, int w, uint32_t src) {
  LASP2_ASM90("cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%1, %2, %3, %4}], [%5];\n" ::"l"(
                  reinterpret_cast<uint64_t>(map)),
              "r"(x), "r"(y), "r"(z), "r"(w), "r"(src)
              : "memory");
  LASP2_ASM90("cp.async.bulk.commit_group;\n" ::: "memory");
}
__device__ __forceinline__ void tile_map_store(const CUtensorMap* map, int hd, int td, int h, int t, int b,
                                               uint32_t src) {
  const BoxCoords c = box_coords(hd, td, h, t, b);
  tma_store_4d(map, 0, c.y, c.z, c.w, src);
}
// The same from column x (a warp's slice of the tile, stored by a map of narrower boxes).
__device__ __forceinline__ void tile_map_store_at(const CUtensorMap* map, int hd, int td, int h, int t, int b, int x,
                                                  uint32_t src) {
  const BoxCoords c = box_coords(hd, td, h, t, b);
  tma_store_4d(map, x, c.y, c.z, c.w, src);
}
// Waits until at most N of this thread's bulk store groups still read shared memory
// (READ) or are incomplete at all (!READ).
template <int N, bool READ>
__device__ __forceinline__ void bulk_store_wait() {
  if constexpr (READ) LASP2_ASM90("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
  else LASP2_ASM90("cp.async.bulk.wait_group %0;\n" ::"n"(N) : "memory");
}

// View v's rows of the part (from token g.begin, g.n of them; rows past them and columns
// past `dim` read as zeros) as a 4-d map {d, ...} whose other three dimensions go by
// stride (extent-1 ones last), read in [64 tokens][box_cols] boxes (LD columns unless a
// kernel stores narrower slices); false where a map cannot take the view (alignment,
// strides).
template <typename T, int D>
bool encode_tile_map(CUtensorMap* map, int& hdim, int& tdim, int& bdim, const View& v, const Geom& g, int dim,
                     int box_cols = TcTile<D>::LD) {
  const auto f = lasp2::delta::gpu::encode_tiled();
  const T* base = static_cast<const T*>(v.ptr) + g.begin * v.st;
  if (f == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  const auto dm = lasp2::delta::gpu::token_dims_by_stride(v, g.heads, g.n, g.batch);
  cuuint64_t dims[4] = {static_cast<cuuint64_t>(dim), 0, 0, 0}, strides[3];
  cuuint32_t box[4] = {static_cast<cuuint32_t>(box_cols), 1, 1, 1}, ones[4] = {1, 1, 1, 1};
  for (int i = 0; i < 3; ++i) {
    dims[i + 1] = static_cast<cuuint64_t>(dm[i].extent);
    strides[i] = static_cast<cuuint64_t>(dm[i].stride) * sizeof(T);
    if (strides[i] % 16 != 0 || strides[i] >= (cuuint64_t{1} << 40)) return false;
    (dm[i].which == 0 ? hdim : dm[i].which == 1 ? tdim : bdim) = i + 1;
    if (dm[i].which == 1) box[i + 1] = kChunk;
  }
  const CUtensorMapDataType type =
      std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return f(map, type, 4, const_cast<T*>(base), dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
           CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

// The first n maps of a kernel argument A with members map[], hdim[], tdim[], bdim[]
// (DkdvTmaArgs, FwdTmaArgs): views[i] read with dims[i] columns; false if any cannot be
// encoded.
template <typename T, int D, typename A>
bool encode_tile_maps(A& a, int n, const View* const* views, const int* dims, const Geom& g) {
  for (int i = 0; i < n; ++i)
    if (!encode_tile_map<T, D>(&a.map[i], a.hdim[i], a.tdim[i], a.bdim[i], *views[i], g, dims[i])) return false;
  return true;
}

}  // namespace
}  // namespace lasp2::cuda
