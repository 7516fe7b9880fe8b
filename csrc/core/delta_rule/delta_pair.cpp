// A delta-rule problem's two local parts as one batch of two rows (see delta_pair.h).
#include "delta_rule/delta_pair.h"

namespace lasp2::delta {

std::optional<DeltaPair> DeltaPair::of(const DeltaParams& p, const std::vector<TokenRange>& parts) {
  const std::optional<TokenRange> range = range_of(p.batch, p.seqlen, parts);
  if (!range) return std::nullopt;
  DeltaPair pair;
  pair.range = *range;
  const int64_t h = range->end;
  DeltaParams& q = pair.params;
  q = p;
  q.batch = 2;
  q.seqlen = h;
  q.q = pair.view(p.q);
  q.k = pair.view(p.k);
  q.v = pair.view(p.v);
  q.g_stride = pair.rows(p.g_stride);
  q.beta_stride = pair.rows(p.beta_stride);
  q.doc_batch_stride = h;
  return pair;
}

}  // namespace lasp2::delta
