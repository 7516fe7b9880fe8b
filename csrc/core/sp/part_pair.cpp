// The balanced split's two local parts as one batch of two rows (see part_pair.h).
#include "lasp2/part_pair.h"

#include "env_knob.h"

namespace lasp2 {

bool PairRows::enabled() {
  static const bool on = env_flag("LASP2_PAIR_PARTS", true);
  return on;
}

std::optional<TokenRange> PairRows::range_of(int64_t batch, int64_t seqlen, const std::vector<TokenRange>& parts) {
  const int64_t h = seqlen / 2;
  if (parts.size() != 2 || batch != 1 || h == 0 || 2 * h != seqlen) return std::nullopt;
  if (!(parts[0] == TokenRange{0, h}) || !(parts[1] == TokenRange{h, 2 * h}) || !enabled()) return std::nullopt;
  return TokenRange{0, h};
}

std::optional<PartPair> PartPair::of(const AttentionParams& p, const std::vector<TokenRange>& parts) {
  const std::optional<TokenRange> range = range_of(p.batch, p.seqlen, parts);
  if (!range) return std::nullopt;
  PartPair pair;
  pair.range = *range;
  const int64_t h = range->end;
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
