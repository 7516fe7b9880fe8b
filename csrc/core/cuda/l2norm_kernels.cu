// The fused L2 norm's kernels (lasp2/qk_l2norm.h). Memory-bound: each element is read
// once and written once forward (x -> y), dy and y read once and dx written once backward.
//
// A group of G lanes (G a power of two, 4..32, the smallest holding the row's vectors)
// owns one row: each lane loads up to I vectors of V elements into registers (V: 16
// bytes when every pointer and stride allows it, then I = 2; else single elements,
// I = 8), the group sums in a shuffle tree, and the lane writes its own elements: a row
// costs no shared memory and no second read. I is small and static because registers
// are allocated for all I (occupancy: what a memory-bound kernel lives on). Rows of every
// tensor of the call (q and k) share one grid. Rows longer than that (D > 32 * V * I)
// take a two-pass loop kernel, one warp per row, that reads the row twice.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "device_utils.cuh"
#include "l2norm_kernels.h"
#include "launch.h"

namespace lasp2::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kVecIters = 2;     // vectors per lane, 16-byte path (bf16: D <= 512; fp32: D <= 256)
constexpr int kScalarIters = 8;  // elements per lane, scalar path (D <= 256)
constexpr int kMinGroup = 4;

template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};

// To and from the accumulator: fp32 / fp16 / bf16 through device_utils.cuh's to_float and
// from_float (the conversions every CUDA kernel uses), double as itself.
__device__ __forceinline__ double to_acc(double x) { return x; }
template <typename T>
__device__ __forceinline__ float to_acc(T x) {
  return to_float<T>(x);
}

template <typename T>
__device__ __forceinline__ T from_acc(float x) {
  return from_float<T>(x);
}
template <typename T>
__device__ __forceinline__ T from_acc(double x);
template <>
__device__ __forceinline__ double from_acc<double>(double x) { return x; }

// 1 / sqrt(s) with the correctly rounded sqrt and division (not the approximate rsqrt),
// so the CUDA and CPU kernels agree to an ulp.
__device__ __forceinline__ float inv_sqrt(float s) { return 1.0f / sqrtf(s); }
__device__ __forceinline__ double inv_sqrt(double s) { return 1.0 / sqrt(s); }

template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// A view of the rows of one tensor, as the kernels read it (element strides).
struct RowView {
  const void* in = nullptr;   // forward: x; backward: dy
  const void* aux = nullptr;  // backward: y
  void* out = nullptr;        // forward: y; backward: dx
  void* rstd = nullptr;       // Acc values: forward writes, backward reads
  int64_t in_s[3] = {0, 0, 0}, aux_s[3] = {0, 0, 0}, out_s[3] = {0, 0, 0};
};

struct KernelArgs {
  RowView t[kMaxL2NormTensors];
  int64_t rows = 0, seqlen = 0, heads = 0;
  int dim = 0, count = 0, group = 32;
  double eps = 0;
};

__device__ __forceinline__ int64_t offset_of(const int64_t* s, int64_t b, int64_t t, int64_t h) {
  return b * s[0] + t * s[1] + h * s[2];
}

// The row a group owns: which tensor, (b, t, h); false when past the last row.
struct RowPos {
  int which;
  int64_t r, b, t, h;
};

__device__ __forceinline__ bool locate(const KernelArgs& a, int64_t global_row, RowPos& p) {
  p.which = global_row >= a.rows ? 1 : 0;
  p.r = global_row - (p.which ? a.rows : 0);
  if (p.which >= a.count || p.r >= a.rows) return false;
  p.h = p.r % a.heads;
  const int64_t bt = p.r / a.heads;
  p.t = bt % a.seqlen;
  p.b = bt / a.seqlen;
  return true;
}

// The four kernels address rows and lanes the same way; these helpers say it once. (The
// register kernels' lane setup and output loop stay written out in each: as helpers,
// nvcc compiles them to different PTX, so the change would not be provably neutral. The
// lane setup as a struct reordered the row address arithmetic of all 16; the output loop
// as a helper taking the value as a lambda, with the output pointer passed by value, by
// reference or computed inside, changed the 8 scalar (V = 1) kernels.)
// The index of this thread's group of `group` lanes in the grid (a group owns a row).
__device__ __forceinline__ int64_t group_index(int group) {
  return (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) / group;
}
// Element 0 of row p of a tensor with element strides s.
template <typename T>
__device__ __forceinline__ T* row_ptr(void* base, const int64_t* s, const RowPos& p) {
  return static_cast<T*>(base) + offset_of(s, p.b, p.t, p.h);
}
template <typename T>
__device__ __forceinline__ const T* row_ptr(const void* base, const int64_t* s, const RowPos& p) {
  return static_cast<const T*>(base) + offset_of(s, p.b, p.t, p.h);
}

// Sum over the group of G lanes (every lane of the warp takes part: G is uniform).
template <typename Acc>
__device__ __forceinline__ Acc group_sum(Acc v, int group) {
  for (int o = group >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

template <typename T, int V, int kMaxIters>
__global__ void __launch_bounds__(kThreads) l2norm_forward_regs(const KernelArgs a) {
  using Acc = typename AccOf<T>::type;
  using P = Pack<T, V>;
  const int group = a.group;
  const int sub = threadIdx.x & (group - 1);
  RowPos p;
  const bool valid = locate(a, group_index(group), p);
  const RowView v = p.which ? a.t[1] : a.t[0];
  const int packs = a.dim / V;
  P x[kMaxIters];
  Acc sum = 0;
  const P* in = nullptr;
  if (valid) in = reinterpret_cast<const P*>(row_ptr<T>(v.in, v.in_s, p));
#pragma unroll
  for (int i = 0; i < kMaxIters; ++i) {
    const int c = i * group + sub;
    if (valid && c < packs) {
      x[i] = in[c];
#pragma unroll
      for (int j = 0; j < V; ++j) {
        const Acc f = to_acc(x[i].v[j]);
        sum += f * f;
      }
    }
  }
  sum = group_sum(sum, group);
  if (!valid) return;
  const Acc rstd = inv_sqrt(sum + static_cast<Acc>(a.eps));
  P* out = reinterpret_cast<P*>(row_ptr<T>(v.out, v.out_s, p));
#pragma unroll
  for (int i = 0; i < kMaxIters; ++i) {
    const int c = i * group + sub;
    if (c < packs) {
      P y;
#pragma unroll
      for (int j = 0; j < V; ++j) y.v[j] = from_acc<T>(to_acc(x[i].v[j]) * rstd);
      out[c] = y;
    }
  }
  if (sub == 0) static_cast<Acc*>(v.rstd)[p.r] = rstd;
}

template <typename T, int V, int kMaxIters>
__global__ void __launch_bounds__(kThreads) l2norm_backward_regs(const KernelArgs a) {
  using Acc = typename AccOf<T>::type;
  using P = Pack<T, V>;
  const int group = a.group;
  const int sub = threadIdx.x & (group - 1);
  RowPos p;
  const bool valid = locate(a, group_index(group), p);
  const RowView v = p.which ? a.t[1] : a.t[0];
  const int packs = a.dim / V;
  P dy[kMaxIters], y[kMaxIters];
  Acc dot = 0;
  const P *din = nullptr, *yin = nullptr;
  if (valid) {
    din = reinterpret_cast<const P*>(row_ptr<T>(v.in, v.in_s, p));
    yin = reinterpret_cast<const P*>(row_ptr<T>(v.aux, v.aux_s, p));
  }
#pragma unroll
  for (int i = 0; i < kMaxIters; ++i) {
    const int c = i * group + sub;
    if (valid && c < packs) {
      dy[i] = din[c];
      y[i] = yin[c];
#pragma unroll
      for (int j = 0; j < V; ++j) dot += to_acc(dy[i].v[j]) * to_acc(y[i].v[j]);
    }
  }
  dot = group_sum(dot, group);
  if (!valid) return;
  const Acc rstd = static_cast<const Acc*>(v.rstd)[p.r];
  P* out = reinterpret_cast<P*>(row_ptr<T>(v.out, v.out_s, p));
#pragma unroll
  for (int i = 0; i < kMaxIters; ++i) {
    const int c = i * group + sub;
    if (c < packs) {
      P dx;
#pragma unroll
      for (int j = 0; j < V; ++j) dx.v[j] = from_acc<T>(rstd * (to_acc(dy[i].v[j]) - to_acc(y[i].v[j]) * dot));
      out[c] = dx;
    }
  }
}

// Long rows: one warp per row, the row read twice (the second time mostly from L2).
template <typename T>
__global__ void __launch_bounds__(kThreads) l2norm_forward_loop(const KernelArgs a) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  RowPos p;
  if (!locate(a, group_index(32), p)) return;  // whole warps
  const RowView v = p.which ? a.t[1] : a.t[0];
  const T* in = row_ptr<T>(v.in, v.in_s, p);
  Acc sum = 0;
  for (int d = lane; d < a.dim; d += 32) {
    const Acc f = to_acc(in[d]);
    sum += f * f;
  }
  sum = group_sum(sum, 32);
  const Acc rstd = inv_sqrt(sum + static_cast<Acc>(a.eps));
  T* out = row_ptr<T>(v.out, v.out_s, p);
  for (int d = lane; d < a.dim; d += 32) out[d] = from_acc<T>(to_acc(in[d]) * rstd);
  if (lane == 0) static_cast<Acc*>(v.rstd)[p.r] = rstd;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) l2norm_backward_loop(const KernelArgs a) {
  using Acc = typename AccOf<T>::type;
  const int lane = threadIdx.x & 31;
  RowPos p;
  if (!locate(a, group_index(32), p)) return;
  const RowView v = p.which ? a.t[1] : a.t[0];
  const T* dy = row_ptr<T>(v.in, v.in_s, p);
  const T* y = row_ptr<T>(v.aux, v.aux_s, p);
  Acc dot = 0;
  for (int d = lane; d < a.dim; d += 32) dot += to_acc(dy[d]) * to_acc(y[d]);
  dot = group_sum(dot, 32);
  const Acc rstd = static_cast<const Acc*>(v.rstd)[p.r];
  T* out = row_ptr<T>(v.out, v.out_s, p);
  for (int d = lane; d < a.dim; d += 32) out[d] = from_acc<T>(rstd * (to_acc(dy[d]) - to_acc(y[d]) * dot));
}

void set_strides(int64_t* s, const BTHStrides& st) {
  s[0] = st.batch;
  s[1] = st.seq;
  s[2] = st.head;
}

// Whether `v` elements of a view can move as one aligned vector: its base pointer is
// aligned to the vector and every stride is a multiple of it.
bool vector_ok(const void* ptr, const int64_t* s, int vec, int64_t elem_bytes) {
  if (reinterpret_cast<uintptr_t>(ptr) % (static_cast<uintptr_t>(vec) * elem_bytes) != 0) return false;
  for (int i = 0; i < 3; ++i)
    if (s[i] % vec != 0) return false;
  return true;
}

template <typename T>
void launch(KernelArgs& a, bool backward, cudaStream_t stream) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t bytes = sizeof(T);
  bool vec_ok = a.dim % kVec == 0;
  for (int i = 0; i < a.count && vec_ok; ++i) {
    const RowView& v = a.t[i];
    vec_ok = vector_ok(v.in, v.in_s, kVec, bytes) && vector_ok(v.out, v.out_s, kVec, bytes) &&
             (!backward || vector_ok(v.aux, v.aux_s, kVec, bytes));
  }
  const int vec = vec_ok && a.dim <= 32 * kVec * kVecIters ? kVec : 1;
  const bool regs = a.dim <= 32 * vec * (vec == 1 ? kScalarIters : kVecIters);
  int group = 32;
  if (regs) {
    // one vector per lane where the row allows (rows up to 32 vectors), else whole warps
    // looping up to kVecIters / kScalarIters times (guaranteed by `regs`)
    const int packs = a.dim / vec;
    group = kMinGroup;
    while (group < 32 && group < packs) group <<= 1;
  }
  a.group = group;
  const int64_t threads = a.count * a.rows * group;
  const int64_t blocks = (threads + kThreads - 1) / kThreads;
  LASP2_CHECK(blocks <= 0x7fffffff, "l2norm: too many rows for one launch");
  const dim3 grid(static_cast<unsigned>(blocks));
  if (!regs) {
    if (backward) l2norm_backward_loop<T><<<grid, kThreads, 0, stream>>>(a);
    else l2norm_forward_loop<T><<<grid, kThreads, 0, stream>>>(a);
  } else if (vec == kVec) {
    if (backward) l2norm_backward_regs<T, kVec, kVecIters><<<grid, kThreads, 0, stream>>>(a);
    else l2norm_forward_regs<T, kVec, kVecIters><<<grid, kThreads, 0, stream>>>(a);
  } else {
    if (backward) l2norm_backward_regs<T, 1, kScalarIters><<<grid, kThreads, 0, stream>>>(a);
    else l2norm_forward_regs<T, 1, kScalarIters><<<grid, kThreads, 0, stream>>>(a);
  }
  check_launch(backward ? "the L2 norm's backward kernel" : "the L2 norm's forward kernel");
}

void launch_for(ScalarType dtype, KernelArgs& a, bool backward, cudaStream_t stream) {
  switch (dtype) {
    case ScalarType::kFloat32: launch<float>(a, backward, stream); return;
    case ScalarType::kFloat64: launch<double>(a, backward, stream); return;
    case ScalarType::kFloat16: launch<__half>(a, backward, stream); return;
    case ScalarType::kBFloat16: launch<__nv_bfloat16>(a, backward, stream); return;
  }
  fail("lasp2 (CUDA): l2norm: unknown dtype");
}

KernelArgs base_args(const L2NormShape& s, int count) {
  KernelArgs a;
  a.rows = s.rows();
  a.seqlen = s.seqlen;
  a.heads = s.heads;
  a.dim = static_cast<int>(s.dim);
  a.count = count;
  return a;
}

}  // namespace

void launch_l2norm_forward(const L2NormForwardArgs& f, cudaStream_t stream) {
  KernelArgs a = base_args(f.shape, f.count);
  a.eps = f.eps;
  for (int i = 0; i < f.count; ++i) {
    a.t[i].in = f.t[i].x.data;
    set_strides(a.t[i].in_s, f.t[i].x.stride);
    a.t[i].out = f.t[i].y.data;
    set_strides(a.t[i].out_s, f.t[i].y.stride);
    a.t[i].rstd = f.t[i].rstd;
  }
  if (a.rows == 0 || a.count == 0) return;
  launch_for(f.shape.dtype, a, false, stream);
}

void launch_l2norm_backward(const L2NormBackwardArgs& g, cudaStream_t stream) {
  KernelArgs a = base_args(g.shape, g.count);
  for (int i = 0; i < g.count; ++i) {
    a.t[i].in = g.t[i].dy.data;
    set_strides(a.t[i].in_s, g.t[i].dy.stride);
    a.t[i].aux = g.t[i].y.data;
    set_strides(a.t[i].aux_s, g.t[i].y.stride);
    a.t[i].out = g.t[i].dx.data;
    set_strides(a.t[i].out_s, g.t[i].dx.stride);
    a.t[i].rstd = const_cast<void*>(g.t[i].rstd);  // read only (RowView is shared with the forward)
  }
  if (a.rows == 0 || a.count == 0) return;
  launch_for(g.shape.dtype, a, true, stream);
}

}  // namespace lasp2::cuda
