// Shared pieces of the state passes on whole-tile tensor-map copies (sm_90): GDN's
// fwd_state_kernel_tma / rev_state_kernel_tma (delta_chunk_states.cu,
// delta_chunk_rstates.cu) and KDA's kda_state_kernel_tma / kda_rev_state_kernel_tma
// (kda_chunk_tma.cu). Device: the copies addressed once a block (TileCopy, ColCopy, MetaCopy), the swizzled-tile products (mma_w_swizzled,
// mma_k_swizzled) and the ring's barriers; host: the tensor-map encoding and the sm_90
// check. Included by .cu files only; everything has internal linkage.
#pragma once

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <type_traits>

#include "cuda/tc_tiles.cuh"
#include "delta_rule/cuda/delta_chunk_common.cuh"
#include "delta_rule/cuda/delta_chunk_frag.cuh"
#include "delta_rule/cuda/tma_copy.cuh"

namespace lasp2::delta::gpu {
namespace {

// Threads a block of the 8-warp state passes (two warps a scheduler).
constexpr int NT8 = 256;

// Waits until at most N of this thread's cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_upto() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// The per-chunk loads of the 8-warp passes as the old loaders wrote them (load_fwd_chunk,
// load_state_chunk) recompute every address each chunk: chunk_pos' 64-bit division of bh,
// the view offsets and each thread's tile offsets. The state pass is latency-bound with
// two warps a scheduler, so those instructions sit on the chunk's path (ncu: 361
// instructions a warp a chunk in the forward, about 40 of them the products'). Here each
// thread's sources and shared-memory destinations are formed once; a chunk adds its row
// offset (292 instructions, 11 % less time; docs/history/delta-rule-log.md, ninth round).
__device__ __forceinline__ void cp_async16_to(uint32_t smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem), "l"(gmem), "r"(valid ? 16 : 0));
}
// Rows >= nvalid of a chunk are zero-filled.
__device__ __forceinline__ int chunk_rows(const Problem& p, int c) {
  const int64_t left = p.n - static_cast<int64_t>(c) * CH;
  return left < CH ? static_cast<int>(left) : CH;
}
// This thread's share of a [64][D] tile of rows (stride st) into a [64][LD] shared tile.
template <typename T, int D, int NTH>
struct TileCopy {
  static constexpr int kVecs = D / 8, kStep = NTH / kVecs, kIters = CH / kStep;
  static_assert(NTH % kVecs == 0 && CH % kStep == 0, "tile copy shape");
  const T* src;  // chunk 0's first row of this thread
  int64_t st;
  uint32_t dst;
  int row0;
  __device__ __forceinline__ void init(const T* rows, int64_t stride, const T* tile, int tid) {
    row0 = tid / kVecs;
    const int col = (tid % kVecs) * 8;
    src = rows + row0 * stride + col;
    st = stride;
    dst = lasp2::cuda::smem_u32(tile + row0 * TcTile<D>::LD + col);
  }
  __device__ __forceinline__ void issue(int c, uint32_t buf_off, int nvalid) const {
    const T* s = src + static_cast<int64_t>(c) * CH * st;
#pragma unroll
    for (int i = 0; i < kIters; ++i) {
      const bool valid = row0 + i * kStep < nvalid;
      cp_async16_to(dst + buf_off + i * kStep * TcTile<D>::LD * sizeof(T), valid ? s + i * kStep * st : src, valid);
    }
  }
};
// This thread's share (at most one 16-byte piece) of a [64][C] column block of rows
// (stride st, rows already offset to the block's first column) into a [64][C + 8] tile.
template <typename T, int C, int NTH>
struct ColCopy {
  static_assert(CH * C / 8 <= NTH, "one piece a thread");
  const T* src;
  int64_t st;
  uint32_t dst;
  int row;
  bool active;
  __device__ __forceinline__ void init(const T* rows, int64_t stride, const T* tile, int tid) {
    active = tid < CH * C / 8;
    row = tid / (C / 8);
    const int part = tid % (C / 8);
    src = rows + row * stride + 8 * part;
    st = stride;
    dst = lasp2::cuda::smem_u32(tile + row * (C + 8) + 8 * part);
  }
  __device__ __forceinline__ void issue(int c, uint32_t buf_off, int nvalid) const {
    if (!active) return;
    const bool valid = row < nvalid;
    cp_async16_to(dst + buf_off, valid ? src + static_cast<int64_t>(c) * CH * st : src, valid);
  }
};
// The {G, s} pairs of a chunk: threads 0..31, 16 bytes each.
struct MetaCopy {
  const float* src;
  uint32_t dst;
  bool active;
  __device__ __forceinline__ void init(const float* meta, int64_t row0, const float* tile, int tid) {
    active = tid < CH / 2;
    src = meta + 2 * row0 + 4 * tid;
    dst = lasp2::cuda::smem_u32(tile + 4 * tid);
  }
  __device__ __forceinline__ void issue(int c, uint32_t buf_off) const {
    if (active) cp_async16_to(dst + buf_off, src + static_cast<int64_t>(c) * 2 * CH, true);
  }
};

// ldmatrix of two 8 x 8 16-bit matrices, transposed (lanes 0..15 give the row addresses).
__device__ __forceinline__ void ldsm_x2_t(uint32_t (&r)[2], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(lasp2::cuda::smem_u32(p)));
}

// bytes of one 64-column half of a 16-bit [64][128] tile (128-byte rows, swizzled)
constexpr int kSwzHalf = CH * 64 * 2;

// v = w S over the chunk's d (8 k-steps in two chains, as mma_row_tiles with NTILES n8
// tiles from column n0; kSplit false: one chain in k order, as mma_rows): A = the
// swizzled w tile, a_lane this lane's row piece at k-step 0 (rows m0 + lane % 16,
// m0 % 8 == 0, so row % 8 == lane % 8: k-step kk XORs (kk % 4) << 5 into the piece and
// adds a half's bytes from kk = 4).
template <typename T, int NTILES, bool kSplit = true>
__device__ __forceinline__ void mma_w_swizzled(float (&acc)[NTILES][4], uint32_t a_lane, const T* B, int ldb, int n0,
                                               int lane) {
  static_assert(NTILES == 1 || NTILES == 2, "one or two n8 tiles");
  float odd[NTILES][4] = {};
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    uint32_t a[4], b[2 * NTILES];
    ldsm_x4_at(a, (a_lane ^ static_cast<uint32_t>((kk & 3) << 5)) + (kk >> 2) * kSwzHalf);
    if constexpr (NTILES == 1) {
      ldsm_x2_t(b, B + frag_b_kn(lane & 15, 16 * kk, n0, ldb));
    } else {
      ldsm_x4_t(b, B + frag_b_kn(lane, 16 * kk, n0, ldb));
    }
#pragma unroll
    for (int t = 0; t < NTILES; ++t) mma16816<T>(kSplit && (kk & 1) ? odd[t] : acc[t], a, b[2 * t], b[2 * t + 1]);
  }
  if constexpr (kSplit) add_frags(acc, odd);
}
// One n8 tile (the reverse pass).
template <typename T>
__device__ __forceinline__ void mma_w_swizzled(float (&acc)[4], uint32_t a_lane, const T* B, int ldb, int n0,
                                               int lane) {
  mma_w_swizzled<T, 1>(reinterpret_cast<float(&)[1][4]>(acc), a_lane, B, ldb, n0, lane);
}
// S += K^T ys over the chunk's tokens in two halves (as mma_rows_halves with NTL n8
// tiles; kSplit false: one chain in token order, as mma_rows): A = the swizzled K tile
// read transposed, a_lane this lane's piece at k-step 0 (a k-step is 16 token rows, 2048
// bytes).
template <typename T, int NTL, bool kSplit = true>
__device__ __forceinline__ void mma_k_swizzled(float (&acc)[NTL][4], uint32_t a_lane, const T* B, int ldb, int lane) {
  static_assert(NTL % 2 == 0, "pairs of n8 tiles");
  float hi[NTL][4] = {};
#pragma unroll
  for (int kk = 0; kk < CH / 16; ++kk) {
    float(&c)[NTL][4] = !kSplit || kk < 2 ? acc : hi;
    uint32_t a[4];
    ldsm_x4_t_at(a, a_lane + kk * 2048);
#pragma unroll
    for (int pr = 0; pr < NTL / 2; ++pr) {
      uint32_t bb[4];
      ldsm_x4_t(bb, B + frag_b_kn(lane, 16 * kk, 16 * pr, ldb));
      mma16816<T>(c[2 * pr], a, bb[0], bb[1]);
      mma16816<T>(c[2 * pr + 1], a, bb[2], bb[3]);
    }
  }
  if constexpr (kSplit) add_frags(acc, hi);
}

// The shared memory of the tma state passes (GDN's and KDA's): the ring's NS buffers of
// tiles (each tile as two [64][64] halves, columns 0..63 and 64..127, of 128-byte rows,
// the 16-byte pieces of row r at piece index XOR (r % 8): the tensor map's 128-byte
// swizzle, conflict-free for ldmatrix like the padded rows of TileCopy; 1024-byte
// aligned) and of cp.async column blocks and gate floats (GDN's {G, s} pairs of the
// chunk's 64 tokens, KDA's eL of its d = 128 keys), the carried columns' 16-bit copy xb
// ([d][ld]), the chunk's 16-bit token rows ys of the second product, and `full`: buffer s
// holds its chunk's tiles.
// The forward passes: tiles w and K (KDA: kd), u's C columns.
template <typename T, int NS, int C = kChunkCols>
struct TmaStateSmem {
  static constexpr int LDC = C + 8;
  unsigned char tiles[NS][2][2 * kSwzHalf];
  T u[NS][CH * LDC];
  float gate[NS][2 * CH];
  T xb[128 * LDC];
  T ys[CH * LDC];
  uint64_t full[NS];
};
// The reverse passes: tiles k, w and q (KDA: kd, w and qg), r's and dO's 16 columns.
template <typename T, int NS>
struct TmaRevSmem {
  unsigned char tiles[NS][3][2 * kSwzHalf];
  T r[NS][CH * LDV];
  T d[NS][CH * LDV];
  float gate[NS][2 * CH];
  T xb[128 * LDV];
  T ys[CH * LDV];
  uint64_t full[NS];
};

// A forward tma pass's cp.async pieces (GDN's and KDA's): u's C columns (none for a
// summary's columns of A) and the chunk's gate floats; chunk c into buffer c % NS.
template <typename T, int NS, int C>
struct FwdColCopies {
  ColCopy<T, C, NT8> u;
  MetaCopy gate;
  // u_rows: [rows][128] scratch, the pair's rows from row0, read from column j0.
  __device__ __forceinline__ void init(const void* u_rows, const float* gates, int64_t row0, int j0,
                                       TmaStateSmem<T, NS, C>& sm, int tid) {
    u.init(static_cast<const T*>(u_rows) + row0 * 128 + j0, 128, sm.u[0], tid);
    gate.init(gates, row0, sm.gate[0], tid);
  }
  __device__ __forceinline__ void issue(int c, bool with_u) const {
    if (with_u) u.issue(c, (c % NS) * sizeof(T[CH * (C + 8)]), CH);
    gate.issue(c, (c % NS) * sizeof(float[2 * CH]));
  }
};
// A reverse tma pass's cp.async pieces (GDN's and KDA's): dO's and r's 16 columns and the
// chunk's gate floats; step i of the ring copies chunk nck - 1 - i into buffer i % NS.
template <typename T, int NS>
struct RevColCopies {
  ColCopy<T, BV, NT8> d, r;
  MetaCopy gate;
  // dout_cols: dO's rows at column j0; r: [rows][128] scratch, the pair's rows from row0.
  __device__ __forceinline__ void init(const T* dout_cols, int64_t dout_st, const void* r_rows, const float* gates,
                                       int64_t row0, int j0, TmaRevSmem<T, NS>& sm, int tid) {
    d.init(dout_cols, dout_st, sm.d[0], tid);
    r.init(static_cast<const T*>(r_rows) + row0 * 128 + j0, 128, sm.r[0], tid);
    gate.init(gates, row0, sm.gate[0], tid);
  }
  __device__ __forceinline__ void issue(const Problem& p, int nck, int i) const {
    const int c = nck - 1 - i, s = i % NS;
    d.issue(c, s * sizeof(T[CH * LDV]), chunk_rows(p, c));
    r.issue(c, s * sizeof(T[CH * LDV]), CH);
    gate.issue(c, s * sizeof(float[2 * CH]));
  }
};

// Where the K tensor map's dimensions h, t, b sit (1..3; 0 is d): the host orders them by
// stride.
struct KMapDims {
  int h, t, b;
};

// The h, t and b dimensions of a [B, T, H, d]-strided view (V: a View of either backend)
// in the order of their strides, innermost first: dimensions 1..3 of a tensor map {d, ...}.
// An extent-1 dimension, never stepped, gets a stride past all the others (any valid one),
// so it sorts last.
struct StridedDim {
  int64_t stride, extent;
  int which;  // 0 h, 1 t, 2 b
};
template <typename V>
std::array<StridedDim, 3> token_dims_by_stride(const V& v, int64_t heads, int64_t n, int64_t batch) {
  std::array<StridedDim, 3> dm = {{{v.sh, heads, 0}, {v.st, n, 1}, {v.sb, batch, 2}}};
  int64_t far = 16;
  for (const StridedDim& x : dm) far = std::max(far, x.stride * x.extent);
  for (StridedDim& x : dm)
    if (x.extent == 1) x.stride = far;
  std::stable_sort(dm.begin(), dm.end(), [](const StridedDim& a, const StridedDim& b) { return a.stride < b.stride; });
  return dm;
}

// Bytes from raw (a tma pass's dynamic shared memory) to its first 1024-byte boundary,
// where the shared struct starts (the 128-byte swizzle's boxes need it; the hosts ask for
// 1024 bytes more).
__device__ __forceinline__ uint32_t swizzle_pad(const unsigned char* raw) {
  return (1024u - (lasp2::cuda::smem_u32(raw) & 1023u)) & 1023u;
}

// Thread 0 sets up a tma kernel's ring of `full` barriers: one arrival each (its own
// expect_tx).
template <int NS>
__device__ __forceinline__ void init_full_barriers(uint64_t (&full)[NS], int tid) {
  if (tid == 0) init_ring_barriers<NS>(full);
}

// ---- the skeleton of the four tma state passes ------------------------------------------
// GDN's and KDA's forward and reverse tma passes walk the same ring the same way; these
// pieces are written once so that the four kernels cannot drift apart (a change to the
// ring's counting in one kernel alone would be a silent race in the other three).
// (Written out in each kernel still, because as helpers they change the PTX, so that it
// would no longer be provably the same code (tried again in session 19): the shared
// struct's reference at its 1024-byte boundary (session 25: the offset alone,
// swizzle_pad, keeps the PTX), the swizzled ldmatrix offsets aw / ak (nvcc orders the
// address arithmetic differently), the forward passes' v_new / chunk-state pointers and
// leaving-state stores, the reverse passes' dh pointer, and KDA's tiles issue for N
// two-dimensional maps (registers renumbered, instructions reordered). A helper keeps the
// PTX where its arguments are values the kernel had already formed and its body the
// kernel's statements in the kernel's order; a pointer formed as an argument instead of
// inside the helper moved KDA's reverse pass. Session 22: the aligned struct with the
// extern array declared inside the helper (the offset's arithmetic narrowed to 32 bits),
// and the forward passes' end (leaving state / summary) as one helper, direct or with the
// summary's two pointers as scalars: the summary kernels' state registers renumbered.)

// Ring step i of `steps`: thread 0 issues the step's tensor-map tiles (tiles(i), which
// arms the buffer's barrier), every thread its cp.async pieces (own(i)). One cp.async
// group a step, committed also past the last step, so that cp_async_wait_upto<NS - 2>
// always means "the oldest step in flight has landed".
template <typename Tiles, typename Own>
__device__ __forceinline__ void ring_issue(int i, int steps, int tid, Tiles&& tiles, Own&& own) {
  if (i < steps) {
    if (tid == 0) tiles(i);
    own(i);
  }
  cp_async_commit();
}

// This thread's 16 bytes of the carried columns xb ([d][ldx], 16 columns: two threads a
// row) to dst, its piece of a chunk's 16-bit state (forward) or of dh (reverse).
template <typename T>
__device__ __forceinline__ void store_xb_piece(T* dst, const T* xb, int ldx, int tid) {
  *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(xb + (tid >> 1) * ldx + 8 * (tid & 1));
}

// The start of ring step i (its chunk in buffer i % NS, `full` that buffer's barrier): the
// step's cp.async pieces landed, the carried state S (rows r0..) as the 16-bit copy xb,
// the step's tiles landed, the block barrier (every warp past step i - 1: its buffer is
// free, and every warp sees xb), the refill of that buffer (step i + NS - 1), and this
// thread's piece of xb to piece + step * piece_step (the chunk's 16-bit state or dh;
// none without piece). xb is rewritten only after the next step's barrier.
template <int NS, typename T, int N, typename Tiles, typename Own>
__device__ __forceinline__ void ring_step_begin(int i, int steps, uint64_t* full, T* xb, int ldx,
                                                const float (&S)[N][4], int r0, T* piece, int step,
                                                int64_t piece_step, int tid, int lane, Tiles&& tiles, Own&& own) {
  cp_async_wait_upto<NS - 2>();
  store_rows<T, N>(xb, ldx, S, r0, lane);
  mbar_wait(full, (i / NS) & 1);
  __syncthreads();
  ring_issue(i + NS - 1, steps, tid, tiles, own);
  if (piece != nullptr) store_xb_piece(piece + static_cast<int64_t>(step) * piece_step, xb, ldx, tid);
}

// ---- host: the tensor maps and the sm_90 check ------------------------------------------
// cuTensorMapEncodeTiled through the runtime's driver entry point (no libcuda link).
using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);
EncodeTiledFn encode_tiled() {
  static const EncodeTiledFn fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q) != cudaSuccess ||
        q != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return static_cast<EncodeTiledFn>(nullptr);
    }
    return reinterpret_cast<EncodeTiledFn>(f);
  }();
  return fn;
}

// A 16-bit tensor of `rank` dimensions (d first, contiguous; strides in bytes of the
// others) read in boxes of 64 columns x `rows` rows (dimension `row_dim`; the others 1)
// with the 128-byte swizzle; rows past a dimension's extent read as zeros.
template <typename T>
bool encode_rows_map(CUtensorMap* map, int rank, const void* base, const cuuint64_t* dims, const cuuint64_t* strides,
                     int row_dim, int rows) {
  const EncodeTiledFn f = encode_tiled();
  if (f == nullptr || reinterpret_cast<uintptr_t>(base) % 16 != 0) return false;
  cuuint32_t box[4] = {64, 1, 1, 1}, ones[4] = {1, 1, 1, 1};
  box[row_dim] = static_cast<cuuint32_t>(rows);
  for (int i = 0; i + 1 < rank; ++i)
    if (strides[i] % 16 != 0 || strides[i] >= (cuuint64_t{1} << 40)) return false;
  const CUtensorMapDataType type =
      std::is_same_v<T, __nv_bfloat16> ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return f(map, type, static_cast<cuuint32_t>(rank), const_cast<void*>(base), dims, strides, box, ones,
           CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// A prep array of the part's chunk rows (w, kd, qg: [rows][128] 16-bit, contiguous) read
// in the tma state passes' [64][64] boxes.
template <typename T>
bool encode_chunk_rows_map(CUtensorMap* map, const void* base, int64_t rows) {
  const cuuint64_t dims[2] = {128, static_cast<cuuint64_t>(rows)}, strides[1] = {128 * sizeof(T)};
  return encode_rows_map<T>(map, 2, base, dims, strides, 1, CH);
}

// An sm_90 device, and the kernel built for it.
template <typename Kernel>
bool runs_sm90(Kernel kernel) {
  int dev = 0, major = 0;
  cudaFuncAttributes fa{};
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9 ||
      cudaFuncGetAttributes(&fa, kernel) != cudaSuccess || fa.binaryVersion < 90) {
    (void)cudaGetLastError();
    return false;
  }
  return true;
}

}  // namespace
}  // namespace lasp2::delta::gpu
