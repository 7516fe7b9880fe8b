// KernelBackend for CUDA device pointers. Each call enqueues its kernels on the
// given stream (void* = cudaStream_t, null = legacy default stream) and returns
// without synchronizing. Temporary buffers come from the stream-ordered allocator
// (cudaMallocAsync / cudaFreeAsync on the same stream).
//
// Routing: bf16/fp16 inputs with head dims <= 128 that are multiples of 8, 16-byte
// aligned base pointers and strides that are multiples of 8 elements take the
// tensor-core kernels (tc_*.cu); everything else (fp32, other sizes up to 256,
// odd strides) takes the generic FMA kernels (generic_kernels.cu). The parameter
// `chunk_size` is a CPU knob: the GPU always works in 64-token chunks grouped into
// segments that run in parallel (results equal the same math).
//
// Environment knobs (tests, benchmarks): LASP2_CUDA_SEG_CHUNKS=<n> forces n chunks
// per segment; LASP2_CUDA_FORCE_GENERIC=1 disables the tensor-core kernels.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "launch.h"
#include "lasp2/kernel_backend.h"

namespace lasp2 {
namespace {

using namespace lasp2::cuda;

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(std::string("lasp2 (CUDA): ") + what + ": " + cudaGetErrorString(e));
}

struct DeviceInfo {
  int sms = 1;
  int smem_optin = 48 * 1024;
  bool pools = false;
};

const DeviceInfo& device_info() {
  static std::mutex mu;
  static std::unordered_map<int, DeviceInfo> cache;
  int dev = 0;
  cuda_check(cudaGetDevice(&dev), "cudaGetDevice");
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(dev);
  if (it != cache.end()) return it->second;
  DeviceInfo info;
  cuda_check(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
  cuda_check(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
             "attribute");
  int pools = 0;
  cuda_check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev), "attribute");
  info.pools = pools != 0;
  return cache.emplace(dev, info).first->second;
}

int env_int(const char* name, int fallback) {
  const char* s = std::getenv(name);
  return (s != nullptr && *s != '\0') ? std::atoi(s) : fallback;
}

cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// One stream-ordered allocation carved into 256-byte aligned pieces.
class Scratch {
 public:
  void add(int64_t floats) { sizes_.push_back(floats); }
  void allocate(cudaStream_t s) {
    stream_ = s;
    int64_t bytes = 0;
    for (int64_t f : sizes_) bytes += round_up(f * 4);
    if (bytes == 0) return;
    if (device_info().pools) {
      cuda_check(cudaMallocAsync(&base_, bytes, s), "cudaMallocAsync of the scratch buffer");
      async_ = true;
    } else {
      cuda_check(cudaMalloc(&base_, bytes), "cudaMalloc of the scratch buffer");
    }
  }
  float* piece(size_t i) const {
    char* p = static_cast<char*>(base_);
    for (size_t j = 0; j < i; ++j) p += round_up(sizes_[j] * 4);
    return sizes_[i] > 0 ? reinterpret_cast<float*>(p) : nullptr;
  }
  ~Scratch() {
    if (base_ == nullptr) return;
    if (async_) {
      cudaFreeAsync(base_, stream_);
    } else {
      cudaStreamSynchronize(stream_);
      cudaFree(base_);
    }
  }

 private:
  static int64_t round_up(int64_t b) { return (b + 255) / 256 * 256; }
  std::vector<int64_t> sizes_;
  void* base_ = nullptr;
  cudaStream_t stream_ = nullptr;
  bool async_ = false;
};

Elem elem_of(ScalarType t) {
  switch (t) {
    case ScalarType::kFloat32:
      return Elem::kF32;
    case ScalarType::kFloat16:
      return Elem::kF16;
    case ScalarType::kBFloat16:
      return Elem::kBF16;
    default:
      fail(std::string("lasp2 (CUDA): inputs must be float32, float16 or bfloat16, got ") +
           to_string(t));
  }
}

View view_of(ConstView v) { return {const_cast<void*>(v.data), v.stride.batch, v.stride.seq, v.stride.head}; }
View view_of(MutView v) { return {v.data, v.stride.batch, v.stride.seq, v.stride.head}; }

void check_params(const AttentionParams& p, TokenRange part) {
  elem_of(p.dtype);
  LASP2_CHECK(p.decay.mode == DecayMode::kNone || p.decay.dtype == ScalarType::kFloat32,
              std::string("CUDA kernels take float32 decay values (log_decay / gate), got ") +
                  to_string(p.decay.dtype));
  LASP2_CHECK(p.decay.mode != DecayMode::kFixed || p.decay.log_decay != nullptr,
              "DecayMode::kFixed needs log_decay");
  LASP2_CHECK(p.decay.mode != DecayMode::kGate || p.decay.gate != nullptr,
              "DecayMode::kGate needs gate");
  LASP2_CHECK(p.dim_k >= 1 && p.dim_k <= kMaxGenericDim && p.dim_v >= 1 && p.dim_v <= kMaxGenericDim,
              "CUDA kernels support head dims 1..256, got dim_k=" + std::to_string(p.dim_k) +
                  ", dim_v=" + std::to_string(p.dim_v));
  LASP2_CHECK(p.batch >= 0 && p.heads >= 0 && p.seqlen >= 0, "negative sizes");
  LASP2_CHECK(p.bh() <= 65535, "CUDA kernels support batch * heads <= 65535");
  LASP2_CHECK(part.begin >= 0 && part.begin <= part.end && part.end <= p.seqlen,
              "token range outside the local sequence");
  LASP2_CHECK(part.length() < (int64_t{1} << 30), "part too long for the CUDA kernels");
}

// Tensor-core eligibility of a set of views.
bool tc_views_ok(std::initializer_list<View> views) {
  for (const View& v : views) {
    if (reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0) return false;
    if (v.sb % 8 != 0 || v.st % 8 != 0 || v.sh % 8 != 0) return false;
  }
  return true;
}

// 0 = generic, else the tile dimension D (64 or 128) of the tensor-core kernels.
int tc_dim(const AttentionParams& p, std::initializer_list<View> views, int smem_needed_64,
           int smem_needed_128) {
  if (env_int("LASP2_CUDA_FORCE_GENERIC", 0) != 0) return 0;
  if (p.dtype != ScalarType::kBFloat16 && p.dtype != ScalarType::kFloat16) return 0;
  if (p.dim_k % 8 != 0 || p.dim_v % 8 != 0 || p.dim_k > 128 || p.dim_v > 128) return 0;
  if (!tc_views_ok(views)) return 0;
  const int D = std::max(p.dim_k, p.dim_v) <= 64 ? 64 : 128;
  const int need = D == 64 ? smem_needed_64 : smem_needed_128;
  return need <= device_info().smem_optin ? D : 0;
}

// D: tile dimension of the tensor-core kernels (64 or 128), 0 for the generic path.
Geom make_geom(const AttentionParams& p, TokenRange part, int D) {
  Geom g;
  g.batch = static_cast<int>(p.batch);
  g.heads = static_cast<int>(p.heads);
  g.seqlen = p.seqlen;
  g.begin = part.begin;
  g.n = static_cast<int>(part.length());
  g.nchunks = (g.n + kChunk - 1) / kChunk;
  int sc = env_int("LASP2_CUDA_SEG_CHUNKS", 0);
  if (sc <= 0) {
    // Tensor cores: about one wave of (b, h, segment) blocks, as long segments as
    // that allows, so that the segment states and their scan stay a small part of
    // the traffic. Measured on H100 at T = 64K, H = 16 (docs/kernels.md): D = 128
    // (one 512-thread block per SM) 128-chunk segments beat 64-chunk ones by 15%
    // (measured with the earlier 256-thread blocks); D = 64 (256-thread blocks,
    // two per SM) needs two blocks per SM.
    // Generic: four blocks per SM. Segments have >= 4 chunks.
    const int per_sm = D == 128 ? 1 : D == 64 ? 2 : 4;
    const int64_t target = per_sm * static_cast<int64_t>(device_info().sms);
    const int64_t want = std::max<int64_t>(1, target / std::max<int64_t>(1, g.bh()));
    sc = static_cast<int>(std::max<int64_t>(4, (g.nchunks + want - 1) / want));
  }
  g.seg_chunks = std::max(1, std::min(sc, std::max(1, g.nchunks)));
  g.nseg = std::max(1, (g.nchunks + g.seg_chunks - 1) / g.seg_chunks);
  return g;
}

// wmeta (nullable): per-token weights for the tensor-core segment-state kernel.
MetaArgs meta_args(const AttentionParams& p, const Geom& g, float* meta, float* segL,
                   float* wmeta) {
  MetaArgs m;
  m.g = g;
  m.mode = static_cast<int>(p.decay.mode);
  m.log_decay = static_cast<const float*>(p.decay.log_decay);
  m.gate = static_cast<const float*>(p.decay.gate);
  m.gsb = p.decay.gate_stride.batch;
  m.gst = p.decay.gate_stride.seq;
  m.gsh = p.decay.gate_stride.head;
  m.doc = p.doc_start;
  m.doc_sb = p.doc_start_batch_stride;
  m.meta = meta;
  m.segL = segL;
  m.wmeta = wmeta;
  return m;
}

// Segment states of (a, b) over the part (exit or entry weights) into X; the
// tensor-core kernel (D > 0) reads the per-token weights wmeta, the generic one meta.
void run_states(const AttentionParams& p, const Geom& g, int D, View a, View b, int da, int db,
                const float* meta, const float* wmeta, float coef, bool entry, float* X,
                cudaStream_t s) {
  StateArgs sa;
  sa.g = g;
  sa.a = a;
  sa.b = b;
  sa.da = da;
  sa.db = db;
  sa.meta = meta;
  sa.wmeta = wmeta;
  sa.coef = coef;
  sa.out = X;
  if (D > 0) {
    launch_tc_state(elem_of(p.dtype), D, sa, entry, s);
  } else {
    const bool smem = generic_state_smem(da, db, true) <= device_info().smem_optin;
    launch_generic_state(elem_of(p.dtype), sa, entry, smem, s);
  }
}

int state_D(const AttentionParams& p, View a, View b) {
  return tc_dim(p, {a, b}, tc_state_smem(64), tc_state_smem(128));
}

// The state of a whole part, reduced over segments in parallel: exit-weighted
// sum of k v^T (part_state, with the part's log decay) or entry-weighted
// scale * sum q dO^T (part_dstate, entry = true, scanned in reverse).
void reduce_part(const AttentionParams& p, TokenRange part, View a, View b, bool entry,
                 float* state, float* log_decay, cudaStream_t s) {
  const int64_t se = p.state_elems();
  if (p.bh() == 0) return;
  if (part.length() == 0) {
    cuda_check(cudaMemsetAsync(state, 0, p.bh() * se * 4, s), "cudaMemsetAsync");
    if (log_decay) cuda_check(cudaMemsetAsync(log_decay, 0, p.bh() * 4, s), "cudaMemsetAsync");
    return;
  }
  const int D = state_D(p, a, b);
  const Geom g = make_geom(p, part, D);
  Scratch sc;
  sc.add(g.bh() * g.nchunks * kChunk * 2);
  sc.add(g.bh() * g.nseg);
  sc.add(g.bh() * g.nseg * se);
  sc.add(D > 0 ? g.bh() * g.nchunks * kChunk * 2 : 0);
  sc.allocate(s);
  float *meta = sc.piece(0), *segL = sc.piece(1), *X = sc.piece(2), *wmeta = sc.piece(3);
  launch_meta(meta_args(p, g, meta, segL, wmeta), s);
  run_states(p, g, D, a, b, static_cast<int>(p.dim_k), static_cast<int>(p.dim_v), meta, wmeta,
             entry ? static_cast<float>(p.scale) : 1.f, entry, X, s);
  launch_scan(X, segL, g.bh(), g.nseg, se, entry, false, nullptr, state, log_decay, s);
}

class CudaBackend final : public KernelBackend {
 public:
  Device device() const override { return Device::kCUDA; }

  void part_state(const AttentionParams& p, TokenRange part, float* state, float* log_decay,
                  void* stream) const override {
    check_params(p, part);
    reduce_part(p, part, view_of(p.k), view_of(p.v), false, state, log_decay, as_stream(stream));
  }

  void chunk_forward(const AttentionParams& p, TokenRange part, const float* initial_state,
                     MutView o, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0 || part.length() == 0) return;
    run_output(p, part, FwdMode::kFwd, view_of(p.q), view_of(p.k), view_of(p.v), View{},
               view_of(o), static_cast<int>(p.dim_k), static_cast<int>(p.dim_v), initial_state,
               false, nullptr, as_stream(stream));
  }

  void add_prefix_output(const AttentionParams& p, TokenRange part, const float* prefix,
                         MutView o, void* stream) const override {
    check_params(p, part);
    if (p.bh() == 0 || part.length() == 0 || prefix == nullptr) return;
    run_output(p, part, FwdMode::kPrefix, view_of(p.q), View{}, View{}, View{}, view_of(o),
               static_cast<int>(p.dim_k), static_cast<int>(p.dim_v), prefix, false, nullptr,
               as_stream(stream));
  }

  void part_dstate(const AttentionParams& p, TokenRange part, ConstView dout, float* dstate,
                   void* stream) const override {
    check_params(p, part);
    reduce_part(p, part, view_of(p.q), view_of(dout), true, dstate, nullptr, as_stream(stream));
  }

  void chunk_backward_dq(const AttentionParams& p, TokenRange part, ConstView dout,
                         const float* initial_state, MutView dq, void* q_dot_dq,
                         void* stream) const override {
    check_params(p, part);
    LASP2_CHECK(q_dot_dq == nullptr || p.decay.dtype == ScalarType::kFloat32,
                "CUDA kernels write q_dot_dq as float32 (decay dtype must be float32)");
    if (p.bh() == 0 || part.length() == 0) return;
    // dq is the forward pass of (dO, v, k) with the transposed state.
    run_output(p, part, q_dot_dq != nullptr ? FwdMode::kDq : FwdMode::kFwd, view_of(dout),
               view_of(p.v), view_of(p.k), view_of(p.q), view_of(dq), static_cast<int>(p.dim_v),
               static_cast<int>(p.dim_k), initial_state, true, static_cast<float*>(q_dot_dq),
               as_stream(stream));
  }

  void chunk_backward_dkdv(const AttentionParams& p, TokenRange part, ConstView dout,
                           const float* final_dstate, MutView dk, MutView dv,
                           const void* q_dot_dq, const float* dg_offset, void* dg,
                           void* stream) const override {
    check_params(p, part);
    LASP2_CHECK(dg == nullptr || q_dot_dq != nullptr, "dg needs q_dot_dq from the dq pass");
    LASP2_CHECK(dg == nullptr || p.decay.dtype == ScalarType::kFloat32,
                "CUDA kernels write dg as float32 (decay dtype must be float32)");
    const cudaStream_t s = as_stream(stream);
    if (p.bh() == 0 || part.length() == 0) return;
    const int64_t se = p.state_elems();
    const View q = view_of(p.q), k = view_of(p.k), v = view_of(p.v), d = view_of(dout);
    const View dkv = view_of(dk), dvv = view_of(dv);
    const int D = tc_dim(p, {q, k, v, d, dkv, dvv}, tc_dkdv_smem(64), tc_dkdv_smem(128));
    const Geom g = make_geom(p, part, D);
    const int idk = static_cast<int>(p.dim_k), idv = static_cast<int>(p.dim_v);
    bool smem_state = true;
    if (D == 0) smem_state = generic_dkdv_smem(idk, idv, true) <= device_info().smem_optin;
    const int sD = g.nseg > 1 ? state_D(p, q, d) : 0;  // the entry-state pass, if any
    Scratch sc;
    sc.add(g.bh() * g.nchunks * kChunk * 2);
    sc.add(g.bh() * g.nseg);
    sc.add(g.nseg > 1 ? g.bh() * g.nseg * se : 0);
    sc.add(g.bh() * g.nseg);
    sc.add(smem_state ? 0 : g.bh() * g.nseg * generic_state_scratch_floats(idk, idv));
    sc.add(sD > 0 ? g.bh() * g.nchunks * kChunk * 2 : 0);
    sc.allocate(s);
    float *meta = sc.piece(0), *segL = sc.piece(1), *X = sc.piece(2), *tot = sc.piece(3);
    float* wmeta = sc.piece(5);
    launch_meta(meta_args(p, g, meta, segL, wmeta), s);
    DkdvArgs a;
    a.g = g;
    a.q = q;
    a.k = k;
    a.v = v;
    a.dout = d;
    a.dk_out = dkv;
    a.dv_out = dvv;
    a.dk = idk;
    a.dv = idv;
    a.meta = meta;
    a.scale = static_cast<float>(p.scale);
    a.qdq = static_cast<const float*>(q_dot_dq);
    a.dg = static_cast<float*>(dg);
    a.dg_offset = dg_offset;
    a.seg_total = tot;
    a.fold_offset = g.nseg == 1 ? 1 : 0;
    a.scratch = sc.piece(4);
    if (g.nseg > 1) {
      run_states(p, g, sD, q, d, idk, idv, meta, wmeta, static_cast<float>(p.scale), true, X, s);
      launch_scan(X, segL, g.bh(), g.nseg, se, true, true, final_dstate, nullptr, nullptr, s);
      a.dstate = X;
      a.dstate_bh = g.nseg * se;
      a.dstate_seg = se;
    } else {
      a.dstate = final_dstate;
      a.dstate_bh = se;
      a.dstate_seg = 0;
    }
    if (D > 0) launch_tc_dkdv(elem_of(p.dtype), D, a, s);
    else launch_generic_dkdv(elem_of(p.dtype), a, smem_state, s);
    if (dg != nullptr && g.nseg > 1) launch_dg_fixup(g, a.dg, tot, dg_offset, s);
  }

  void combine_prefix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void* stream) const override {
    combine(parts, log_decays, target, bh, state_elems, out, false, stream);
  }

  void combine_suffix(const std::vector<const float*>& parts, const float* log_decays,
                      int target, int64_t bh, int64_t state_elems, float* out,
                      void* stream) const override {
    combine(parts, log_decays, target, bh, state_elems, out, true, stream);
  }

  void state_dot(const float* prefix, const float* state, const float* log_decay,
                 const float* dstate, int64_t bh, int64_t state_elems, float* out,
                 void* stream) const override {
    if (bh == 0) return;
    LASP2_CHECK(bh <= 2147483647, "state_dot: too many (b, h) rows");
    launch_state_dot(prefix, state, log_decay, dstate, bh, state_elems, out, as_stream(stream));
  }

  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    if (count <= 0 || dst == src) return;
    cuda_check(cudaMemcpyAsync(dst, src, count * sizeof(float), cudaMemcpyDeviceToDevice,
                               as_stream(stream)),
               "cudaMemcpyAsync");
  }

  void fill_zero(float* dst, int64_t count, void* stream) const override {
    if (count <= 0) return;
    cuda_check(cudaMemsetAsync(dst, 0, count * sizeof(float), as_stream(stream)),
               "cudaMemsetAsync");
  }

 private:
  static void combine(const std::vector<const float*>& parts, const float* log_decays, int target,
                      int64_t bh, int64_t state_elems, float* out, bool suffix, void* stream) {
    LASP2_CHECK(static_cast<int64_t>(parts.size()) <= kMaxParts,
                "CUDA combine supports at most " + std::to_string(kMaxParts) + " parts, got " +
                    std::to_string(parts.size()));
    LASP2_CHECK(target >= 0 && target < static_cast<int>(std::max<size_t>(parts.size(), 1)),
                "combine: target part out of range");
    LASP2_CHECK(bh <= 65535, "CUDA combine supports batch * heads <= 65535");
    if (bh == 0 || state_elems == 0) return;
    PartTable table{};
    for (size_t i = 0; i < parts.size(); ++i) table.p[i] = parts[i];
    launch_combine(table, static_cast<int>(parts.size()), log_decays, target, bh, state_elems,
                   suffix, out, as_stream(stream));
  }

  // Segment states + scan (when the part has several segments), then the output pass.
  static void run_output(const AttentionParams& p, TokenRange part, FwdMode mode, View qa, View ka,
                         View va, View x, View out, int da, int dv, const float* init,
                         bool transposed, float* qdq, cudaStream_t s) {
    const int64_t se = p.state_elems();
    int D = 0;
    if (mode == FwdMode::kPrefix) {
      D = tc_dim(p, {qa, out}, tc_fwd_smem(64, mode), tc_fwd_smem(128, mode));
    } else if (mode == FwdMode::kDq) {
      D = tc_dim(p, {qa, ka, va, x, out}, tc_fwd_smem(64, mode), tc_fwd_smem(128, mode));
    } else {
      D = tc_dim(p, {qa, ka, va, out}, tc_fwd_smem(64, mode), tc_fwd_smem(128, mode));
    }
    const Geom g = make_geom(p, part, D);
    bool smem_state = true;
    if (D == 0) smem_state = generic_fwd_smem(da, dv, mode, true) <= device_info().smem_optin;
    const bool need_states = mode != FwdMode::kPrefix && g.nseg > 1;
    const View k = view_of(p.k), v = view_of(p.v);
    const int sD = need_states ? state_D(p, k, v) : 0;  // the segment-state pass, if any
    Scratch sc;
    sc.add(g.bh() * g.nchunks * kChunk * 2);
    sc.add(g.bh() * g.nseg);
    sc.add(need_states ? g.bh() * g.nseg * se : 0);
    sc.add(smem_state ? 0 : g.bh() * g.nseg * generic_state_scratch_floats(da, dv));
    sc.add(sD > 0 ? g.bh() * g.nchunks * kChunk * 2 : 0);
    sc.allocate(s);
    float *meta = sc.piece(0), *segL = sc.piece(1), *X = sc.piece(2), *wmeta = sc.piece(4);
    launch_meta(meta_args(p, g, meta, segL, wmeta), s);
    FwdArgs a;
    a.g = g;
    a.qa = qa;
    a.ka = ka;
    a.va = va;
    a.x = x;
    a.out = out;
    a.da = da;
    a.dv = dv;
    a.meta = meta;
    a.segL = segL;
    a.state_transposed = transposed ? 1 : 0;
    a.scale = static_cast<float>(p.scale);
    a.qdq = qdq;
    a.scratch = sc.piece(3);
    if (need_states) {
      // The true state K^T V ([dk][dv]) of each segment, then the prefix scan.
      run_states(p, g, sD, k, v, static_cast<int>(p.dim_k), static_cast<int>(p.dim_v), meta,
                 wmeta, 1.f, false, X, s);
      launch_scan(X, segL, g.bh(), g.nseg, se, false, true, init, nullptr, nullptr, s);
      a.state = X;
      a.state_bh = g.nseg * se;
      a.state_seg = se;
    } else {
      a.state = init;
      a.state_bh = se;
      a.state_seg = 0;
    }
    if (D > 0) launch_tc_fwd(elem_of(p.dtype), D, a, mode, s);
    else launch_generic_fwd(elem_of(p.dtype), a, mode, smem_state, s);
  }
};

}  // namespace

const KernelBackend& cuda_backend() {
  static const CudaBackend backend;
  return backend;
}

}  // namespace lasp2
