// A linear attention problem on the device (the CUDA backend's tests: cuda_op_case.h's,
// test_cuda_lasp2.cpp, test_cuda_call_check.cpp): the inputs uploaded once and the params
// pointing at them; for one rank of a layout also LASP-2's saved buffers and workspaces.
#pragma once

#include <algorithm>
#include <vector>

#include "cuda_test_util.h"
#include "lasp2/kernel_backend.h"
#include "lasp2/lasp2.h"

namespace lasp2::testing {

struct Grads {
  std::vector<double> o, dq, dk, dv, dg;
};

// A problem's inputs on the device in a layout, and the params pointing at them.
struct DeviceProblem {
  DevTensor q, k, v, dout;
  DevBuf<float> gate, log_decay;
  DevBuf<uint8_t> doc;
  AttentionParams p;

  DeviceProblem(const Problem<double>& pr, ScalarType dtype, Layout lay)
      : q(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, dtype, lay),
        k(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, dtype, lay),
        v(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, dtype, lay),
        dout(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, dtype, lay),
        gate(to_device_f32(pr.gate)),
        log_decay(to_device_f32(pr.log_decay)),
        doc(pr.doc_start.size()) {
    q.upload(pr.q);
    k.upload(pr.k);
    v.upload(pr.v);
    dout.upload(pr.dout);
    doc.upload(pr.doc_start);
    p = pr.params();
    p.dtype = dtype;
    p.q = q.cview();
    p.k = k.cview();
    p.v = v.cview();
    p.decay.dtype = ScalarType::kFloat32;
    p.decay.gate = gate.p;
    p.decay.log_decay = log_decay.p;
    p.doc_start = pr.spec.doc_starts.empty() ? nullptr : doc.p;
  }
  DevTensor like_v() const { return DevTensor(v.B, v.T, v.H, v.D, v.type, v.layout); }
  DevTensor like_k() const { return DevTensor(k.B, k.T, k.H, k.D, k.type, k.layout); }
};

// One rank's problem on the device: inputs uploaded once, forward + backward
// enqueued on a stream without synchronizing (so it can be captured in a graph).
struct DeviceRank : DeviceProblem {
  ProblemSpec s;
  ScalarType dtype;
  DevTensor o, dq, dk, dv;
  DevBuf<float> dg, records, prefixes, decays, states;
  bool keep_states = true;  // Lasp2Saved::segment_states (the kernels' segment states) or recompute
  DevBuf<double> fws, bws;

  DeviceRank(const Problem<double>& pr, ScalarType t, const PartLayout& layout)
      : DeviceProblem(pr, t, Layout{}), s(pr.spec), dtype(t),
        o(s.batch, s.seqlen, s.heads, s.dim_v, t, {}), dq(s.batch, s.seqlen, s.heads, s.dim_k, t, {}),
        dk(s.batch, s.seqlen, s.heads, s.dim_k, t, {}), dv(s.batch, s.seqlen, s.heads, s.dim_v, t, {}),
        dg(s.batch * s.seqlen * s.heads) {
    records = DevBuf<float>(std::max<int64_t>(1, Lasp2Saved::local_records_floats(p, layout)));
    prefixes = DevBuf<float>(std::max<int64_t>(1, Lasp2Saved::prefix_states_floats(p, layout)));
    decays = DevBuf<float>(std::max<int64_t>(1, Lasp2Saved::log_decays_floats(p, layout)));
    states = DevBuf<float>(std::max<int64_t>(1, Lasp2Saved::segment_states_floats(cuda_backend(), p, layout)));
    fws = DevBuf<double>((lasp2_forward_workspace_bytes(p, layout) + 7) / 8);
    bws = DevBuf<double>((lasp2_backward_workspace_bytes(p, layout, true) + 7) / 8);
    dg.poison();
    // uploads and poison ran on the legacy stream, which a non-blocking stream does not wait for
    cuda_ok(cudaDeviceSynchronize(), "uploads");
  }

  void enqueue(const KernelBackend& be, Communicator* comm, const PartLayout& layout, bool overlap,
               cudaStream_t stream) {
    const Lasp2Saved saved{records.p, prefixes.p, decays.p, nullptr, keep_states ? states.p : nullptr};
    Lasp2Options options;
    options.overlap_forward = overlap;
    lasp2_forward(be, comm, layout, p, o.mview(), saved, fws.p, options, stream);
    lasp2_backward(be, comm, layout, p, dout.cview(), saved, dq.mview(), dk.mview(), dv.mview(), dg.p, bws.p,
                   stream);
  }

  Grads grads() const {
    Grads g;
    g.o = o.download().v;
    g.dq = dq.download().v;
    g.dk = dk.download().v;
    g.dv = dv.download().v;
    const auto dgf = dg.download();
    g.dg.assign(dgf.begin(), dgf.end());
    return g;
  }
};

}  // namespace lasp2::testing
