#include "route.h"

#include <algorithm>
#include <climits>
#include <string>

#include "env_knob.h"

namespace lasp2::cuda {

void cuda_check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(std::string("lasp2 (CUDA): ") + what + ": " + cudaGetErrorString(e));
}

const DeviceInfo& device_info() {
  return per_device([](int dev) {
    DeviceInfo info;
    cuda_check(cudaDeviceGetAttribute(&info.sms, cudaDevAttrMultiProcessorCount, dev), "attribute");
    cuda_check(cudaDeviceGetAttribute(&info.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
               "attribute");
    int pools = 0;
    cuda_check(cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, dev), "attribute");
    info.pools = pools != 0;
    cuda_check(cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, dev), "attribute");
    return info;
  });
}

int seg_chunks_knob() { return env_int("LASP2_CUDA_SEG_CHUNKS", 0, 0, INT_MAX); }

Elem elem_of(ScalarType t, const char* inputs) {
  switch (t) {
    case ScalarType::kFloat32:
      return Elem::kF32;
    case ScalarType::kFloat16:
      return Elem::kF16;
    case ScalarType::kBFloat16:
      return Elem::kBF16;
    default:
      fail(std::string(inputs) + " must be float32, float16 or bfloat16, got " + to_string(t));
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

namespace {
bool tc_views_ok(std::initializer_list<View> views) {
  for (const View& v : views) {
    if (reinterpret_cast<uintptr_t>(v.ptr) % 16 != 0) return false;
    if (v.sb % 8 != 0 || v.st % 8 != 0 || v.sh % 8 != 0) return false;
  }
  return true;
}
}  // namespace

int tc_dim(const AttentionParams& p, std::initializer_list<View> views, int smem_needed_64,
           int smem_needed_128) {
  if (env_flag("LASP2_CUDA_FORCE_GENERIC", false)) return 0;
  if (p.dtype != ScalarType::kBFloat16 && p.dtype != ScalarType::kFloat16) return 0;
  if (p.dim_k % 8 != 0 || p.dim_v % 8 != 0 || p.dim_k > 128 || p.dim_v > 128) return 0;
  if (!tc_views_ok(views)) return 0;
  const int D = std::max(p.dim_k, p.dim_v) <= 64 ? 64 : 128;
  const int need = D == 64 ? smem_needed_64 : smem_needed_128;
  return need <= device_info().smem_optin ? D : 0;
}

int state_dim(const AttentionParams& p, View a, View b) {
  return tc_dim(p, {a, b}, tc_state_smem(64), tc_state_smem(128));
}

Geom make_geom(const AttentionParams& p, TokenRange part, int D) {
  Geom g;
  g.batch = static_cast<int>(p.batch);
  g.heads = static_cast<int>(p.heads);
  g.seqlen = p.seqlen;
  g.begin = part.begin;
  g.n = static_cast<int>(part.length());
  g.nchunks = (g.n + kChunk - 1) / kChunk;
  int sc = seg_chunks_knob();
  if (sc == 0) {
    // Tensor cores: about one wave of (b, h, segment) blocks, as long segments as
    // that allows, so that the segment states and their scan stay a small part of
    // the traffic. Measured on H100 at T = 64K, H = 16 (docs/history/results-log.md,
    // "Kernel history"): D = 128 (one 512-thread block per SM) 128-chunk segments beat
    // 64-chunk ones by 15%
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

}  // namespace lasp2::cuda
