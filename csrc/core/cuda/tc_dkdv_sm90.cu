// Hopper (sm_90a) dk/dv/dg pass: the same function as tc_dkdv.cu's kernel at
// D = 128 (bf16/fp16 inputs, fp32 accumulation), on warpgroup MMAs (wgmma) whose
// operands the tensor cores read from shared memory themselves (no ldmatrix, one
// read per 64 rows instead of one per 16), issued asynchronously.
//
// One block per (b, h, segment), two warpgroups, walking the segment's chunks in
// REVERSE with the state gradient dS (dk x dv, fp32) in accumulators: warpgroup w
// keeps dS rows [64w, +64). The tiles q, k, v, dO come by cp.async one chunk ahead,
// stored as core matrices (wgmma.cuh). Per 64-token chunk:
//   0. once both warpgroups are done with the previous chunk (a barrier: each
//      reads the other's dS rows), both write their dS rows (16-bit) to shared
//      memory as dS and as dS^T (8 x 8 blocks transposed by movmatrix), then the
//      proxy fence and a second barrier; only then the next chunk's copies are
//      issued (a proxy fence waits for the issuing thread's copies in flight).
//   1. warpgroup 0: P2^T = v dO^T, warpgroup 1: P1^T = k q^T ([key][query]);
//   2. warpgroup 0: dk = v dS^T, warpgroup 1: dv = k dS (token rows; B = dS^T resp.
//      dS, both K-major: one instruction form for both warpgroups, since ptxas
//      serializes every wgmma of a kernel that issues them on divergent paths);
//   3. each its dS rows: dS = exp(G_last) dS + (q^T diag(w_entry))[rows] dO, with A
//      from registers (ldmatrix + the entry weights);
//   then, as the products complete: the mask, decay and scale on P^T in registers,
//   which then is the A operand (accumulator pairs = A fragment pairs) of
//   4. dk = diag(w_exit) (2.) + P2^T q,  dv = diag(w_exit) (2.) + P1^T dO;
//   warpgroup 0: k . dk per token from the fp32 accumulators, warp 0 the reverse
//   cumulative sum dg of (q.dq - k.dk) within the segment.
// P never goes through shared memory; the weights are computed where they are used.
// Compiled for every target; the body exists only for sm_90a (the route launches
// it only there: sm90a_kernels(kSm90Dkdv), route.h).
#include "device_utils.cuh"
#include "wgmma.cuh"

namespace lasp2::cuda {
namespace {

constexpr int kD = 128;
constexpr int kTileBytes = kChunk * kD * 2;  // 16 KiB, core-matrix layout [token][dim]
struct Sm90DkdvLayout {
  static constexpr int kTiles = 0;                      // [2 stages][q, k, v, dO]
  static constexpr int kDs = kTiles + 8 * kTileBytes;   // dS [dk][dv] 16-bit
  static constexpr int kDsT = kDs + kD * kD * 2;       // dS^T [dv][dk] 16-bit
  static constexpr int kMeta = kDsT + kD * kD * 2;      // [2][128] floats
  static constexpr int kQdq = kMeta + 2 * 128 * 4;      // [2][64] floats
  static constexpr int kRed = kQdq + 2 * 64 * 4;        // k . dk per token [64]
  static constexpr int kBytes = kRed + 64 * 4;
};

// Core-matrix strides (bytes) of the [64][128] tiles and the [128][128] dS: along
// the 128 columns 128, along the rows (8-row groups) 16 * 128.
constexpr uint32_t kColStep = 128, kRowStep = 16 * 128;

template <typename T>
__global__ void __launch_bounds__(256, 1) tc_dkdv_sm90_kernel(DkdvArgs args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Sm90DkdvLayout;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* Dsm = smem + L::kDs;
  unsigned char* DsmT = smem + L::kDsT;
  float* meta_s = reinterpret_cast<float*>(smem + L::kMeta);
  float* qdq_s = reinterpret_cast<float*>(smem + L::kQdq);
  float* red = reinterpret_cast<float*>(smem + L::kRed);

  const Geom& g = args.g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3;  // warpgroup, warp in it
  const int seg = blockIdx.x % g.nseg;
  const int64_t bh = blockIdx.x / g.nseg;
  const int b = static_cast<int>(bh / g.heads), h = static_cast<int>(bh % g.heads);
  const int c_begin = seg * g.seg_chunks;
  const int c_end = min(g.nchunks, c_begin + g.seg_chunks);
  const int dk = args.dk, dv = args.dv;
  const bool has_dg = args.dg != nullptr;
  // descriptors: K-major (LBO along K = kstep, SBO along M/N = mnstep) and MN-major
  auto desc = [](const unsigned char* p, uint32_t kstep, uint32_t mnstep, bool) {
    return wg_desc(p, kstep, mnstep);
  };

  // dS rows [64 wg, +64): the accumulator layout (row 16 wl + lane / 4 (+8), columns
  // 8 j + 2 (lane % 4) (+1)), i.e. Ds[4 j + 2 hf + e].
  float Ds[64];
  {
    const float* E = args.dstate != nullptr
                         ? args.dstate + bh * args.dstate_bh + seg * args.dstate_seg
                         : nullptr;
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int i = 64 * wg + 16 * wl + (lane >> 2) + 8 * (e >> 1);
        const int jj = 8 * j + 2 * (lane & 3) + (e & 1);
        Ds[4 * j + e] = (E != nullptr && i < dk && jj < dv) ? E[i * dv + jj] : 0.f;
      }
  }

  const T* q_b = head_base<T>(args.q, b, h, g.begin);
  const T* k_b = head_base<T>(args.k, b, h, g.begin);
  const T* v_b = head_base<T>(args.v, b, h, g.begin);
  const T* o_b = head_base<T>(args.dout, b, h, g.begin);
  T* dk_b = head_base<T>(args.dk_out, b, h, g.begin);
  T* dv_b = head_base<T>(args.dv_out, b, h, g.begin);
  const float* meta = args.meta + bh * g.nchunks * kChunk * 2;
  auto tile = [&](int stage, int i) { return smem + L::kTiles + (stage * 4 + i) * kTileBytes; };

  auto load_one = [&](unsigned char* dst, const T* src, int64_t st, int nvalid, int dim) {
    copy_tile_cm<kD>(dst, src, st, nvalid, dim, tid);
  };
  auto load = [&](int c, int stage) {
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    load_one(tile(stage, 0), q_b + t0 * args.q.st, args.q.st, nvalid, dk);
    load_one(tile(stage, 1), k_b + t0 * args.k.st, args.k.st, nvalid, dk);
    load_one(tile(stage, 2), v_b + t0 * args.v.st, args.v.st, nvalid, dv);
    load_one(tile(stage, 3), o_b + t0 * args.dout.st, args.dout.st, nvalid, dv);
    if (tid < 32) cp_async16(meta_s + stage * 128 + tid * 4, meta + c * 128 + tid * 4, true);
    if (has_dg && tid >= 64 && tid < 128) {
      const int y = tid - 64;
      const bool valid = y < nvalid;
      const float* src = args.qdq + bth(g, b, g.begin + (valid ? t0 + y : 0), h);
      cp_async4(qdq_s + stage * 64 + y, src, valid);
    }
    cp_async_commit();
  };

  float carry = (has_dg && args.fold_offset && args.dg_offset != nullptr) ? args.dg_offset[bh] : 0.f;

  if (c_begin < c_end) load(c_end - 1, 0);
  for (int c = c_end - 1; c >= c_begin; --c) {
    const int stage = (c_end - 1 - c) & 1;
    cp_async_wait_all();
    // both warpgroups' products of the previous chunk read the other one's dS rows
    __syncthreads();
    // dS (gradient of the state leaving chunk c) to shared memory, as dS and dS^T
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int i = 64 * wg + 16 * wl + (lane >> 2) + 8 * hf;
        const int jj = 8 * j + 2 * (lane & 3);
        const uint32_t pr = pack2<T>(Ds[4 * j + 2 * hf], Ds[4 * j + 2 * hf + 1]);
        *reinterpret_cast<uint32_t*>(Dsm + cm_offset(i, jj, kD)) = pr;
        // the 8 x 8 block transposed: this thread's pair is dS^T row 8 j + lane / 4,
        // columns i0 + 2 (lane % 4) (+1), i0 the block's first dS row
        const int i0 = 64 * wg + 16 * wl + 8 * hf;
        *reinterpret_cast<uint32_t*>(DsmT + cm_offset(8 * j + (lane >> 2), i0 + 2 * (lane & 3), kD)) =
            movm_trans(pr);
      }
    // the copies' bytes and dS are read by the tensor cores next; the fence comes
    // before the next chunk's copies are issued (it would wait for them)
    fence_proxy_async();
    __syncthreads();
    if (c - 1 >= c_begin) load(c - 1, stage ^ 1);
    const unsigned char* Qs = tile(stage, 0);
    const unsigned char* Ks = tile(stage, 1);
    const unsigned char* Vs = tile(stage, 2);
    const unsigned char* Os = tile(stage, 3);
    const float* ms = meta_s + stage * 128;
    const float Gl = ms[126], sl = ms[127];
    const float through = sl == 0.f ? __expf(Gl) : 0.f;
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    const bool full = nvalid == kChunk && dk == kD && dv == kD;  // block-uniform

#pragma unroll
    for (int i = 0; i < 64; ++i) Ds[i] *= through;
    // 1. P^T = (v dO^T or k q^T) [key][query], both operands K-major
    float p[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) p[i] = 0.f;
    float acc[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.f;
    wg_fence();
    {
      const unsigned char* As = wg == 0 ? Vs : Ks;
      const unsigned char* Bs = wg == 0 ? Os : Qs;
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        Wgmma<T, 64>::template ss<0, 0>(p, desc(As + 256 * kk, kColStep, kRowStep, false),
                                        desc(Bs + 256 * kk, kColStep, kRowStep, false), 1);
      wg_commit();
      // 2. dk (token rows) = v dS^T, dv = k dS: B = dS^T [dv][dk] or dS [dk][dv],
      // K-major (one instruction form for both warpgroups: no divergent wgmma)
#pragma unroll
      for (int kk = 0; kk < kD / 16; ++kk)
        Wgmma<T, 128>::template ss<0, 0>(acc, desc(As + 256 * kk, kColStep, kRowStep, false),
                                         desc((wg == 0 ? Dsm : DsmT) + 256 * kk, kColStep, kRowStep, false), 1);
      wg_commit();
    }
    // 3. this warpgroup's dS rows: dS = exp(G_last) dS + (q^T diag(w_entry))[rows] dO
    // (the decay was applied before the first product: no register of a wgmma in
    // flight is touched)
    {
      uint32_t qa[4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int mi = lane >> 3, r = lane & 7;
        const int row = 16 * kk + (mi >> 1) * 8 + r, col = 64 * wg + 16 * wl + (mi & 1) * 8;
        ldsm_x4_t(qa[kk], Qs + cm_offset(row, col, kD));
        const int x = 16 * kk + 2 * (lane & 3);
        const float w0 = entry_weight(ms, x, args.scale), w1 = entry_weight(ms, x + 1, args.scale);
        const float w2 = entry_weight(ms, x + 8, args.scale), w3 = entry_weight(ms, x + 9, args.scale);
        qa[kk][0] = scale2<T>(qa[kk][0], w0, w1);
        qa[kk][1] = scale2<T>(qa[kk][1], w0, w1);
        qa[kk][2] = scale2<T>(qa[kk][2], w2, w3);
        qa[kk][3] = scale2<T>(qa[kk][3], w2, w3);
      }
      wg_fence();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk)
        Wgmma<T, 128>::template rs<1>(Ds, qa[kk], desc(Os + 2 * kRowStep * kk, kRowStep, kColStep, true), 1);
      wg_commit();
    }
    // P^T done: mask, decay, scale in registers; rows = keys y, columns = queries x;
    // then the A fragments of the k16 query blocks (accumulator pairs = A pairs)
    wg_wait<2>();
    wg_fence_operand(p);
    uint32_t pa[4][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = 16 * wl + (lane >> 2) + 8 * hf;
        const int x = 8 * j + 2 * (lane & 3);
        const float Gy = ms[2 * y], sy = ms[2 * y + 1];
        const float w0 = args.scale * pair_weight(x, y, ms[2 * x], ms[2 * x + 1], Gy, sy);
        const float w1 = args.scale * pair_weight(x + 1, y, ms[2 * x + 2], ms[2 * x + 3], Gy, sy);
        pa[j >> 1][(j & 1) * 2 + hf] = pack2<T>(p[4 * j + 2 * hf] * w0, p[4 * j + 2 * hf + 1] * w1);
      }
    wg_wait<1>();  // the first product is done (the dS update may still run)
    wg_fence_operand(acc);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const int y = 16 * wl + (lane >> 2) + 8 * hf;
      const float e = exit_weight(ms, y, Gl, sl);
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        acc[4 * j + 2 * hf] *= e;
        acc[4 * j + 2 * hf + 1] *= e;
      }
    }
    wg_fence();
    // 4. + P^T X: A = P^T from registers, B = X = q or dO [token][dim] MN-major
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      Wgmma<T, 128>::template rs<1>(acc, pa[kk], desc((wg == 0 ? Qs : Os) + 2 * kRowStep * kk, kRowStep, kColStep, true), 1);
    wg_commit();
    wg_wait<0>();
    wg_fence_operand(acc);
    wg_fence_operand(Ds);

    // ---- epilogue: dk (with k . dk) or dv to global memory -----------------------
    T* out_b = wg == 0 ? dk_b : dv_b;
    const int64_t ost = wg == 0 ? args.dk_out.st : args.dv_out.st;
    const int odim = wg == 0 ? dk : dv;
    float kd[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 16; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = 16 * wl + (lane >> 2) + 8 * hf;
        const int d = 8 * j + 2 * (lane & 3);
        const float a0 = acc[4 * j + 2 * hf], a1 = acc[4 * j + 2 * hf + 1];
        if (wg == 0 && has_dg) {
          const float2 kv = unpack2<T>(*reinterpret_cast<const uint32_t*>(Ks + cm_offset(y, d, kD)));
          kd[hf] += a0 * kv.x + a1 * kv.y;
        }
        if (full || (y < nvalid && d < odim))
          *reinterpret_cast<uint32_t*>(out_b + (t0 + y) * ost + d) = pack2<T>(a0, a1);
      }
    if (wg == 0 && has_dg) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        kd[hf] += __shfl_xor_sync(0xffffffffu, kd[hf], 1);
        kd[hf] += __shfl_xor_sync(0xffffffffu, kd[hf], 2);
        if ((lane & 3) == 0) red[16 * wl + (lane >> 2) + 8 * hf] = kd[hf];
      }
      named_bar(1, 128);
      if (warp == 0) {
        float v[2];
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int y = 2 * lane + e;
          v[e] = y < nvalid ? qdq_s[stage * 64 + y] - red[y] : 0.f;
        }
        float s = v[0] + v[1];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
          const float t = __shfl_down_sync(0xffffffffu, s, o);
          if (lane + o < 32) s += t;
        }
        const float total = __shfl_sync(0xffffffffu, s, 0);
        if (2 * lane < nvalid) args.dg[bth(g, b, g.begin + t0 + 2 * lane, h)] = carry + s;
        if (2 * lane + 1 < nvalid) args.dg[bth(g, b, g.begin + t0 + 2 * lane + 1, h)] = carry + s - v[0];
        carry += total;
      }
    }
  }
  cp_async_wait_all();
  if (has_dg && !args.fold_offset && tid == 0) args.seg_total[bh * g.nseg + seg] = carry;
#else
  (void)args;
#endif
}

template <typename T>
void launch_t(const DkdvArgs& a, cudaStream_t s) {
  constexpr int smem = Sm90DkdvLayout::kBytes;
  auto k = tc_dkdv_sm90_kernel<T>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  k<<<static_cast<unsigned>(a.g.bh() * a.g.nseg), 256, smem, s>>>(a);
  check_launch("tc_dkdv_sm90_kernel");
}

}  // namespace

int tc_dkdv_sm90_smem() { return Sm90DkdvLayout::kBytes; }

void launch_tc_dkdv_sm90(Elem e, const DkdvArgs& a, cudaStream_t s) {
  if (e == Elem::kBF16) launch_t<__nv_bfloat16>(a, s);
  else launch_t<__half>(a, s);
}

}  // namespace lasp2::cuda
