#include "delta_rule/cuda/delta_cuda_route.h"

#include <algorithm>
#include <string>

#include "cuda/route.h"
#include "delta_rule/cuda/delta_chunk_bwd.h"
#include "delta_rule/cuda/kda_chunk_bwd.h"
#include "env_knob.h"

namespace lasp2::delta::cuda_route {

using gpu::Elem;

Elem elem_of(ScalarType t) { return cuda::elem_of(t, "lasp2 (CUDA delta rule): q, k, v"); }

gpu::View view_of(ConstView v) { return {v.data, v.stride.batch, v.stride.seq, v.stride.head}; }

void check_params(const DeltaParams& p, TokenRange part) {
  elem_of(p.dtype);
  LASP2_CHECK(p.gate_dtype == ScalarType::kFloat32,
              "the CUDA delta-rule kernels take float32 gates and betas, got " +
                  std::string(to_string(p.gate_dtype)));
  LASP2_CHECK(p.dim_k >= 1 && p.dim_k <= gpu::kMaxDim && p.dim_v >= 1 && p.dim_v <= gpu::kMaxDim,
              "the CUDA delta-rule kernels support head dims 1..128, got dim_k=" +
                  std::to_string(p.dim_k) + ", dim_v=" + std::to_string(p.dim_v));
  LASP2_CHECK(p.batch >= 0 && p.heads >= 0 && p.seqlen >= 0, "negative sizes");
  LASP2_CHECK(p.bh() <= 65535, "the CUDA delta-rule kernels support batch * heads <= 65535");
  LASP2_CHECK(part.begin >= 0 && part.begin <= part.end && part.end <= p.seqlen,
              "token range outside the local sequence");
  LASP2_CHECK(part.length() * p.bh() < (int64_t{1} << 31), "part too long for the CUDA kernels");
  LASP2_CHECK(p.g != nullptr && p.beta != nullptr, "the delta rule needs gates and betas");
}

gpu::Problem problem_of(const DeltaParams& p, TokenRange part, const float* doc_initial) {
  gpu::Problem g;
  g.batch = static_cast<int>(p.batch);
  g.heads = static_cast<int>(p.heads);
  g.dk = static_cast<int>(p.dim_k);
  g.dv = static_cast<int>(p.dim_v);
  g.seqlen = p.seqlen;
  g.begin = part.begin;
  g.n = part.length();
  g.elem = elem_of(p.dtype);
  g.q = view_of(p.q);
  g.k = view_of(p.k);
  g.v = view_of(p.v);
  g.g = static_cast<const float*>(p.g);
  g.gsb = p.g_stride.batch;
  g.gst = p.g_stride.seq;
  g.gsh = p.g_stride.head;
  g.per_key = p.gate_kind == GateKind::kPerKey ? 1 : 0;
  g.beta = static_cast<const float*>(p.beta);
  g.bsb = p.beta_stride.batch;
  g.bst = p.beta_stride.seq;
  g.bsh = p.beta_stride.head;
  g.scale = static_cast<float>(p.scale);
  g.doc_start = p.doc_start;
  g.doc_id = p.doc_id;
  g.doc_sb = p.doc_batch_stride;
  g.doc_initial = doc_initial;
  const int64_t per = 16 / (g.elem == Elem::kF32 ? 4 : 2);
  auto aligned = [&](const gpu::View& v) {
    return reinterpret_cast<uintptr_t>(v.ptr) % 16 == 0 && v.sb % per == 0 && v.st % per == 0 &&
           v.sh % per == 0;
  };
  g.vec = (aligned(g.q) && aligned(g.k) && g.dk % per == 0) ? 1 : 0;
  g.seg_len = std::max<int64_t>(g.n, 1);  // one segment until segmented()
  g.nseg = 1;
  return g;
}

bool rows_aligned(const void* ptr, int64_t sb, int64_t st, int64_t sh) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && sb % 8 == 0 && st % 8 == 0 && sh % 8 == 0;
}

bool rows_aligned(ConstView v) { return rows_aligned(v.data, v.stride.batch, v.stride.seq, v.stride.head); }

bool chunked(const DeltaParams& p, TokenRange part, std::initializer_list<ConstView> extra) {
  if (!env_flag("LASP2_DELTA_CHUNKED", true)) return false;
  if (p.gate_kind != GateKind::kScalar) return false;
  if (p.dtype != ScalarType::kBFloat16 && p.dtype != ScalarType::kFloat16) return false;
  if (p.dim_k != p.dim_v || (p.dim_k != 64 && p.dim_k != 128)) return false;
  if (part.length() == 0 || (part.length() + 63) / 64 > 65535) return false;
  if (!rows_aligned(p.q) || !rows_aligned(p.k) || !rows_aligned(p.v)) return false;
  for (const ConstView& v : extra)
    if (!rows_aligned(v)) return false;
  return true;
}

bool kda_chunked(const DeltaParams& p, TokenRange part, std::initializer_list<ConstView> extra) {
  if (!env_flag("LASP2_DELTA_KDA_CHUNKED", true)) return false;
  if (p.gate_kind != GateKind::kPerKey) return false;
  DeltaParams scalar = p;
  scalar.gate_kind = GateKind::kScalar;
  return chunked(scalar, part, extra);
}

bool kda_backward_chunked(const DeltaParams& p, TokenRange part, ConstView dout, MutView dq, MutView dk, MutView dv,
                          bool doc_states) {
  if (!env_flag("LASP2_DELTA_KDA_CHUNKED_BWD", true)) return false;
  if (p.doc_start != nullptr && doc_states) return false;
  if (!kda_chunked(p, part, {dout, ConstView{dq.data, dq.stride}, ConstView{dk.data, dk.stride},
                             ConstView{dv.data, dv.stride}}))
    return false;
  return cuda::device_info().smem_optin >= gpu::kda_backward_smem_bytes(static_cast<int>(p.dim_k));
}

bool chunk_backward_takes(const DeltaParams& p, TokenRange part, ConstView dout, const BackwardPlan& plan) {
  return chunk_backward_fits(p, part, dout, plan) && !(p.doc_start != nullptr && plan.doc_states);
}

bool chunk_backward_fits(const DeltaParams& p, TokenRange part, ConstView dout, const BackwardPlan& plan) {
  return chunked(p, part, {dout, ConstView{plan.dq.data, plan.dq.stride}, ConstView{plan.dk.data, plan.dk.stride},
                           ConstView{plan.dv.data, plan.dv.stride}}) &&
         cuda::device_info().smem_optin >= gpu::chunk_backward_smem_bytes(static_cast<int>(p.dim_k));
}

gpu::Problem segmented(gpu::Problem g) {
  g.seg_len = gpu::plan_seg_len(g, cuda::device_info().sms);
  g.nseg = g.n > 0 ? static_cast<int>((g.n + g.seg_len - 1) / g.seg_len) : 1;
  return g;
}

bool keeps_forward_params(const DeltaParams& p) {
  if (!env_flag("LASP2_DELTA_CHUNKED", true) || !env_flag("LASP2_DELTA_KEEP_FORWARD", true)) return false;
  if (p.dtype != ScalarType::kBFloat16 && p.dtype != ScalarType::kFloat16) return false;
  if (p.dim_k != p.dim_v || (p.dim_k != 64 && p.dim_k != 128)) return false;
  if (p.gate_kind == GateKind::kPerKey) {
    for (const char* name :
         {"LASP2_DELTA_KDA_KEEP_FORWARD", "LASP2_DELTA_KDA_CHUNKED", "LASP2_DELTA_KDA_CHUNKED_BWD"}) {
      if (!env_flag(name, true)) return false;
    }
    return cuda::device_info().smem_optin >= gpu::kda_backward_smem_bytes(static_cast<int>(p.dim_k));
  }
  if (p.gate_kind != GateKind::kScalar) return false;
  return cuda::device_info().smem_optin >= gpu::chunk_backward_smem_bytes(static_cast<int>(p.dim_k));
}

}  // namespace lasp2::delta::cuda_route
