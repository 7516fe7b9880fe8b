// One rank's linear attention problem on the device (the CUDA backend's end-to-end
// tests: test_cuda_lasp2.cpp, test_cuda_call_check.cpp): inputs uploaded once, LASP-2's
// saved buffers and workspaces sized for the layout, the params pointing at them.
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

// One rank's problem on the device: inputs uploaded once, forward + backward
// enqueued on a stream without synchronizing (so it can be captured in a graph).
struct DeviceRank {
  ProblemSpec s;
  ScalarType dtype;
  DevTensor q, k, v, dout, o, dq, dk, dv;
  DevBuf<float> gate, logd, dg, records, prefixes, decays, states;
  bool keep_states = true;  // Lasp2Saved::segment_states (the kernels' segment states) or recompute
  DevBuf<uint8_t> doc;
  DevBuf<double> fws, bws;
  AttentionParams p;

  DeviceRank(const Problem<double>& pr, ScalarType t, const PartLayout& layout)
      : s(pr.spec), dtype(t),
        q(s.batch, s.seqlen, s.heads, s.dim_k, t, {}), k(s.batch, s.seqlen, s.heads, s.dim_k, t, {}),
        v(s.batch, s.seqlen, s.heads, s.dim_v, t, {}), dout(s.batch, s.seqlen, s.heads, s.dim_v, t, {}),
        o(s.batch, s.seqlen, s.heads, s.dim_v, t, {}), dq(s.batch, s.seqlen, s.heads, s.dim_k, t, {}),
        dk(s.batch, s.seqlen, s.heads, s.dim_k, t, {}), dv(s.batch, s.seqlen, s.heads, s.dim_v, t, {}),
        gate(to_device_f32(pr.gate)), logd(to_device_f32(pr.log_decay)), dg(s.batch * s.seqlen * s.heads),
        doc(pr.doc_start.size()) {
    q.upload(pr.q);
    k.upload(pr.k);
    v.upload(pr.v);
    dout.upload(pr.dout);
    doc.upload(pr.doc_start);
    p = pr.params();
    p.dtype = t;
    p.q = q.cview();
    p.k = k.cview();
    p.v = v.cview();
    p.decay.dtype = ScalarType::kFloat32;
    p.decay.gate = gate.p;
    p.decay.log_decay = logd.p;
    p.doc_start = s.doc_starts.empty() ? nullptr : doc.p;
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
