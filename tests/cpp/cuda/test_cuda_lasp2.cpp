// lasp2_forward / lasp2_backward on the CUDA backend against the float64
// step-by-step recurrence (tests/cpp/recurrent_reference.h) on the same inputs
// (rounded to the device dtype): the single-device path (comm = null) and the
// sequence-parallel schedule on P threads sharing one GPU (contiguous and
// balanced layouts, both forward schedules), one AllGather per direction.
// Tolerances as in test_cuda_kernels.cpp (relative max-norm vs float64 on
// identical inputs; dg grows like sqrt(tokens / 64), see there).
#include <gtest/gtest.h>

#include <atomic>
#include <mutex>

#include "cuda_test_util.h"
#include "device_rank.h"
#include "lasp2/lasp2.h"
#include "cuda/scratch.h"  // the backend's own scratch pool
#include "lasp2/scratch_allocator.h"
#include "lasp2_device_run.h"
#include "../local_slice.h"
#include "../recurrent_reference.h"

namespace lasp2::testing {
namespace {

// Log gates of -inf (the state forgotten at that token) at chunk and segment edges,
// in a run, at the first and last token; with kFixed, the last head's log decay.
void forget_some(Problem<double>& pr) {
  const auto& s = pr.spec;
  if (s.mode == DecayMode::kFixed) {
    pr.log_decay[s.heads - 1] = -INFINITY;
    return;
  }
  const int64_t T = s.seqlen;
  for (int64_t t : {int64_t{0}, int64_t{63}, int64_t{64}, int64_t{65}, T / 2, T / 2 + 1, T / 2 + 2, T - 1})
    pr.gate[(0 * T + t) * s.heads + 0] = -INFINITY;
  for (int64_t t : {int64_t{1}, int64_t{95}, int64_t{96}, int64_t{255}, int64_t{256}, T - 2})
    if (t < T) pr.gate[((s.batch - 1) * T + t) * s.heads + (s.heads - 1)] = -INFINITY;
}

struct E2eCase {
  ScalarType dtype;
  DecayMode mode;
  int64_t d;
  int64_t T;
  bool docs;
  bool forget = false;  // some log gates (or a head's log decay) are -inf
};

std::string e2e_name(const E2eCase& c) {
  const char* mode = decay_mode_name(c.mode);
  return std::string(dtype_name(c.dtype)) + "_" + mode + "_D" + std::to_string(c.d) + "_T" +
         std::to_string(c.T) + (c.docs ? "_docs" : "") + (c.forget ? "_forget" : "");
}

void PrintTo(const E2eCase& c, std::ostream* os) { *os << e2e_name(c); }

class CudaLasp2SingleDevice : public ::testing::TestWithParam<E2eCase> {};

TEST_P(CudaLasp2SingleDevice, MatchesRecurrence) {
  LASP2_SKIP_WITHOUT_CUDA();
  const E2eCase c = GetParam();
  ProblemSpec s;
  s.batch = 2;
  s.heads = 2;
  s.seqlen = c.T;
  s.dim_k = s.dim_v = c.d;
  s.mode = c.mode;
  s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.d)));
  if (c.docs) s.doc_starts = {1, 64, 500, c.T - 1};
  auto pr = rounded(s, c.dtype, 77);
  if (c.forget) forget_some(pr);
  const auto ref = recurrent_reference(pr);
  const Grads g = run_rank(pr, c.dtype, PartLayout::contiguous(1, 0), nullptr, true, nullptr);
  const std::string name = "single_" + e2e_name(c);
  expect_near_recurrence(name.c_str(), g, ref, c.dtype, c.T, c.mode != DecayMode::kNone);
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaLasp2SingleDevice,
    ::testing::Values(E2eCase{ScalarType::kBFloat16, DecayMode::kGate, 64, 1000, true},
                      E2eCase{ScalarType::kBFloat16, DecayMode::kGate, 128, 2048, false},
                      E2eCase{ScalarType::kBFloat16, DecayMode::kFixed, 128, 1000, true},
                      E2eCase{ScalarType::kFloat16, DecayMode::kGate, 64, 1000, true},
                      E2eCase{ScalarType::kFloat16, DecayMode::kNone, 64, 1000, false},
                      E2eCase{ScalarType::kFloat32, DecayMode::kGate, 64, 1000, true},
                      E2eCase{ScalarType::kFloat32, DecayMode::kFixed, 128, 700, false},
                      E2eCase{ScalarType::kBFloat16, DecayMode::kGate, 128, 2048, false, true},
                      E2eCase{ScalarType::kBFloat16, DecayMode::kGate, 64, 1000, true, true},
                      E2eCase{ScalarType::kFloat16, DecayMode::kFixed, 64, 1000, false, true},
                      E2eCase{ScalarType::kFloat32, DecayMode::kGate, 64, 1000, true, true},
                      E2eCase{ScalarType::kFloat32, DecayMode::kFixed, 40, 300, false, true}),
    [](const ::testing::TestParamInfo<E2eCase>& i) { return e2e_name(i.param); });

struct SpCase {
  int world;
  bool balanced;
  bool overlap;
  ScalarType dtype;
  bool forget = false;
  int64_t batch = 2;  // 1 with the balanced split: a rank's two parts run as one pair (part_pair.h)
  int64_t part_tokens = 96;
};

std::string sp_name(const SpCase& c) {
  return "P" + std::to_string(c.world) + (c.balanced ? "_balanced" : "_contiguous") +
         (c.overlap ? "_overlap_" : "_fused_") + dtype_name(c.dtype) + (c.forget ? "_forget" : "") +
         (c.batch == 1 ? "_B1" : "") + (c.part_tokens != 96 ? "_part" + std::to_string(c.part_tokens) : "");
}

void PrintTo(const SpCase& c, std::ostream* os) { *os << sp_name(c); }

class CudaLasp2Sp : public ::testing::TestWithParam<SpCase> {};

TEST_P(CudaLasp2Sp, RanksMatchRecurrence) {
  LASP2_SKIP_WITHOUT_CUDA();
  const SpCase c = GetParam();
  const ProblemSpec s = sp_spec(c.world, c.batch, c.part_tokens);
  auto global = rounded(s, c.dtype, 99);
  if (c.forget) forget_some(global);  // also at part edges (95, 96, 255, 256)
  const auto ref = recurrent_reference(global);
  Grads out{std::vector<double>(ref.o.size()), std::vector<double>(ref.dq.size()),
            std::vector<double>(ref.dk.size()), std::vector<double>(ref.dv.size()),
            std::vector<double>(ref.dg.size())};
  std::mutex mu;
  run_device_ranks(c.world, [&](int rank, DeviceThreadCommunicator& comm) {
    const PartLayout layout =
        c.balanced ? PartLayout::balanced(c.world, rank) : PartLayout::contiguous(c.world, rank);
    const auto local = local_problem(global, layout);
    cudaStream_t stream;
    cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
    const Grads g = run_rank(local, c.dtype, layout, &comm, c.overlap, stream);
    cudaStreamDestroy(stream);
    EXPECT_EQ(comm.collectives(), 2);
    std::lock_guard<std::mutex> lock(mu);
    put_rank(out, g, layout, s);
  });
  expect_near_recurrence(("sp_" + sp_name(c)).c_str(), out, ref, c.dtype, s.seqlen, true);
}

INSTANTIATE_TEST_SUITE_P(Layouts, CudaLasp2Sp,
                         ::testing::Values(SpCase{2, false, true, ScalarType::kBFloat16},
                                           SpCase{2, true, false, ScalarType::kBFloat16},
                                           SpCase{4, true, true, ScalarType::kBFloat16},
                                           SpCase{4, false, false, ScalarType::kFloat32},
                                           SpCase{3, true, true, ScalarType::kFloat16},
                                           SpCase{2, true, true, ScalarType::kBFloat16, true},
                                           SpCase{4, false, false, ScalarType::kFloat32, true},
                                           SpCase{2, true, false, ScalarType::kBFloat16, false, 1},
                                           SpCase{4, true, true, ScalarType::kBFloat16, false, 1},
                                           SpCase{3, true, false, ScalarType::kFloat16, true, 1},
                                           SpCase{2, true, false, ScalarType::kFloat32, false, 1},
                                           SpCase{2, true, false, ScalarType::kBFloat16, false, 1, 1024},
                                           SpCase{2, true, false, ScalarType::kBFloat16, true, 2, 1024}),
                         [](const ::testing::TestParamInfo<SpCase>& i) { return sp_name(i.param); });

// A caller's scratch allocator (the binding passes PyTorch's caching allocator):
// stream-ordered device memory, counted.
class CountingAllocator final : public ScratchAllocator {
 public:
  void* allocate(size_t bytes, void* stream) const override {
    void* ptr = nullptr;
    cuda_ok(cudaMallocAsync(&ptr, bytes, static_cast<cudaStream_t>(stream)), "cudaMallocAsync");
    ++allocations;
    ++live;
    return ptr;
  }
  void release(void* ptr, void* stream) const noexcept override {
    cudaFreeAsync(ptr, static_cast<cudaStream_t>(stream));
    --live;
  }
  mutable std::atomic<int> allocations{0}, live{0};
};

ProblemSpec graph_spec() {
  ProblemSpec s;
  s.batch = 2;
  s.heads = 2;
  s.seqlen = 2048;  // several segments: states, scans and the dg fix-up run
  s.dim_k = s.dim_v = 128;
  s.mode = DecayMode::kGate;
  s.scale = 0.088f;
  s.doc_starts = {700};
  return s;
}

TEST(CudaLasp2Scratch, CallersAllocatorGetsEveryBufferBack) {
  LASP2_SKIP_WITHOUT_CUDA();
  const auto pr = rounded(graph_spec(), ScalarType::kBFloat16, 5);
  const PartLayout layout = PartLayout::contiguous(1, 0);
  CountingAllocator allocator;
  const auto backend = make_cuda_backend(allocator);
  const Grads mine = run_rank(pr, ScalarType::kBFloat16, layout, nullptr, true, nullptr, *backend);
  const Grads dflt = run_rank(pr, ScalarType::kBFloat16, layout, nullptr, true, nullptr);
  // one device: the output pass, the meta the dq pass keeps for the dk/dv pass (passes.h:
  // KeptMeta), the dk/dv pass; the dq pass reads the forward's segment states and that meta,
  // and needs no scratch of its own
  EXPECT_EQ(allocator.allocations.load(), 3);
  EXPECT_EQ(allocator.live.load(), 0);
  expect_bitwise(mine, dflt);
}

// Without a caller's allocator the scratch comes from lasp2's own pool (cuda/scratch.cpp),
// which keeps it across synchronizations (the device's default pool gave it back at each
// one, and the next call mapped it again: session 24): after a call none of it is in use
// and all of it stays reserved, and a second identical call reserves nothing more and gives
// the same bits. (Needs LASP2_CUDA_SCRATCH_KEEP_MB unset or > 0.)
TEST(CudaLasp2Scratch, OwnPoolKeepsScratchAcrossSynchronization) {
  LASP2_SKIP_WITHOUT_CUDA();
  const cudaMemPool_t pool = cuda::scratch_pool();
  ASSERT_NE(pool, nullptr) << "no scratch pool: LASP2_CUDA_SCRATCH_KEEP_MB=0, or a device without memory pools";
  auto attr = [&](cudaMemPoolAttr a) {
    uint64_t v = 0;
    cuda_ok(cudaMemPoolGetAttribute(pool, a, &v), "cudaMemPoolGetAttribute");
    return v;
  };
  const auto pr = rounded(graph_spec(), ScalarType::kBFloat16, 5);
  const PartLayout layout = PartLayout::contiguous(1, 0);
  const Grads first = run_rank(pr, ScalarType::kBFloat16, layout, nullptr, true, nullptr);
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  const uint64_t reserved = attr(cudaMemPoolAttrReservedMemCurrent);
  EXPECT_GT(reserved, 0u) << "the scratch went back to the system at the synchronization";
  EXPECT_EQ(attr(cudaMemPoolAttrUsedMemCurrent), 0u) << "scratch still in use after the call";
  const Grads second = run_rank(pr, ScalarType::kBFloat16, layout, nullptr, true, nullptr);
  cuda_ok(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
  EXPECT_EQ(attr(cudaMemPoolAttrReservedMemCurrent), reserved) << "the second call mapped new memory";
  EXPECT_EQ(attr(cudaMemPoolAttrUsedMemCurrent), 0u);
  expect_bitwise(second, first);
}

// Forward + backward enqueue no host synchronization and no synchronous allocation:
// they capture into a CUDA graph, whose replays equal eager runs bit for bit, also
// after new inputs are copied into the captured buffers.
TEST(CudaLasp2Graph, CaptureAndReplayMatchEager) {
  LASP2_SKIP_WITHOUT_CUDA();
  const ScalarType t = ScalarType::kBFloat16;
  auto first = rounded(graph_spec(), t, 6);
  forget_some(first);
  const auto second = rounded(graph_spec(), t, 7);
  const PartLayout layout = PartLayout::contiguous(1, 0);
  CountingAllocator allocator;
  const auto counted = make_cuda_backend(allocator);
  for (const KernelBackend* be : std::vector<const KernelBackend*>{&cuda_backend(), counted.get()}) {
    cudaStream_t stream;
    cuda_ok(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
    const Grads eager1 = run_rank(first, t, layout, nullptr, true, stream, *be);
    const Grads eager2 = run_rank(second, t, layout, nullptr, true, stream, *be);
    {
      CapturedRank graph(first, t, layout, *be, stream);
      expect_bitwise(graph.replay(), eager1);
      graph.load(second);  // new inputs into the same buffers, outputs poisoned, replay
      expect_bitwise(graph.replay(), eager2);
    }
    cudaStreamDestroy(stream);
  }
  EXPECT_EQ(allocator.live.load(), 0);
}

// ---- the dg fix-up over all heads of a token range (head_row_kernels.cu) -------------------
// The fix-up over whole [B, T, H] rows (the default) writes the same bits as the one per
// (b, h, segment) (LASP2_CUDA_HEAD_ROWS=0): every output and gradient equal, on one device
// and on P = 2 ranks, and within the tolerances of the recurrence. Heads: 5 (rows not a
// power of two), 1, 130; documents and -inf gates; forced short segments (many, a short
// last one) and the backend's own.
struct RowsCase {
  int64_t batch, heads, T, d;
  DecayMode mode;
  int seg_chunks;  // LASP2_CUDA_SEG_CHUNKS (0: the backend's own segments)
  bool docs;       // document starts and -inf log decays
  int world;
};

std::string rows_name(const RowsCase& c) {
  return "B" + std::to_string(c.batch) + "_H" + std::to_string(c.heads) + "_T" + std::to_string(c.T) + "_D" +
         std::to_string(c.d) + (c.mode == DecayMode::kFixed ? "_fixed" : "_gate") + "_seg" +
         std::to_string(c.seg_chunks) + (c.docs ? "_docs" : "") + "_P" + std::to_string(c.world);
}

TEST(CudaLasp2HeadRows, SameBitsAsPerHeadKernels) {
  LASP2_SKIP_WITHOUT_CUDA();
  const ScalarType t = ScalarType::kBFloat16;
  const RowsCase cases[] = {{3, 5, 1000, 64, DecayMode::kGate, 3, true, 1},
                            {1, 1, 2500, 128, DecayMode::kGate, 0, true, 1},
                            {2, 16, 2048, 64, DecayMode::kGate, 0, false, 1},
                            {2, 3, 1000, 64, DecayMode::kFixed, 2, true, 1},
                            {1, 130, 300, 16, DecayMode::kGate, 2, false, 1},
                            {2, 5, 1000, 64, DecayMode::kGate, 3, true, 2},
                            {2, 4, 1000, 64, DecayMode::kFixed, 0, true, 2}};
  for (const RowsCase& c : cases) {
    const std::string name = "rows_" + rows_name(c);
    SCOPED_TRACE(name);
    ProblemSpec s;
    s.batch = c.batch;
    s.heads = c.heads;
    s.seqlen = c.T;
    s.dim_k = s.dim_v = c.d;
    s.mode = c.mode;
    s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.d)));
    if (c.docs) s.doc_starts = {1, 64, 500, c.T - 1};
    auto pr = rounded(s, t, 31);
    if (c.docs) forget_some(pr);
    const EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
    Grads per_head;
    {
      const EnvGuard knob("LASP2_CUDA_HEAD_ROWS", "0");
      per_head = run_world(pr, t, c.world);
    }
    {
      const EnvGuard knob("LASP2_CUDA_HEAD_ROWS", "");  // the default: over rows
      expect_bitwise(run_world(pr, t, c.world), per_head);
    }
    expect_near_recurrence(name.c_str(), per_head, recurrent_reference(pr), t, c.T, true);
  }
}

// ---- segment states kept from forward (Lasp2Saved::segment_states) ------------------------
// The dq pass reads the segment states the forward kept instead of computing them again:
// every gradient equals the recomputing run bit for bit, on one device (the whole local
// sequence one part) and on P ranks (each local part its own slot, one after another;
// the prefix entering a part enters only the backward's scan, after the overlapped
// forward ran from zero), also for a second backward from one forward; altered states
// change dq, and altering one part's slot changes only that part's dq. The buffer
// starts poisoned (every byte 0xFF, a NaN): a value the backward read that the forward
// did not write would turn dq into NaN, and what no part uses (the buffer is sized for
// the whole local sequence too) stays poisoned.
class CudaLasp2SavedStates : public ::testing::Test {
 protected:
  void SetUp() override { LASP2_SKIP_WITHOUT_CUDA(); }

  struct How {
    bool keep = true;      // false: the kernels recompute the states (no buffer)
    bool overlap = true;   // Lasp2Options::overlap_forward
    int backwards = 1;     // backward runs from the one forward
    float alter = 0.f;     // nonzero: kept x -> alter * x + 1 in [alter_begin, alter_end) before backward
    int64_t alter_begin = 0, alter_end = -1;  // -1: to the end of the buffer
  };

  struct Run {
    Grads grads;
    std::vector<float> states;         // the buffer after the forward (before any alteration)
    std::vector<TokenRange> parts;     // the local parts of the layout
    std::vector<int64_t> part_floats;  // the backend's kept floats of each part (its slot size)
    int64_t whole_floats = 0;          // ... of the whole local sequence as one part
  };

  static Run run(const Problem<double>& pr, ScalarType t, const PartLayout& layout, Communicator* comm,
                 cudaStream_t stream, const How& how) {
    DeviceRank r(pr, t, layout);
    r.keep_states = how.keep;
    Run out;
    for (int i = 0; i < layout.parts_per_rank; ++i) {
      out.parts.push_back(layout.local_range(i, r.p.seqlen));
      out.part_floats.push_back(cuda_backend().saved_states_floats(r.p, out.parts.back()));
    }
    out.whole_floats = cuda_backend().saved_states_floats(r.p, {0, r.p.seqlen});
    r.states.poison();
    cuda_ok(cudaDeviceSynchronize(), "poison");
    const Lasp2Saved saved{r.records.p, r.prefixes.p, r.decays.p, nullptr, how.keep ? r.states.p : nullptr};
    Lasp2Options options;
    options.overlap_forward = how.overlap;
    lasp2_forward(cuda_backend(), comm, layout, r.p, r.o.mview(), saved, r.fws.p, options, stream);
    cuda_ok(cudaStreamSynchronize(stream), "lasp2_forward");
    out.states = r.states.download();
    if (how.alter != 0.f) {
      std::vector<float> s = out.states;
      const int64_t end = how.alter_end < 0 ? static_cast<int64_t>(s.size()) : how.alter_end;
      for (int64_t i = how.alter_begin; i < end; ++i) s[i] = how.alter * s[i] + 1.f;
      r.states.upload(s);
    }
    for (int i = 0; i < how.backwards; ++i) {
      lasp2_backward(cuda_backend(), comm, layout, r.p, r.dout.cview(), saved, r.dq.mview(), r.dk.mview(),
                     r.dv.mview(), r.dg.p, r.bws.p, stream);
    }
    cuda_ok(cudaStreamSynchronize(stream), "lasp2_backward");
    out.grads = r.grads();
    return out;
  }

  // On every rank of `world` threads sharing one GPU: check(rank, layout, the rank's
  // problem, comm, stream, mu), which makes the rank's runs (every rank the same ones:
  // they meet in the collectives) and then compares under the lock `mu`.
  template <typename Check>
  static void on_ranks(int world, bool balanced, const Problem<double>& global, Check check) {
    std::mutex mu;
    run_device_ranks(world, [&](int rank, DeviceThreadCommunicator& comm) {
      const PartLayout layout = balanced ? PartLayout::balanced(world, rank) : PartLayout::contiguous(world, rank);
      const auto local = local_problem(global, layout);
      cudaStream_t stream;
      cuda_ok(cudaStreamCreate(&stream), "cudaStreamCreate");
      check(rank, layout, local, &comm, stream, mu);
      cudaStreamDestroy(stream);
    });
  }

  // The slots the backward reads are written in full, the rest of the buffer is not touched.
  static void expect_slots_written(const Run& kept) {
    int64_t offset = 0;
    const bool whole = kept.parts.size() == 1;
    for (size_t i = 0; i < kept.parts.size(); ++i) {
      const int64_t n = whole ? kept.whole_floats : kept.part_floats[i];
      for (int64_t j = offset; j < offset + n; ++j) {
        ASSERT_TRUE(std::isfinite(kept.states[j])) << "part " << i << " slot value " << j - offset << " of " << n;
      }
      offset += n;
    }
    ASSERT_LE(offset, static_cast<int64_t>(kept.states.size()));
    const auto* tail = reinterpret_cast<const unsigned char*>(kept.states.data() + offset);
    EXPECT_TRUE(is_poison(tail, (kept.states.size() - offset) * sizeof(float)))
        << "the forward wrote past the parts' slots";
  }
};

// Rows [range) of a [B, T, H * D] array.
std::vector<double> token_rows(const std::vector<double>& x, int64_t B, int64_t T, TokenRange range) {
  const int64_t row = static_cast<int64_t>(x.size()) / (B * T);
  std::vector<double> out;
  for (int64_t b = 0; b < B; ++b) out.insert(out.end(), x.begin() + (b * T + range.begin) * row,
                                             x.begin() + (b * T + range.end) * row);
  return out;
}

TEST_F(CudaLasp2SavedStates, SingleDeviceEqualsRecompute) {
  for (const ScalarType t : {ScalarType::kBFloat16, ScalarType::kFloat32}) {
    for (const DecayMode m : {DecayMode::kGate, DecayMode::kFixed, DecayMode::kNone}) {
      ProblemSpec s = graph_spec();
      s.mode = m;
      const auto pr = rounded(s, t, 8);
      const PartLayout layout = PartLayout::contiguous(1, 0);
      SCOPED_TRACE(std::string(dtype_name(t)) + " mode " + std::to_string(static_cast<int>(m)));
      const Run re = run(pr, t, layout, nullptr, nullptr, How{false});
      const Run kept = run(pr, t, layout, nullptr, nullptr, How{true, true, 2});
      ASSERT_GT(kept.whole_floats, 0);
      expect_slots_written(kept);
      expect_bitwise(kept.grads, re.grads);
      const Run bad = run(pr, t, layout, nullptr, nullptr, How{true, true, 1, 0.5f});
      EXPECT_NE(bad.grads.dq, re.grads.dq) << "altered states left dq unchanged";
      EXPECT_EQ(bad.grads.dv, re.grads.dv) << "dv does not read the forward's states";
    }
  }
}

TEST_F(CudaLasp2SavedStates, RanksEqualRecompute) {
  for (const SpCase& c : {SpCase{2, true, true, ScalarType::kBFloat16}, SpCase{2, false, false, ScalarType::kBFloat16},
                          SpCase{3, false, true, ScalarType::kFloat32}}) {
    ProblemSpec s = graph_spec();
    s.seqlen = c.world * 1024;
    s.doc_starts = {700, s.seqlen / 2};
    on_ranks(c.world, c.balanced, rounded(s, c.dtype, 9),
             [&](int rank, const PartLayout& layout, const Problem<double>& local, Communicator* comm,
                 cudaStream_t stream, std::mutex& mu) {
               const Run re = run(local, c.dtype, layout, comm, stream, How{false, c.overlap});
               const Run kept = run(local, c.dtype, layout, comm, stream, How{true, c.overlap, 2});
               std::lock_guard<std::mutex> lock(mu);
               SCOPED_TRACE(sp_name(c) + " rank " + std::to_string(rank));
               for (int64_t n : kept.part_floats) EXPECT_GT(n, 0);
               expect_slots_written(kept);
               expect_bitwise(kept.grads, re.grads);
             });
  }
}

// The balanced split (two parts a rank) with parts that end mid-chunk and mid-segment,
// 2 and 3 ranks, B x H leaving several segments (short 4-chunk ones with few heads,
// longer uneven ones with B x H near the SM count, forced 3-chunk ones), the tensor-core
// and the generic routes; and parts of one segment each, whose states are not kept while
// the buffer (sized for the whole local sequence too) is not empty.
struct SavedCase {
  const char* name;
  int world;
  int64_t part_len;  // tokens of each part (a rank holds two)
  int64_t batch, heads, d;
  ScalarType dtype;
  DecayMode mode;
  bool overlap;
  int seg_chunks = 0;   // LASP2_CUDA_SEG_CHUNKS (0: the backend's own segments)
  bool kept = true;     // false: one segment a part, nothing kept
};

TEST_F(CudaLasp2SavedStates, BalancedUnevenPartsEqualRecompute) {
  const SavedCase cases[] = {
      // 700 tokens = 11 chunks (the last of 60 tokens): 4-chunk segments 4 + 4 + 3
      {"P2_part700_bh3_D64_bf16_gate", 2, 700, 1, 3, 64, ScalarType::kBFloat16, DecayMode::kGate, true},
      {"P3_part700_bh3_D128_fp16_fixed", 3, 700, 1, 3, 128, ScalarType::kFloat16, DecayMode::kFixed, false},
      {"P3_part700_bh4_D40_fp32_gate_generic", 3, 700, 2, 2, 40, ScalarType::kFloat32, DecayMode::kGate, true},
      // 1000 tokens = 16 chunks, B x H = 40 (near the SM count): segments longer than 4
      // chunks that do not divide the part (6 + 6 + 4 on 132 SMs)
      {"P2_part1000_bh40_D128_bf16_gate", 2, 1000, 4, 10, 128, ScalarType::kBFloat16, DecayMode::kGate, false},
      {"P3_part1000_bh6_D64_bf16_gate_seg3", 3, 1000, 2, 3, 64, ScalarType::kBFloat16, DecayMode::kGate, true, 3},
      // 200 tokens = 4 chunks: one segment a part (nothing kept), 7 chunks for the whole
      {"P2_part200_bh2_D64_bf16_gate_none_kept", 2, 200, 1, 2, 64, ScalarType::kBFloat16, DecayMode::kGate, true,
       0, false},
  };
  for (const SavedCase& c : cases) {
    SCOPED_TRACE(c.name);
    const EnvGuard seg("LASP2_CUDA_SEG_CHUNKS", c.seg_chunks > 0 ? std::to_string(c.seg_chunks) : "");
    ProblemSpec s;
    s.batch = c.batch;
    s.heads = c.heads;
    s.dim_k = s.dim_v = c.d;
    s.mode = c.mode;
    s.scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(c.d)));
    s.seqlen = 2 * c.world * c.part_len;
    s.doc_starts = {c.part_len / 2, 3 * c.part_len + 1};  // inside a part (no sequence states: kept)
    auto global = rounded(s, c.dtype, 31);
    forget_some(global);
    on_ranks(c.world, true, global,
             [&](int rank, const PartLayout& layout, const Problem<double>& local, Communicator* comm,
                 cudaStream_t stream, std::mutex& mu) {
               const Run re = run(local, c.dtype, layout, comm, stream, How{false, c.overlap});
               const Run kept = run(local, c.dtype, layout, comm, stream, How{true, c.overlap, 2});
               std::lock_guard<std::mutex> lock(mu);
               SCOPED_TRACE("rank " + std::to_string(rank));
               ASSERT_EQ(kept.parts.size(), 2u);
               EXPECT_EQ(kept.part_floats[0], kept.part_floats[1]);
               const int64_t per_segment = c.batch * c.heads * c.d * c.d;
               if (c.kept) {
                 EXPECT_GE(kept.part_floats[0], 2 * per_segment) << "several segments a part";
               } else {
                 EXPECT_EQ(kept.part_floats[0], 0);
                 EXPECT_GT(kept.whole_floats, 0) << "the buffer has room for the whole sequence";
               }
               EXPECT_EQ(static_cast<int64_t>(kept.states.size()),
                         std::max<int64_t>(1, std::max(kept.whole_floats, 2 * kept.part_floats[0])));
               expect_slots_written(kept);
               expect_bitwise(kept.grads, re.grads);
             });
  }
}

// Each balanced part reads its own slot: altering one part's slot changes dq of that
// part's tokens only.
TEST_F(CudaLasp2SavedStates, BalancedPartsReadTheirOwnSlots) {
  for (const int world : {2, 3}) {
    ProblemSpec s = graph_spec();
    s.seqlen = 2 * world * 700;
    s.doc_starts = {};
    const auto global = rounded(s, ScalarType::kBFloat16, 12);
    on_ranks(world, true, global,
             [&](int rank, const PartLayout& layout, const Problem<double>& local, Communicator* comm,
                 cudaStream_t stream, std::mutex& mu) {
               const ScalarType t = ScalarType::kBFloat16;
               const Run re = run(local, t, layout, comm, stream, How{false});
               const int64_t slot = re.part_floats[0];
               const Run bad0 = run(local, t, layout, comm, stream, How{true, true, 1, 0.5f, 0, slot});
               const Run bad1 = run(local, t, layout, comm, stream, How{true, true, 1, 0.5f, slot, 2 * slot});
               std::lock_guard<std::mutex> lock(mu);
               SCOPED_TRACE("P" + std::to_string(world) + " rank " + std::to_string(rank));
               ASSERT_GT(slot, 0);
               ASSERT_EQ(re.part_floats[1], slot);
               const int64_t B = s.batch, T = local.spec.seqlen;
               const TokenRange p0 = re.parts[0], p1 = re.parts[1];
               EXPECT_NE(token_rows(bad0.grads.dq, B, T, p0), token_rows(re.grads.dq, B, T, p0));
               EXPECT_EQ(token_rows(bad0.grads.dq, B, T, p1), token_rows(re.grads.dq, B, T, p1));
               EXPECT_EQ(token_rows(bad1.grads.dq, B, T, p0), token_rows(re.grads.dq, B, T, p0));
               EXPECT_NE(token_rows(bad1.grads.dq, B, T, p1), token_rows(re.grads.dq, B, T, p1));
               EXPECT_EQ(bad0.grads.dv, re.grads.dv);
               EXPECT_EQ(bad1.grads.dv, re.grads.dv);
             });
  }
}

}  // namespace
}  // namespace lasp2::testing