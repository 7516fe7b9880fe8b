// Generic path: any input dtype (fp32, fp16, bf16), head dims up to 256 (any
// size), FMA arithmetic in fp32. Same structure as the tensor-core path (segment
// states, scan, one block per (b, h, segment) walking its chunks), but 16-token
// sub-chunks of the 64-token meta chunks and the state in shared memory when it
// fits (else in a global scratch slice of the block's own). Used for fp32 inputs
// (the 1e-4 accuracy target excludes tf32 / bf16 tensor cores) and for sizes or
// strides the tensor-core kernels do not take.
#include "device_utils.cuh"
#include "elem_dispatch.cuh"
#include "pdl.cuh"

namespace lasp2::cuda {
namespace {

constexpr int CG = 16;         // tokens per sub-chunk
constexpr int kThreads = 256;

// Decay bookkeeping of one 16-token sub-chunk relative to its own start, read
// from the 64-token chunk's meta (all differences of values within one chunk).
struct SubMeta {
  const float* mc;  // meta of the chunk, [64][2]
  int x0;           // first token of the sub-chunk within the chunk
  float Gb, sb;     // G, s just before the sub-chunk (0, 0 at a chunk start)
  float Gl, sl;     // G, s of the sub-chunk's last token
  __device__ SubMeta(const float* m, int sub) : mc(m), x0(CG * sub) {
    Gb = sub ? mc[2 * (x0 - 1)] : 0.f;
    sb = sub ? mc[2 * (x0 - 1) + 1] : 0.f;
    Gl = mc[2 * (x0 + CG - 1)];
    sl = mc[2 * (x0 + CG - 1) + 1];
  }
  __device__ float G(int x) const { return mc[2 * (x0 + x)]; }
  __device__ float s(int x) const { return mc[2 * (x0 + x) + 1]; }
  __device__ float through() const { return sl == sb ? expf(Gl - Gb) : 0.f; }
  __device__ float entry(int x) const { return s(x) == sb ? expf(G(x) - Gb) : 0.f; }
  __device__ float exit(int y) const { return s(y) == sl ? expf(Gl - G(y)) : 0.f; }
  __device__ float pair(int x, int y) const {
    return (y <= x && s(x) == s(y)) ? expf(G(x) - G(y)) : 0.f;
  }
};

// rows [x0, x0 + 16) of a [token][dim] view -> fp32 smem [16][ld], zero past nv.
template <typename T>
__device__ void load_rows(float* dst, int ld, const T* src, int64_t st, int nv, int dim, int tid) {
  for (int idx = tid; idx < CG * dim; idx += kThreads) {
    const int x = idx / dim, i = idx % dim;
    dst[x * ld + i] = x < nv ? to_float<T>(src[x * st + i]) : 0.f;
  }
}

struct GenState {
  static int64_t tiles(int da, int db) { return CG * (da + 1) + CG * (db + 1) + CG; }
};

// The kernels below write out their walks over the sub-chunks each: as one helper taking
// the body as a lambda (returning whether the walk ends), nvcc placed address arithmetic
// differently in the state and output kernels (other PTX, so not provably the same code).
template <typename T, bool ENTRY>
__global__ void __launch_bounds__(kThreads) generic_state_kernel(StateArgs args, int state_in_smem) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  extern __shared__ float gsm[];
  const Geom& g = args.g;
  const int da = args.da, db = args.db, LDA = da + 1, LDB = db + 1;
  float* A = gsm;
  float* B = A + CG * LDA;
  float* w = B + CG * LDB;
  float* Sm = w + CG;
  const int tid = threadIdx.x;
  // blocks of the walked segments only (StateArgs::first_seg, segs; the launch sets segs)
  const int seg = args.first_seg + static_cast<int>(blockIdx.x % args.segs);
  const int64_t bh = blockIdx.x / args.segs;
  const int b = static_cast<int>(bh / g.heads), h = static_cast<int>(bh % g.heads);
  float* out = args.out + (bh * g.nseg + seg) * static_cast<int64_t>(da) * db;
  float* S = state_in_smem ? Sm : out;
  const int64_t elems = static_cast<int64_t>(da) * db;
  for (int64_t e = tid; e < elems; e += kThreads) S[e] = 0.f;
  const T* ab = head_base<T>(args.a, b, h, g.begin);
  const T* bb = head_base<T>(args.b, b, h, g.begin);
  const float* meta = head_meta(args.meta, g, bh);
  const int c_begin = seg * g.seg_chunks, c_end = min(g.nchunks, c_begin + g.seg_chunks);
  float carry = args.coef;
  bool done = false;
  for (int c = c_begin; c < c_end && !done; ++c) {
    for (int sub = 0; sub < kChunk / CG; ++sub) {
      const int x0 = c * kChunk + sub * CG;
      const int nv = min(CG, g.n - x0);
      if (nv <= 0) break;
      __syncthreads();
      load_rows<T>(A, LDA, ab + x0 * args.a.st, args.a.st, nv, da, tid);
      load_rows<T>(B, LDB, bb + x0 * args.b.st, args.b.st, nv, db, tid);
      const SubMeta m(meta + c * kChunk * 2, sub);
      if (tid < CG) w[tid] = ENTRY ? carry * m.entry(tid) : m.exit(tid);
      const float thr = m.through();
      __syncthreads();
      for (int64_t e = tid; e < elems; e += kThreads) {
        const int i = static_cast<int>(e / db), j = static_cast<int>(e % db);
        float s = ENTRY ? S[e] : S[e] * thr;
        for (int y = 0; y < nv; ++y) s += w[y] * A[y * LDA + i] * B[y * LDB + j];
        S[e] = s;
      }
      if (ENTRY) {
        carry *= thr;
        if (carry == 0.f) {
          done = true;
          break;
        }
      }
    }
  }
  if (state_in_smem) {
    __syncthreads();
    for (int64_t e = tid; e < elems; e += kThreads) out[e] = S[e];
  }
}

struct GenFwd {
  // floats before the state
  static int64_t tiles(int da, int dv, bool dq) {
    return 2 * CG * (da + 1) + CG * (dv + 1) + CG * 17 + 2 * CG + (dq ? CG * (dv + 1) : 0);
  }
};

template <typename T, int MODE>
__global__ void __launch_bounds__(kThreads) generic_fwd_kernel(FwdArgs args, int state_in_smem) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  constexpr bool kPrefix = MODE == static_cast<int>(FwdMode::kPrefix);
  constexpr bool kDq = MODE == static_cast<int>(FwdMode::kDq);
  extern __shared__ float gsm[];
  const Geom& g = args.g;
  const int da = args.da, dv = args.dv, LDA = da + 1, LDV = dv + 1;
  float* qa = gsm;
  float* ka = qa + CG * LDA;
  float* va = ka + CG * LDA;
  float* P = va + CG * LDV;
  float* ent = P + CG * 17;
  float* ext = ent + CG;
  float* obuf = ext + CG;
  float* Sm = obuf + (kDq ? CG * LDV : 0);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // the place only, not segment_block(g): with its chunk range, nvcc ordered this
  // kernel's code differently (other PTX)
  const auto [seg, bh, b, h] = segment_place(g);

  float esc = 1.f;
  if (kPrefix) {
    float lam = 0.f;
    for (int s = 0; s < seg; ++s) lam += args.segL[bh * g.nseg + s];
    esc = expf(lam);
    if (esc == 0.f || args.state == nullptr) return;
  }
  float* S = state_in_smem ? Sm : args.scratch + (bh * g.nseg + seg) * static_cast<int64_t>(da) * LDV;
  const int64_t elems = static_cast<int64_t>(da) * dv;
  {
    const float* E = seg_state(args.state, bh, seg, args.state_bh, args.state_seg);
    for (int64_t e = tid; e < elems; e += kThreads) {
      const int i = static_cast<int>(e / dv), j = static_cast<int>(e % dv);
      S[i * LDV + j] =
          E == nullptr ? 0.f : esc * (args.state_transposed ? E[j * da + i] : E[i * dv + j]);
    }
  }
  const T* qb = head_base<T>(args.qa, b, h, g.begin);
  const T* kb = kPrefix ? nullptr : head_base<T>(args.ka, b, h, g.begin);
  const T* vb = kPrefix ? nullptr : head_base<T>(args.va, b, h, g.begin);
  const T* xb = kDq ? head_base<T>(args.x, b, h, g.begin) : nullptr;
  T* ob = head_base<T>(args.out, b, h, g.begin);
  const float* meta = head_meta(args.meta, g, bh);
  const int c_begin = seg * g.seg_chunks, c_end = min(g.nchunks, c_begin + g.seg_chunks);
  const float scale = args.scale;
  bool done = false;
  for (int c = c_begin; c < c_end && !done; ++c) {
    for (int sub = 0; sub < kChunk / CG; ++sub) {
      const int x0 = c * kChunk + sub * CG;
      const int nv = min(CG, g.n - x0);
      if (nv <= 0) break;
      __syncthreads();
      load_rows<T>(qa, LDA, qb + x0 * args.qa.st, args.qa.st, nv, da, tid);
      if (!kPrefix) {
        load_rows<T>(ka, LDA, kb + x0 * args.ka.st, args.ka.st, nv, da, tid);
        load_rows<T>(va, LDV, vb + x0 * args.va.st, args.va.st, nv, dv, tid);
      }
      const SubMeta m(meta + c * kChunk * 2, sub);
      if (tid < CG) {
        ent[tid] = m.entry(tid);
        ext[tid] = m.exit(tid);
      }
      const float thr = m.through();
      __syncthreads();
      if (!kPrefix) {
        const int x = tid / CG, y = tid % CG;
        const float wgt = m.pair(x, y);
        float p = 0.f;
        if (wgt != 0.f) {
          for (int i = 0; i < da; ++i) p += qa[x * LDA + i] * ka[y * LDA + i];
          p *= wgt;
        }
        P[x * 17 + y] = p;
        __syncthreads();
      }
      for (int idx = tid; idx < CG * dv; idx += kThreads) {
        const int x = idx / dv, j = idx % dv;
        if (x >= nv) continue;
        float acc = 0.f;
        if (ent[x] != 0.f) {
          for (int i = 0; i < da; ++i) acc += qa[x * LDA + i] * S[i * LDV + j];
          acc *= ent[x];
        }
        if (!kPrefix)
          for (int y = 0; y <= x; ++y) acc += P[x * 17 + y] * va[y * LDV + j];
        const float val = scale * acc;
        T* dst = ob + (x0 + x) * args.out.st + j;
        if (kPrefix) {
          if (ent[x] != 0.f) *dst = from_float<T>(to_float<T>(*dst) + val);
        } else {
          *dst = from_float<T>(val);
          if (kDq) obuf[x * LDV + j] = val;
        }
      }
      __syncthreads();
      for (int64_t e = tid; e < elems; e += kThreads) {
        const int i = static_cast<int>(e / dv), j = static_cast<int>(e % dv);
        float s = S[i * LDV + j] * thr;
        if (!kPrefix)
          for (int y = 0; y < nv; ++y) s += ext[y] * ka[y * LDA + i] * va[y * LDV + j];
        S[i * LDV + j] = s;
      }
      if (kDq) {
        for (int x = warp; x < nv; x += kThreads / 32) {
          float s = 0.f;
          for (int j = lane; j < dv; j += 32)
            s += obuf[x * LDV + j] * to_float<T>(xb[(x0 + x) * args.x.st + j]);
          s = warp_sum(s);
          if (lane == 0) args.qdq[bth(g, b, g.begin + x0 + x, h)] = s;
        }
      }
      if (kPrefix && thr == 0.f) {
        done = true;
        break;
      }
    }
  }
}

struct GenDkdv {
  static int64_t tiles(int dk, int dv) {
    return 3 * CG * (dk + 1) + 2 * CG * (dv + 1) + 2 * CG * 17 + 4 * CG;
  }
};

template <typename T>
__global__ void __launch_bounds__(kThreads) generic_dkdv_kernel(DkdvArgs args, int state_in_smem) {
  pdl_wait();  // pdl.cuh: the previous kernel has finished before any global memory access
  pdl_launch_dependents();
  extern __shared__ float gsm[];
  const Geom& g = args.g;
  const int dk = args.dk, dv = args.dv, LDK = dk + 1, LDV = dv + 1;
  float* q = gsm;
  float* k = q + CG * LDK;
  float* dkb = k + CG * LDK;
  float* v = dkb + CG * LDK;
  float* dO = v + CG * LDV;
  float* P1 = dO + CG * LDV;
  float* P2 = P1 + CG * 17;
  float* ent = P2 + CG * 17;
  float* ext = ent + CG;
  float* qdq = ext + CG;
  float* kdk = qdq + CG;
  float* Dm = kdk + CG;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  // the place only, not segment_block(g): with its chunk range, nvcc ordered this
  // kernel's code differently (other PTX)
  const auto [seg, bh, b, h] = segment_place(g);
  float* Dst = state_in_smem ? Dm : args.scratch + (bh * g.nseg + seg) * static_cast<int64_t>(dk) * LDV;
  const int64_t elems = static_cast<int64_t>(dk) * dv;
  {
    const float* E = seg_state(args.dstate, bh, seg, args.dstate_bh, args.dstate_seg);
    for (int64_t e = tid; e < elems; e += kThreads) {
      const int i = static_cast<int>(e / dv), j = static_cast<int>(e % dv);
      Dst[i * LDV + j] = E == nullptr ? 0.f : E[i * dv + j];
    }
  }
  const T* qb = head_base<T>(args.q, b, h, g.begin);
  const T* kb = head_base<T>(args.k, b, h, g.begin);
  const T* vb = head_base<T>(args.v, b, h, g.begin);
  const T* ob = head_base<T>(args.dout, b, h, g.begin);
  T* dkout = head_base<T>(args.dk_out, b, h, g.begin);
  T* dvout = head_base<T>(args.dv_out, b, h, g.begin);
  const float* meta = head_meta(args.meta, g, bh);
  const int c_begin = seg * g.seg_chunks, c_end = min(g.nchunks, c_begin + g.seg_chunks);
  const bool has_dg = args.dg != nullptr;
  float carry = (has_dg && args.fold_offset && args.dg_offset != nullptr) ? args.dg_offset[bh] : 0.f;
  const float scale = args.scale;
  for (int c = c_end - 1; c >= c_begin; --c) {
    for (int sub = kChunk / CG - 1; sub >= 0; --sub) {
      const int x0 = c * kChunk + sub * CG;
      const int nv = min(CG, g.n - x0);
      if (nv <= 0) continue;
      __syncthreads();
      load_rows<T>(q, LDK, qb + x0 * args.q.st, args.q.st, nv, dk, tid);
      load_rows<T>(k, LDK, kb + x0 * args.k.st, args.k.st, nv, dk, tid);
      load_rows<T>(v, LDV, vb + x0 * args.v.st, args.v.st, nv, dv, tid);
      load_rows<T>(dO, LDV, ob + x0 * args.dout.st, args.dout.st, nv, dv, tid);
      const SubMeta m(meta + c * kChunk * 2, sub);
      if (tid < CG) {
        ent[tid] = scale * m.entry(tid);
        ext[tid] = m.exit(tid);
        qdq[tid] = (has_dg && tid < nv) ? args.qdq[bth(g, b, g.begin + x0 + tid, h)] : 0.f;
      }
      const float thr = m.through();
      __syncthreads();
      {
        const int x = tid / CG, y = tid % CG;
        const float wgt = scale * m.pair(x, y);
        float p1 = 0.f, p2 = 0.f;
        if (wgt != 0.f) {
          for (int i = 0; i < dk; ++i) p1 += q[x * LDK + i] * k[y * LDK + i];
          for (int j = 0; j < dv; ++j) p2 += dO[x * LDV + j] * v[y * LDV + j];
        }
        P1[x * 17 + y] = wgt * p1;
        P2[x * 17 + y] = wgt * p2;
      }
      __syncthreads();
      for (int idx = tid; idx < CG * dk; idx += kThreads) {
        const int y = idx / dk, i = idx % dk;
        float acc = 0.f;
        if (ext[y] != 0.f) {
          for (int j = 0; j < dv; ++j) acc += Dst[i * LDV + j] * v[y * LDV + j];
          acc *= ext[y];
        }
        for (int x = y; x < CG; ++x) acc += P2[x * 17 + y] * q[x * LDK + i];
        dkb[y * LDK + i] = acc;
        if (y < nv) dkout[(x0 + y) * args.dk_out.st + i] = from_float<T>(acc);
      }
      for (int idx = tid; idx < CG * dv; idx += kThreads) {
        const int y = idx / dv, j = idx % dv;
        float acc = 0.f;
        if (ext[y] != 0.f) {
          for (int i = 0; i < dk; ++i) acc += Dst[i * LDV + j] * k[y * LDK + i];
          acc *= ext[y];
        }
        for (int x = y; x < CG; ++x) acc += P1[x * 17 + y] * dO[x * LDV + j];
        if (y < nv) dvout[(x0 + y) * args.dv_out.st + j] = from_float<T>(acc);
      }
      __syncthreads();
      for (int64_t e = tid; e < elems; e += kThreads) {
        const int i = static_cast<int>(e / dv), j = static_cast<int>(e % dv);
        float s = Dst[i * LDV + j] * thr;
        for (int x = 0; x < nv; ++x) s += ent[x] * q[x * LDK + i] * dO[x * LDV + j];
        Dst[i * LDV + j] = s;
      }
      if (has_dg) {
        for (int y = warp; y < CG; y += kThreads / 32) {
          float s = 0.f;
          for (int i = lane; i < dk; i += 32) s += k[y * LDK + i] * dkb[y * LDK + i];
          s = warp_sum(s);
          if (lane == 0) kdk[y] = s;
        }
        __syncthreads();
        if (tid == 0) {
          for (int y = nv - 1; y >= 0; --y) {
            carry += qdq[y] - kdk[y];
            args.dg[bth(g, b, g.begin + x0 + y, h)] = carry;
          }
        }
      }
    }
  }
  if (has_dg && !args.fold_offset && tid == 0) args.seg_total[bh * g.nseg + seg] = carry;
}

template <typename K>
void set_smem(K kernel, int bytes) {
  allow_dynamic_smem(reinterpret_cast<const void*>(kernel), bytes);
}

}  // namespace

int64_t generic_state_scratch_floats(int da, int db) { return static_cast<int64_t>(da) * (db + 1); }

int generic_state_smem(int da, int db, bool state_in_smem) {
  return static_cast<int>(4 * (GenState::tiles(da, db) +
                               (state_in_smem ? static_cast<int64_t>(da) * db : 0)));
}
int generic_fwd_smem(int da, int dv, FwdMode mode, bool state_in_smem) {
  return static_cast<int>(4 * (GenFwd::tiles(da, dv, mode == FwdMode::kDq) +
                               (state_in_smem ? generic_state_scratch_floats(da, dv) : 0)));
}
int generic_dkdv_smem(int dk, int dv, bool state_in_smem) {
  return static_cast<int>(
      4 * (GenDkdv::tiles(dk, dv) + (state_in_smem ? generic_state_scratch_floats(dk, dv) : 0)));
}

template <typename T>
void gen_state_t(const StateArgs& a, bool entry, bool smem_state, cudaStream_t s) {
  const int bytes = generic_state_smem(a.da, a.db, smem_state);
  const unsigned grid = static_cast<unsigned>(a.g.bh() * a.segs);
  if (entry) {
    set_smem(generic_state_kernel<T, true>, bytes);
    launch_kernel("generic_state_kernel", generic_state_kernel<T, true>, grid, kThreads, bytes, s, a,
                  smem_state ? 1 : 0);
  } else {
    set_smem(generic_state_kernel<T, false>, bytes);
    launch_kernel("generic_state_kernel", generic_state_kernel<T, false>, grid, kThreads, bytes, s, a,
                  smem_state ? 1 : 0);
  }
}

template <typename T, int MODE>
void gen_fwd_t(const FwdArgs& a, bool smem_state, cudaStream_t s) {
  const int bytes = generic_fwd_smem(a.da, a.dv, static_cast<FwdMode>(MODE), smem_state);
  set_smem(generic_fwd_kernel<T, MODE>, bytes);
  launch_kernel("generic_fwd_kernel", generic_fwd_kernel<T, MODE>, static_cast<unsigned>(a.g.bh() * a.g.nseg),
                kThreads, bytes, s, a, smem_state ? 1 : 0);
}

template <typename T>
void gen_dkdv_t(const DkdvArgs& a, bool smem_state, cudaStream_t s) {
  const int bytes = generic_dkdv_smem(a.dk, a.dv, smem_state);
  set_smem(generic_dkdv_kernel<T>, bytes);
  launch_kernel("generic_dkdv_kernel", generic_dkdv_kernel<T>, static_cast<unsigned>(a.g.bh() * a.g.nseg),
                kThreads, bytes, s, a, smem_state ? 1 : 0);
}

void launch_generic_state(Elem e, const StateArgs& a, bool entry, bool state_in_smem,
                          cudaStream_t s) {
  dispatch_elem(e, [&](auto tag) { gen_state_t<decltype(tag)>(a, entry, state_in_smem, s); });
}

void launch_generic_fwd(Elem e, const FwdArgs& a, FwdMode mode, bool state_in_smem,
                        cudaStream_t s) {
  dispatch_elem(e, [&](auto tag) {
    using T = decltype(tag);
    switch (mode) {
      case FwdMode::kFwd:
        gen_fwd_t<T, 0>(a, state_in_smem, s);
        break;
      case FwdMode::kDq:
        gen_fwd_t<T, 1>(a, state_in_smem, s);
        break;
      case FwdMode::kPrefix:
        gen_fwd_t<T, 2>(a, state_in_smem, s);
        break;
    }
  });
}

void launch_generic_dkdv(Elem e, const DkdvArgs& a, bool state_in_smem, cudaStream_t s) {
  dispatch_elem(e, [&](auto tag) { gen_dkdv_t<decltype(tag)>(a, state_in_smem, s); });
}

}  // namespace lasp2::cuda
