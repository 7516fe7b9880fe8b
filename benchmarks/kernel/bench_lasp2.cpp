// Times the CUDA backend on one layer's worth of causal linear attention and
// compares it with the device's measured copy bandwidth.
//
//   bench_lasp2 [T=65536] [H=16] [D=128] [B=1] [dtype=bf16|fp16|fp32] [mode=gate|fixed|none] [what]
// what = table (default), sweep (also times several segment lengths through
// LASP2_CUDA_SEG_CHUNKS), fb (only lasp2_forward / lasp2_backward / fwd+bwd, for
// repeated before/after runs), once (each backend function once: for profilers), sp
// (the table's fb rows, then one rank of a P-GPU group at the same local length T:
// sp_rank_table below), or sponce [P=2] [contiguous|balanced] [rank=0] (that rank's
// forward + backward once, for profilers).
// Every table ends with "lasp2_forward (graph)" and "fwd+bwd (graph)": lasp2_forward alone,
// and lasp2_forward + lasp2_backward, captured in a CUDA graph and replayed (the kernels'
// time without host launch gaps).
//
// Inputs are random (a 16 MiB random block tiled over each tensor, never zeros),
// [B, T, H, D] contiguous; gates are log decays in [-0.1, -0.001], fixed decays -0.01 (h + 1)
// per head h, or with LASP2_BENCH_FIXED_DECAY=op -0.05 x uniform [0, 1) per head (the
// distribution of benchmarks/kernel/ab_fixed_op.py and bench_linear_attention.py's fixed
// decay, under which the weakest heads' state walks cover whole segments). Each number is
// the median of 20 runs (CUDA events) after 3 warm-up runs. An eager row starts on an idle
// GPU, so it also counts the host time before and between the call's launches, which a
// graph replay does not: two knobs (unset: nothing changes) tell that part apart.
// LASP2_BENCH_HOST=1 prints the wall time of one eager lasp2_forward / lasp2_backward call
// (from an idle GPU, median). LASP2_BENCH_POOL_KEEP=1 sets the device's memory pool to keep
// what it reserved: by default (release threshold 0) the pool returns freed memory at every
// synchronization, here after each run, so every run's scratch from cudaMallocAsync is
// mapped anew (a graph keeps its allocations). Build (after the CMake build of the core
// in $BUILD):
//   g++ -O2 -std=c++17 -Icsrc/core/include -I$CUDA/include benchmarks/kernel/bench_lasp2.cpp \
//       $BUILD/liblasp2_core.a -L$CUDA/lib64 -lcudart -lpthread -o bench_lasp2
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "lasp2/lasp2.h"

using namespace lasp2;

#define CK(x)                                                                        \
  do {                                                                               \
    cudaError_t e_ = (x);                                                            \
    if (e_ != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                  \
    }                                                                                \
  } while (0)

namespace {

uint64_t rng_state = 0x9E3779B97F4A7C15ull;
uint32_t next_u32() {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return static_cast<uint32_t>(rng_state >> 11);
}
float uniform(float lo, float hi) { return lo + (hi - lo) * (next_u32() & 0xFFFFFF) / 16777216.f; }

uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return static_cast<uint16_t>(u >> 16);
}
uint16_t to_f16(float f) {  // normal range only (|f| < 65504, no denormal care needed here)
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t sign = (u >> 16) & 0x8000;
  int32_t exp = static_cast<int32_t>((u >> 23) & 0xFF) - 127 + 15;
  uint32_t mant = u & 0x7FFFFF;
  if (exp <= 0) return static_cast<uint16_t>(sign);
  uint32_t h = sign | (exp << 10) | (mant >> 13);
  if ((mant & 0x1FFF) > 0x1000 || ((mant & 0x1FFF) == 0x1000 && (h & 1))) ++h;
  return static_cast<uint16_t>(h);
}

// Fills `bytes` of device memory with a 16 MiB random block, repeated.
void fill_random(void* dst, size_t bytes, ScalarType t, float sd) {
  const size_t block = std::min<size_t>(bytes, 16u << 20);
  std::vector<unsigned char> host(block);
  const size_t es = t == ScalarType::kFloat32 ? 4 : 2;
  for (size_t i = 0; i + es <= block; i += es) {
    const float x = sd * (uniform(-1.f, 1.f) + uniform(-1.f, 1.f) + uniform(-1.f, 1.f));
    if (t == ScalarType::kFloat32) std::memcpy(&host[i], &x, 4);
    else {
      const uint16_t h = t == ScalarType::kBFloat16 ? to_bf16(x) : to_f16(x);
      std::memcpy(&host[i], &h, 2);
    }
  }
  for (size_t off = 0; off < bytes; off += block)
    CK(cudaMemcpy(static_cast<char*>(dst) + off, host.data(), std::min(block, bytes - off),
                  cudaMemcpyHostToDevice));
}

int g_warmup = 3, g_reps = 20;
float median_ms(const std::function<void()>& fn, int warmup = -1, int reps = -1) {
  if (warmup < 0) warmup = g_warmup;
  if (reps < 0) reps = g_reps;
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  for (int i = 0; i < warmup; ++i) fn();
  CK(cudaDeviceSynchronize());
  std::vector<float> ts;
  for (int i = 0; i < reps; ++i) {
    CK(cudaEventRecord(a));
    fn();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    ts.push_back(ms);
  }
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ts[ts.size() / 2];
}

// The host's wall time of one call, in us: each from an idle GPU (as in median_ms, whose
// synchronization after every run also lets the memory pool release), median.
float median_host_us(const std::function<void()>& fn) {
  std::vector<float> ts;
  for (int i = 0; i < g_warmup + g_reps; ++i) {
    CK(cudaDeviceSynchronize());
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    const auto t1 = std::chrono::steady_clock::now();
    if (i >= g_warmup) ts.push_back(std::chrono::duration<float, std::micro>(t1 - t0).count());
  }
  CK(cudaDeviceSynchronize());
  CK(cudaGetLastError());
  std::sort(ts.begin(), ts.end());
  return ts[ts.size() / 2];
}

bool env_on(const char* name) {
  const char* s = std::getenv(name);
  return s != nullptr && std::strcmp(s, "1") == 0;
}


// Stands in for a P-rank group on one GPU: rank() and size() of the rank timed, and an
// AllGather that fills every slot with this rank's block the first time a buffer is
// gathered into, and afterwards copies only the rank's own slot (one copy, as a collective
// is one operation; the other slots keep same-shaped values: the gathered values enter only
// the entering-state terms, whose cost does not depend on them). So a rank's time with it
// is its compute alone: what sequence parallelism adds to the one-device call at the same
// local length, the bound on weak-scaling efficiency when communication is free or hidden.
class LoopbackCommunicator final : public Communicator {
 public:
  LoopbackCommunicator(int rank, int size) : rank_(rank), size_(size) {}
  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::kCUDA; }
  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count, ScalarType type,
                                       void* stream) override {
    const std::size_t bytes = count * element_size(type);
    const bool first = std::find(filled_.begin(), filled_.end(), recv) == filled_.end();
    if (first) filled_.push_back(recv);
    for (int r = 0; r < size_; ++r) {
      char* slot = static_cast<char*>(recv) + r * bytes;
      if (slot != send && (first || r == rank_))
        CK(cudaMemcpyAsync(slot, send, bytes, cudaMemcpyDeviceToDevice, static_cast<cudaStream_t>(stream)));
    }
    return std::make_unique<CompletedWork>();
  }
  std::unique_ptr<CommWork> send(const void*, std::size_t, ScalarType, int, void*) override { return ring_only(); }
  std::unique_ptr<CommWork> recv(void*, std::size_t, ScalarType, int, void*) override { return ring_only(); }

 private:
  static std::unique_ptr<CommWork> ring_only() {
    std::fprintf(stderr, "LoopbackCommunicator: LASP-2 only (no point-to-point transfers)\n");
    std::exit(1);
  }
  int rank_, size_;
  std::vector<void*> filled_;  // gather buffers whose every slot has been written
};

// The buffers one rank's lasp2_forward / lasp2_backward keep and use (tests/cpp/cuda/
// device_rank.h allocates the same).
struct RankBuffers {
  std::vector<void*> owned;
  Lasp2Saved saved;
  void* fws = nullptr;
  void* bws = nullptr;
  RankBuffers(const KernelBackend& be, const AttentionParams& p, const PartLayout& l) {
    auto alloc = [&](int64_t bytes) {
      void* ptr = nullptr;
      CK(cudaMalloc(&ptr, std::max<int64_t>(8, bytes)));
      owned.push_back(ptr);
      return ptr;
    };
    auto floats = [&](int64_t n) { return static_cast<float*>(alloc(4 * n)); };
    saved.local_records = floats(Lasp2Saved::local_records_floats(p, l));
    saved.prefix_states = floats(Lasp2Saved::prefix_states_floats(p, l));
    saved.maps = floats(Lasp2Saved::log_decays_floats(p, l));
    saved.segment_states = floats(Lasp2Saved::segment_states_floats(be, p, l));
    fws = alloc(lasp2_forward_workspace_bytes(p, l));
    bws = alloc(lasp2_backward_workspace_bytes(p, l, true));
  }
  ~RankBuffers() {
    for (void* ptr : owned) cudaFree(ptr);
  }
};

// The median time of `calls` replayed from a CUDA graph, or -1 where they cannot be
// captured (then the table says so).
float graph_ms(const std::function<void(cudaStream_t)>& calls) {
  cudaStream_t cs;
  CK(cudaStreamCreate(&cs));
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  bool ok = cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal) == cudaSuccess;
  if (ok) {
    try {
      calls(cs);
    } catch (const std::exception& e) {
      std::printf("(capture failed: %s)\n", e.what());
      ok = false;
    }
    ok = cudaStreamEndCapture(cs, &graph) == cudaSuccess && ok;
    ok = ok && cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess;
  }
  cudaGetLastError();  // a failed capture's error is reported as -1, not by the next CK
  const float t = ok ? median_ms([&] { CK(cudaGraphLaunch(exec, cs)); }) : -1.f;
  if (exec) cudaGraphExecDestroy(exec);
  if (graph) cudaGraphDestroy(graph);
  CK(cudaStreamDestroy(cs));
  return t;
}

// One rank's forward (fused) + backward, enqueued on `s` (comm null: P = 1).
void sp_rank_fb(const KernelBackend& be, const AttentionParams& p, const PartLayout& l, Communicator* comm,
                const RankBuffers& b, MutView o, ConstView dov, MutView dq, MutView dk, MutView dv, float* dg,
                bool overlap, bool backward, cudaStream_t s) {
  Lasp2Options opt;
  opt.overlap_forward = overlap;
  lasp2_forward(be, comm, l, p, o, b.saved, b.fws, opt, s);
  if (backward) lasp2_backward(be, comm, l, p, dov, b.saved, dq, dk, dv, dg, b.bws, s);
}

// what = sp: one rank's forward (fused: the gather waited for, the entering state in the
// output pass, LASP-2's CUDA default; and overlapped) and backward at local length T for
// P = 2, 4, 8 ranks, the first and the last rank, contiguous and balanced splits, against
// the one-device call (P = 1, no communicator) at the same T, eager and from a CUDA graph.
void sp_rank_table(const KernelBackend& be, const AttentionParams& p, MutView o, ConstView dov, MutView dq,
                   MutView dk, MutView dv, float* dg) {
  std::printf("\none rank of a P-GPU group at the same local T, communication free (LoopbackCommunicator);\n"
              "eff = the P = 1 time / the rank's time (the weak-scaling bound), ms\n");
  std::printf("%3s %11s %5s %10s %12s %9s %6s %9s %6s\n", "P", "split", "rank", "fwd fused", "fwd overlap",
              "fwd+bwd", "eff", "fb graph", "eff");
  float base = 0, base_graph = 0;
  for (int P : {1, 2, 4, 8}) {
    for (int balanced = 0; balanced < (P > 1 ? 2 : 1); ++balanced) {
      for (int rank : {0, P - 1}) {
        const PartLayout l = balanced ? PartLayout::balanced(P, rank) : PartLayout::contiguous(P, rank);
        LoopbackCommunicator loop(rank, P);
        Communicator* comm = P > 1 ? &loop : nullptr;
        RankBuffers b(be, p, l);
        auto fwd = [&](bool overlap, cudaStream_t s) {
          sp_rank_fb(be, p, l, comm, b, o, dov, dq, dk, dv, dg, overlap, false, s);
        };
        auto fb_calls = [&](cudaStream_t s) { sp_rank_fb(be, p, l, comm, b, o, dov, dq, dk, dv, dg, false, true, s); };
        const float ff = median_ms([&] { fwd(false, nullptr); });
        const float fo = median_ms([&] { fwd(true, nullptr); });
        const float fb = median_ms([&] { fb_calls(nullptr); });
        const float fbg = graph_ms(fb_calls);
        if (P == 1) base = fb, base_graph = fbg;
        char eg[16] = "n/a";
        if (fbg > 0 && base_graph > 0) std::snprintf(eg, sizeof(eg), "%.2f", base_graph / fbg);
        std::printf("%3d %11s %5d %10.3f %12.3f %9.3f %6.2f %9.3f %6s\n", P, balanced ? "balanced" : "contiguous",
                    rank, ff, fo, fb, base / fb, fbg, eg);
        if (P == 1) break;
      }
    }
  }
}
}  // namespace

int main(int argc, char** argv) {
  const int64_t T = argc > 1 ? std::atoll(argv[1]) : 65536;
  const int64_t H = argc > 2 ? std::atoll(argv[2]) : 16;
  const int64_t D = argc > 3 ? std::atoll(argv[3]) : 128;
  const int64_t B = argc > 4 ? std::atoll(argv[4]) : 1;
  const std::string dts = argc > 5 ? argv[5] : "bf16";
  const std::string ms = argc > 6 ? argv[6] : "gate";
  const ScalarType dt = dts == "fp32" ? ScalarType::kFloat32 : dts == "fp16" ? ScalarType::kFloat16 : ScalarType::kBFloat16;
  const DecayMode mode = ms == "none" ? DecayMode::kNone : ms == "fixed" ? DecayMode::kFixed : DecayMode::kGate;
  const size_t es = element_size(dt);
  const std::string what = argc > 7 ? argv[7] : "table";
  if (what == "once") {
    g_warmup = 0;
    g_reps = 1;
  }

  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  std::printf("device: %s, %d SMs\n", prop.name, prop.multiProcessorCount);
  if (env_on("LASP2_BENCH_POOL_KEEP")) {  // the pool cudaMallocAsync takes from keeps its memory
    cudaMemPool_t pool;
    CK(cudaDeviceGetMemPool(&pool, 0));
    uint64_t keep = UINT64_MAX;
    CK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    std::printf("memory pool: release threshold max (LASP2_BENCH_POOL_KEEP=1)\n");
  }

  // Copy bandwidth: 1 GiB device-to-device, bytes read + bytes written.
  float copy_gbs = 0;
  {
    const size_t bytes = size_t(1) << 30;
    void *x, *y;
    CK(cudaMalloc(&x, bytes));
    CK(cudaMalloc(&y, bytes));
    fill_random(x, bytes, ScalarType::kFloat32, 1.f);
    const float t = median_ms([&] { CK(cudaMemcpyAsync(y, x, bytes, cudaMemcpyDeviceToDevice)); });
    copy_gbs = 2.0 * bytes / (t * 1e6);
    std::printf("copy bandwidth (1 GiB D2D, read+write): %.0f GB/s\n", copy_gbs);
    CK(cudaFree(x));
    CK(cudaFree(y));
  }

  const int64_t n = B * T * H * D;
  const size_t tb = n * es;
  void *q, *k, *v, *dO, *o, *dq, *dk, *dv;
  for (void** p : {&q, &k, &v, &dO, &o, &dq, &dk, &dv}) CK(cudaMalloc(p, tb));
  const float sd = 0.3f;
  for (void* p : {q, k, v, dO}) fill_random(p, tb, dt, sd);
  float *gate, *logd, *dg;
  CK(cudaMalloc(&gate, B * T * H * 4));
  CK(cudaMalloc(&logd, H * 4));
  CK(cudaMalloc(&dg, B * T * H * 4));
  {
    std::vector<float> g(B * T * H), l(H);
    for (auto& x : g) x = uniform(-0.1f, -0.001f);
    for (int64_t h = 0; h < H; ++h) l[h] = -0.01f * (h + 1);
    const char* fixed = std::getenv("LASP2_BENCH_FIXED_DECAY");
    if (fixed != nullptr && std::strcmp(fixed, "op") == 0) {
      for (auto& x : l) x = -0.05f * uniform(0.f, 1.f);
      std::printf("fixed decays (LASP2_BENCH_FIXED_DECAY=op):");
      for (float x : l) std::printf(" %.4f", x);
      std::printf("\n");
    }
    CK(cudaMemcpy(gate, g.data(), g.size() * 4, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(logd, l.data(), l.size() * 4, cudaMemcpyHostToDevice));
  }

  AttentionParams p;
  p.batch = B;
  p.seqlen = T;
  p.heads = H;
  p.dim_k = p.dim_v = D;
  p.dtype = dt;
  const BTHStrides st{T * H * D, H * D, D};
  p.q = {q, st};
  p.k = {k, st};
  p.v = {v, st};
  p.decay.mode = mode;
  p.decay.dtype = ScalarType::kFloat32;
  p.decay.gate = gate;
  p.decay.log_decay = logd;
  p.decay.gate_stride = {T * H, H, 1};
  p.scale = 1.0 / std::sqrt(static_cast<double>(D));
  const KernelBackend& be = cuda_backend();
  const PartLayout layout = PartLayout::contiguous(1, 0);
  const bool with_dg = mode != DecayMode::kNone;
  void* bws = nullptr;
  CK(cudaMalloc(&bws, std::max<int64_t>(8, lasp2_backward_workspace_bytes(p, layout, true))));
  float *state, *L;
  CK(cudaMalloc(&state, B * H * D * D * 4));
  CK(cudaMalloc(&L, B * H * 4));
  float* qdq = static_cast<float*>(bws);
  // what the forward keeps for the backward's dq pass (the segment states)
  Lasp2Saved saved;
  CK(cudaMalloc(&saved.segment_states, std::max<int64_t>(4, 4 * Lasp2Saved::segment_states_floats(be, p, layout))));
  const ConstView dov{dO, st};
  const TokenRange all{0, T};

  struct Row {
    std::string name;
    float ms;
    double bytes;  // minimum bytes to move
    double flops;  // chunked-algorithm matmul flops
  };
  const double tens = static_cast<double>(tb), scal = static_cast<double>(B * T * H * 4);
  const double bhc = static_cast<double>(B * H) * ((T + 63) / 64);  // chunks
  const double C = 64, d = static_cast<double>(D);
  const double f_state = bhc * 2 * C * d * d;                  // K^T V per chunk
  const double f_out = bhc * (2 * C * C * d * 2 + 2 * C * d * d * 2);  // QK^T, PV, QS, state update
  const double f_dkdv = bhc * (2 * C * C * d * 4 + 2 * C * d * d * 3);
  std::vector<Row> rows;
  auto add = [&](const std::string& name, double bytes, double flops, const std::function<void()>& fn) {
    rows.push_back({name, median_ms(fn), bytes, flops});
  };
  if (what == "sponce") {
    const int P = argc > 8 ? std::atoi(argv[8]) : 2;
    const bool balanced = argc > 9 && std::strcmp(argv[9], "balanced") == 0;
    const int rank = argc > 10 ? std::atoi(argv[10]) : 0;
    const PartLayout l = balanced ? PartLayout::balanced(P, rank) : PartLayout::contiguous(P, rank);
    LoopbackCommunicator loop(rank, P);
    RankBuffers b(be, p, l);
    sp_rank_fb(be, p, l, P > 1 ? &loop : nullptr, b, {o, st}, dov, {dq, st}, {dk, st}, {dv, st},
               with_dg ? dg : nullptr, false, true, nullptr);
    CK(cudaDeviceSynchronize());
    std::printf("sponce: P = %d, %s, rank %d: one forward + backward\n", P, balanced ? "balanced" : "contiguous", rank);
    return 0;
  }
  if (what != "fb" && what != "sp") {
    add("part_state (states+scan)", 2 * tens + scal, f_state, [&] { be.part_state(p, all, state, L, nullptr); });
    add("chunk_forward", 4 * tens + scal, f_state + f_out,
        [&] { be.chunk_forward(p, all, nullptr, {o, st}, nullptr); });
    add("part_dstate", 2 * tens + scal, f_state, [&] { be.part_dstate(p, all, dov, state, nullptr); });
    add("chunk_backward_dq (+q.dq)", 5 * tens + 2 * scal, f_state + f_out,
        [&] { be.chunk_backward_dq(p, all, dov, nullptr, {dq, st}, with_dg ? qdq : nullptr, nullptr); });
    add("chunk_backward_dkdv (+dg)", 6 * tens + 3 * scal, f_state + f_dkdv, [&] {
      be.chunk_backward_dkdv(p, all, dov, nullptr, {dk, st}, {dv, st}, with_dg ? qdq : nullptr, nullptr,
                             with_dg ? dg : nullptr, nullptr);
    });
  }
  add("lasp2_forward (1 GPU)", 4 * tens + scal, f_state + f_out, [&] {
    lasp2_forward(be, nullptr, layout, p, {o, st}, saved, nullptr, {}, nullptr);
  });
  add("lasp2_backward (1 GPU)", 7 * tens + 2 * scal, 2 * f_state + f_out + f_dkdv, [&] {
    lasp2_backward(be, nullptr, layout, p, dov, saved, {dq, st}, {dk, st}, {dv, st}, with_dg ? dg : nullptr, bws,
                   nullptr);
  });
  if (what == "once") return 0;
  if (env_on("LASP2_BENCH_HOST")) {
    const float hf = median_host_us([&] { lasp2_forward(be, nullptr, layout, p, {o, st}, saved, nullptr, {}, nullptr); });
    const float hb = median_host_us([&] {
      lasp2_backward(be, nullptr, layout, p, dov, saved, {dq, st}, {dk, st}, {dv, st}, with_dg ? dg : nullptr, bws,
                     nullptr);
    });
    std::printf("host wall time of one eager call (LASP2_BENCH_HOST=1): lasp2_forward %.1f us, lasp2_backward %.1f us\n",
                hf, hb);
  }
  const float fwd = rows[rows.size() - 2].ms, bwd = rows.back().ms;
  const double fb_bytes = 11 * tens + 3 * scal, fb_flops = 3 * f_state + 2 * f_out + f_dkdv;
  rows.push_back({"fwd+bwd", fwd + bwd, fb_bytes, fb_flops});
  // Calls replayed from a CUDA graph (a blocking stream: the events on the legacy stream
  // around the launch wait for it): the kernels' time without the host's launch gaps.
  auto graph_row = [&](const char* name, double bytes, double flops, const std::function<void(cudaStream_t)>& calls) {
    cudaStream_t cs;
    CK(cudaStreamCreate(&cs));
    cudaGraph_t graph;
    cudaGraphExec_t exec;
    CK(cudaStreamBeginCapture(cs, cudaStreamCaptureModeThreadLocal));
    calls(cs);
    CK(cudaStreamEndCapture(cs, &graph));
    CK(cudaGraphInstantiate(&exec, graph, 0));
    rows.push_back({name, median_ms([&] { CK(cudaGraphLaunch(exec, cs)); }), bytes, flops});
    CK(cudaGraphExecDestroy(exec));
    CK(cudaGraphDestroy(graph));
    CK(cudaStreamDestroy(cs));
  };
  graph_row("lasp2_forward (graph)", 4 * tens + scal, f_state + f_out, [&](cudaStream_t cs) {
    lasp2_forward(be, nullptr, layout, p, {o, st}, saved, nullptr, {}, cs);
  });
  graph_row("fwd+bwd (graph)", fb_bytes, fb_flops, [&](cudaStream_t cs) {
    lasp2_forward(be, nullptr, layout, p, {o, st}, saved, nullptr, {}, cs);
    lasp2_backward(be, nullptr, layout, p, dov, saved, {dq, st}, {dk, st}, {dv, st}, with_dg ? dg : nullptr, bws, cs);
  });

  std::printf("\nB=%lld T=%lld H=%lld D=%lld %s mode=%s, copy bandwidth %.0f GB/s\n", (long long)B, (long long)T,
              (long long)H, (long long)D, dts.c_str(), ms.c_str(), copy_gbs);
  std::printf("%-28s %9s %10s %9s %8s %10s\n", "op", "ms", "floor_ms", "x_floor", "GB/s", "TFLOP/s");
  for (const Row& r : rows) {
    const double floor_ms = r.bytes / (copy_gbs * 1e6);
    std::printf("%-28s %9.3f %10.3f %9.2f %8.0f %10.1f\n", r.name.c_str(), r.ms, floor_ms, r.ms / floor_ms,
                r.bytes / (r.ms * 1e6), r.flops / (r.ms * 1e9));
  }
  std::printf("(floor = minimum bytes (inputs read once, outputs written once) / copy bandwidth;\n"
              " TFLOP/s counts the chunked algorithm's matmul flops, chunk 64, incl. the segment-state pass)\n");
  if (what == "sp") {
    sp_rank_table(be, p, {o, st}, dov, {dq, st}, {dk, st}, {dv, st}, with_dg ? dg : nullptr);
  }
  if (what == "sweep") {
    std::printf("\nsegment length sweep (LASP2_CUDA_SEG_CHUNKS; 0 = the backend's choice), ms:\n");
    std::printf("%10s %8s %12s %10s %12s %12s\n", "seg_chunks", "blocks", "part_state", "chunk_fwd", "bwd_dq", "bwd_dkdv");
    for (int sc : {0, 2, 3, 4, 6, 8, 16, 32, 128}) {
      if (sc > (T + 63) / 64) continue;
      if (sc) setenv("LASP2_CUDA_SEG_CHUNKS", std::to_string(sc).c_str(), 1);
      else unsetenv("LASP2_CUDA_SEG_CHUNKS");
      const float a = median_ms([&] { be.part_state(p, all, state, L, nullptr); });
      const float b = median_ms([&] { be.chunk_forward(p, all, nullptr, {o, st}, nullptr); });
      const float c = median_ms([&] { be.chunk_backward_dq(p, all, dov, nullptr, {dq, st}, with_dg ? qdq : nullptr, nullptr); });
      const float d2 = median_ms([&] {
        be.chunk_backward_dkdv(p, all, dov, nullptr, {dk, st}, {dv, st}, with_dg ? qdq : nullptr, nullptr,
                               with_dg ? dg : nullptr, nullptr);
      });
      const long long nch = (T + 63) / 64, segs = sc ? (nch + sc - 1) / sc : -1;
      std::printf("%10d %8lld %12.3f %10.3f %12.3f %12.3f\n", sc, segs > 0 ? segs * B * H : -1LL, a, b, c, d2);
    }
    unsetenv("LASP2_CUDA_SEG_CHUNKS");
  }
  return 0;
}
