// A delta-rule test problem (tests/cpp/delta_rule/delta_problem.h) on the device, shared
// by the GDN and KDA CUDA tests (test_delta_*.cpp, test_kda_*.cpp).
#pragma once

#include <vector>

#include "../delta_rule/delta_problem.h"
#include "cuda_test_util.h"
#include "delta_rule/delta_backend.h"

namespace lasp2::testing {

// The problem on the device (q, k, v, dO in `type`, gates and betas fp32, packed
// documents' markers) and p, its parameters pointing at them.
struct DeltaDeviceProblem {
  DevTensor q, k, v, dout;
  DevBuf<float> g, beta;
  DevBuf<uint8_t> doc_start;
  DevBuf<int32_t> doc_id;
  delta::DeltaParams p;

  DeltaDeviceProblem(const delta::testing::DeltaProblem<float>& pr, ScalarType type, Layout lay)
      : q(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        k(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_k, type, lay),
        v(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, type, lay),
        dout(pr.spec.batch, pr.spec.seqlen, pr.spec.heads, pr.spec.dim_v, type, lay),
        g(pr.g.size()),
        beta(pr.beta.size()),
        doc_start(pr.doc_start.size()),
        doc_id(pr.doc_id.size()) {
    q.upload({pr.q.begin(), pr.q.end()});
    k.upload({pr.k.begin(), pr.k.end()});
    v.upload({pr.v.begin(), pr.v.end()});
    dout.upload({pr.dout.begin(), pr.dout.end()});
    g.upload(pr.g);
    beta.upload(pr.beta);
    doc_start.upload(pr.doc_start);
    doc_id.upload(pr.doc_id);
    p = pr.params();
    p.dtype = type;
    p.gate_dtype = ScalarType::kFloat32;
    p.q = q.cview();
    p.k = k.cview();
    p.v = v.cview();
    p.g = g.p;
    p.beta = beta.p;
    if (pr.spec.packed()) {
      p.doc_start = doc_start.p;
      p.doc_id = doc_id.p;
    }
  }
};

}  // namespace lasp2::testing
