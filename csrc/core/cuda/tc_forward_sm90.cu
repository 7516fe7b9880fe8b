// Hopper (sm_90a) output pass: the same function as tc_forward.cu's kernel in the
// kFwd (o) and kDq (dq and q.dq) modes at D = 128, on warpgroup MMAs (wgmma) with
// operands read from shared memory by the tensor cores (wgmma.cuh).
//
// One block per (b, h, segment), two warpgroups, walking the segment's chunks in
// order with the running state S_a (da x dv, fp32) in accumulators: warpgroup w
// keeps the state columns (output dims) [64w, +64), as two 64-row blocks. The tiles
// qa, ka, va (and q for kDq) come by cp.async one chunk ahead, stored as core
// matrices (wgmma.cuh). Per 64-token chunk:
//   0. both warpgroups write their state columns (16-bit) to shared memory, then
//      the proxy fence and the block's one barrier; only then the next chunk's
//      copies are issued (a proxy fence waits for the issuing thread's copies).
//   1. P = qa ka^T (each warpgroup all of it: it becomes its A operand in 4.);
//   2. out = qa S_a[:, cols] (B = the state, MN-major);
//   3. S_a[:, cols] = exp(G_last) S_a + (ka^T diag(w_exit)) va[:, cols], A from
//      registers (ldmatrix + the exit weights);
//   then, as the products complete: the mask, decay and scale on P in registers,
//   the entry weights on the rows of 2., and
//   4. out += P va[:, cols], with P's accumulator pairs as the A fragments.
//   kDq: q . dq per token from the fp32 accumulators (two halves, summed).
// All wgmma forms are the same in both warpgroups (no divergent wgmma, which
// ptxas would serialize); P never goes through shared memory.
// The body exists only for sm_90a (the route: sm90a_kernels()).
#include "device_utils.cuh"
#include "wgmma.cuh"

namespace lasp2::cuda {
namespace {

constexpr int kD = 128;
constexpr int kTileBytes = kChunk * kD * 2;  // 16 KiB, core-matrix layout [token][dim]
template <bool kDq>
struct Sm90FwdLayout {
  static constexpr int NT = kDq ? 4 : 3;                  // qa, ka, va (, q)
  static constexpr int kTiles = 0;                        // [2 stages][NT]
  static constexpr int kS = kTiles + 2 * NT * kTileBytes;  // S_a [da][dv] 16-bit
  static constexpr int kMeta = kS + kD * kD * 2;          // [2][128] floats
  static constexpr int kRed = kMeta + 2 * 128 * 4;        // q . dq halves [2][64]
  static constexpr int kBytes = kRed + 2 * 64 * 4;
};

constexpr uint32_t kColStep = 128, kRowStep = 16 * 128;

template <typename T, bool kDq>
__global__ void __launch_bounds__(256, 1) tc_fwd_sm90_kernel(FwdArgs args) {
#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using L = Sm90FwdLayout<kDq>;
  constexpr int NT = L::NT;
  extern __shared__ __align__(128) unsigned char smem[];
  unsigned char* Ssm = smem + L::kS;
  float* meta_s = reinterpret_cast<float*>(smem + L::kMeta);
  float* red = reinterpret_cast<float*>(smem + L::kRed);

  const Geom& g = args.g;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wg = warp >> 2, wl = warp & 3;
  const int seg = blockIdx.x % g.nseg;
  const int64_t bh = blockIdx.x / g.nseg;
  const int b = static_cast<int>(bh / g.heads), h = static_cast<int>(bh % g.heads);
  const int c_begin = seg * g.seg_chunks;
  const int c_end = min(g.nchunks, c_begin + g.seg_chunks);
  const int da = args.da, dv = args.dv;
  auto desc = [](const unsigned char* p, uint32_t kstep, uint32_t mnstep, bool) {
    return wg_desc(p, kstep, mnstep);
  };

  // State columns [64 wg, +64): S[mb][4 j + 2 hf + e] = S_a[64 mb + 16 wl +
  // lane / 4 + 8 hf][64 wg + 8 j + 2 (lane % 4) + e] (two m64 accumulator blocks).
  float S[2][32];
  {
    const float* E = args.state != nullptr ? args.state + bh * args.state_bh + seg * args.state_seg
                                           : nullptr;
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ii = 64 * mb + 16 * wl + (lane >> 2) + 8 * (e >> 1);  // qa dim
          const int jj = 64 * wg + 8 * j + 2 * (lane & 3) + (e & 1);     // output dim
          float val = 0.f;
          if (E != nullptr && jj < dv && ii < da)
            val = args.state_transposed ? E[jj * da + ii] : E[ii * dv + jj];
          S[mb][4 * j + e] = val;
        }
  }

  const T* qa_b = head_base<T>(args.qa, b, h, g.begin);
  const T* ka_b = head_base<T>(args.ka, b, h, g.begin);
  const T* va_b = head_base<T>(args.va, b, h, g.begin);
  const T* x_b = kDq ? head_base<T>(args.x, b, h, g.begin) : nullptr;
  T* out_b = head_base<T>(args.out, b, h, g.begin);
  const float* meta = args.meta + bh * g.nchunks * kChunk * 2;
  auto tile = [&](int stage, int i) { return smem + L::kTiles + (stage * NT + i) * kTileBytes; };

  auto load_one = [&](unsigned char* dst, const T* src, int64_t st, int nvalid, int dim) {
    copy_tile_cm<kD>(dst, src, st, nvalid, dim, tid);
  };
  auto load = [&](int c, int stage) {
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    load_one(tile(stage, 0), qa_b + t0 * args.qa.st, args.qa.st, nvalid, da);
    load_one(tile(stage, 1), ka_b + t0 * args.ka.st, args.ka.st, nvalid, da);
    load_one(tile(stage, 2), va_b + t0 * args.va.st, args.va.st, nvalid, dv);
    if (kDq) load_one(tile(stage, 3), x_b + t0 * args.x.st, args.x.st, nvalid, dv);
    if (tid < 32) cp_async16(meta_s + stage * 128 + tid * 4, meta + c * 128 + tid * 4, true);
    cp_async_commit();
  };

  if (c_begin < c_end) load(c_begin, 0);
  for (int c = c_begin; c < c_end; ++c) {
    const int stage = (c - c_begin) & 1;
    cp_async_wait_all();
    // the state entering chunk c (16-bit) to shared memory (each warpgroup's
    // products read only its own columns: no barrier needed before the stores)
#pragma unroll
    for (int mb = 0; mb < 2; ++mb)
#pragma unroll
      for (int j = 0; j < 8; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int ii = 64 * mb + 16 * wl + (lane >> 2) + 8 * hf;
          const int jj = 64 * wg + 8 * j + 2 * (lane & 3);
          *reinterpret_cast<uint32_t*>(Ssm + cm_offset(ii, jj, kD)) =
              pack2<T>(S[mb][4 * j + 2 * hf], S[mb][4 * j + 2 * hf + 1]);
        }
    // the copies' bytes and the state are read by the tensor cores next; the fence
    // comes before the next chunk's copies are issued (it would wait for them)
    fence_proxy_async();
    __syncthreads();
    if (c + 1 < c_end) load(c + 1, stage ^ 1);
    const float* ms = meta_s + stage * 128;  // (copied by warp 0: read after the barrier)
    const float Gl = ms[126], sl = ms[127];
    const float through = sl == 0.f ? __expf(Gl) : 0.f;
#pragma unroll
    for (int i = 0; i < 32; ++i) {  // the decay, before any wgmma of this chunk is in flight
      S[0][i] *= through;
      S[1][i] *= through;
    }
    const unsigned char* Qs = tile(stage, 0);
    const unsigned char* Ks = tile(stage, 1);
    const unsigned char* Vs = tile(stage, 2);
    const unsigned char* Xs = tile(stage, 3);
    const int nvalid = min(kChunk, g.n - c * kChunk);
    const int64_t t0 = static_cast<int64_t>(c) * kChunk;
    const bool full = nvalid == kChunk && dv == kD;

    float p[32], o[32];
#pragma unroll
    for (int i = 0; i < 32; ++i) {
      p[i] = 0.f;
      o[i] = 0.f;
    }
    wg_fence();
    // 1. P = qa ka^T (64 x 64, both K-major)
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      Wgmma<T, 64>::template ss<0, 0>(p, desc(Qs + 256 * kk, kColStep, kRowStep, false),
                                      desc(Ks + 256 * kk, kColStep, kRowStep, false), 1);
    wg_commit();
    // 2. out = qa S_a[:, cols]: B = S_a [da][dv] MN-major from column 64 wg
#pragma unroll
    for (int kk = 0; kk < kD / 16; ++kk)
      Wgmma<T, 64>::template ss<0, 1>(o, desc(Qs + 256 * kk, kColStep, kRowStep, false),
                                      desc(Ssm + 8 * kColStep * wg + 2 * kRowStep * kk, kRowStep, kColStep, true), 1);
    wg_commit();
    // 3. state columns: S_a += (ka^T diag(w_exit)) va[:, cols], A from registers
    {
      uint32_t ka[2][4][4];
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        const int y = 16 * kk + 2 * (lane & 3);
        const float w0 = exit_weight(ms, y, Gl, sl), w1 = exit_weight(ms, y + 1, Gl, sl);
        const float w2 = exit_weight(ms, y + 8, Gl, sl), w3 = exit_weight(ms, y + 9, Gl, sl);
#pragma unroll
        for (int mb = 0; mb < 2; ++mb) {
          const int mi = lane >> 3, r = lane & 7;
          const int row = 16 * kk + (mi >> 1) * 8 + r, col = 64 * mb + 16 * wl + (mi & 1) * 8;
          ldsm_x4_t(ka[mb][kk], Ks + cm_offset(row, col, kD));
          ka[mb][kk][0] = scale2<T>(ka[mb][kk][0], w0, w1);
          ka[mb][kk][1] = scale2<T>(ka[mb][kk][1], w0, w1);
          ka[mb][kk][2] = scale2<T>(ka[mb][kk][2], w2, w3);
          ka[mb][kk][3] = scale2<T>(ka[mb][kk][3], w2, w3);
        }
      }
      wg_fence();
#pragma unroll
      for (int mb = 0; mb < 2; ++mb)
#pragma unroll
        for (int kk = 0; kk < 4; ++kk)
          Wgmma<T, 64>::template rs<1>(S[mb], ka[mb][kk],
                                       desc(Vs + 8 * kColStep * wg + 2 * kRowStep * kk, kRowStep, kColStep, true), 1);
      wg_commit();
    }
    // P done: mask, decay, scale in registers (rows = queries x, columns = keys y);
    // the accumulator pairs are the A fragments of the k16 key blocks
    wg_wait<2>();
    uint32_t pa[4][4];
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int x = 16 * wl + (lane >> 2) + 8 * hf;
        const int y = 8 * j + 2 * (lane & 3);
        const float Gx = ms[2 * x], sx = ms[2 * x + 1];
        const float w0 = args.scale * pair_weight(x, y, Gx, sx, ms[2 * y], ms[2 * y + 1]);
        const float w1 = args.scale * pair_weight(x, y + 1, Gx, sx, ms[2 * y + 2], ms[2 * y + 3]);
        pa[j >> 1][(j & 1) * 2 + hf] = pack2<T>(p[4 * j + 2 * hf] * w0, p[4 * j + 2 * hf + 1] * w1);
      }
    wg_wait<1>();  // 2. is done (the state update may still run)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      const float e = entry_weight(ms, 16 * wl + (lane >> 2) + 8 * hf, args.scale);
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        o[4 * j + 2 * hf] *= e;
        o[4 * j + 2 * hf + 1] *= e;
      }
    }
    wg_fence();
    // 4. + P va[:, cols]: A = P from registers, B = va MN-major
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
      Wgmma<T, 64>::template rs<1>(o, pa[kk], desc(Vs + 8 * kColStep * wg + 2 * kRowStep * kk, kRowStep, kColStep, true), 1);
    wg_commit();
    wg_wait<0>();
    wg_fence_operand(o);
    wg_fence_operand(S[0]);
    wg_fence_operand(S[1]);

    // ---- epilogue ----------------------------------------------------------------
    float qd[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int y = 16 * wl + (lane >> 2) + 8 * hf;
        const int d = 64 * wg + 8 * j + 2 * (lane & 3);
        const float a0 = o[4 * j + 2 * hf], a1 = o[4 * j + 2 * hf + 1];
        if (kDq) {
          const float2 xv = unpack2<T>(*reinterpret_cast<const uint32_t*>(Xs + cm_offset(y, d, kD)));
          qd[hf] += a0 * xv.x + a1 * xv.y;
        }
        if (full || (y < nvalid && d < dv))
          *reinterpret_cast<uint32_t*>(out_b + (t0 + y) * args.out.st + d) = pack2<T>(a0, a1);
      }
    if (kDq) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        qd[hf] += __shfl_xor_sync(0xffffffffu, qd[hf], 1);
        qd[hf] += __shfl_xor_sync(0xffffffffu, qd[hf], 2);
        if ((lane & 3) == 0) red[64 * wg + 16 * wl + (lane >> 2) + 8 * hf] = qd[hf];
      }
      __syncthreads();
      if (tid < nvalid) args.qdq[bth(g, b, g.begin + t0 + tid, h)] = red[tid] + red[64 + tid];
    }
  }
  cp_async_wait_all();
#else
  (void)args;
#endif
}

template <typename T, bool kDq>
void launch_t(const FwdArgs& a, cudaStream_t s) {
  constexpr int smem = Sm90FwdLayout<kDq>::kBytes;
  auto k = tc_fwd_sm90_kernel<T, kDq>;
  cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  k<<<static_cast<unsigned>(a.g.bh() * a.g.nseg), 256, smem, s>>>(a);
  check_launch("tc_fwd_sm90_kernel");
}

}  // namespace

int tc_fwd_sm90_smem(FwdMode mode) {
  return mode == FwdMode::kDq ? Sm90FwdLayout<true>::kBytes : Sm90FwdLayout<false>::kBytes;
}

void launch_tc_fwd_sm90(Elem e, const FwdArgs& a, FwdMode mode, cudaStream_t s) {
  const bool dq = mode == FwdMode::kDq;
  if (e == Elem::kBF16) {
    if (dq) launch_t<__nv_bfloat16, true>(a, s);
    else launch_t<__nv_bfloat16, false>(a, s);
  } else {
    if (dq) launch_t<__half, true>(a, s);
    else launch_t<__half, false>(a, s);
  }
}

}  // namespace lasp2::cuda
