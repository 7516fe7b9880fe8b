// The balanced split's two local parts of a delta-rule problem as one batch of two rows
// (B = 1): lasp2/part_pair.h's reinterpretation, for DeltaParams. Every field that is
// read by batch row gets row 1 at local token h: q, k, v, the gates g (GDN [B, T, H], KDA
// [B, T, H, dk]: the same BTHStrides, whose batch stride becomes h times the sequence
// stride), beta, and doc_start and doc_id (doc_batch_stride = h, so starts_doc and
// doc_of of row 1 read local token h + t). Where doc_id is null, doc_of(b, t) = b names
// row 1 document 1; the kernels (CPU and CUDA) read doc_of only to index per-document
// states (DocStates), with which DeltaFamily never pairs. dg and dbeta are
// contiguous [B, T, H(, dk)] and indexed (b * seqlen + t) * H + h by every backend, which
// is the one row's index of token h + t for row 1.
#pragma once

#include <optional>
#include <vector>

#include "delta_rule/delta_params.h"
#include "lasp2/part_pair.h"

namespace lasp2::delta {

struct DeltaPair : PairRows {
  DeltaParams params;  // batch 2, seqlen h: row j is local part j

  // The pair of `parts` of `p` (PairRows::range_of); nothing otherwise.
  static std::optional<DeltaPair> of(const DeltaParams& p, const std::vector<TokenRange>& parts);
};

}  // namespace lasp2::delta
