// A delta-rule problem's two local parts as one batch of two rows (see delta_pair.h).
#include "delta_rule/delta_pair.h"

namespace lasp2::delta {

std::optional<DeltaPair> DeltaPair::of(const DeltaParams& p, const std::vector<TokenRange>& parts) {
  std::optional<DeltaPair> pair = two_rows<DeltaPair>(p, parts);
  if (pair) {
    pair->params.g_stride = pair->rows(p.g_stride);
    pair->params.beta_stride = pair->rows(p.beta_stride);
    pair->params.doc_batch_stride = pair->range.end;
  }
  return pair;
}

}  // namespace lasp2::delta
