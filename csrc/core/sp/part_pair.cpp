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
  std::optional<PartPair> pair = two_rows<PartPair>(p, parts);
  if (pair) {
    pair->params.decay.gate_stride = pair->rows(p.decay.gate_stride);
    pair->params.doc_start_batch_stride = pair->range.end;
  }
  return pair;
}

}  // namespace lasp2
