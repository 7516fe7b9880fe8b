// The balanced split's two local parts as one batch of two rows (see part_pair.h).
#include "lasp2/part_pair.h"

#include "env_knob.h"

namespace lasp2 {

bool PartPair::enabled() {
  static const bool on = env_flag("LASP2_PAIR_PARTS", true);
  return on;
}

std::optional<PartPair> PartPair::of(const AttentionParams& p, const std::vector<TokenRange>& parts) {
  const int64_t h = p.seqlen / 2;
  if (parts.size() != 2 || p.batch != 1 || h == 0 || 2 * h != p.seqlen) return std::nullopt;
  if (!(parts[0] == TokenRange{0, h}) || !(parts[1] == TokenRange{h, 2 * h}) || !enabled()) return std::nullopt;
  PartPair pair;
  pair.range = {0, h};
  AttentionParams& q = pair.params;
  q = p;
  q.batch = 2;
  q.seqlen = h;
  q.q = pair.view(p.q);
  q.k = pair.view(p.k);
  q.v = pair.view(p.v);
  q.decay.gate_stride = pair.rows(p.decay.gate_stride);
  q.doc_start_batch_stride = h;
  return pair;
}

}  // namespace lasp2
