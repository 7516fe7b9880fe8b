// The balanced split's two local parts as one batch of two rows (B = 1).
//
// A rank of the balanced split holds two global parts, r and 2P - 1 - r, one after the
// other in its local tokens: [0, h) and [h, 2h). Read with a batch stride of h times its
// sequence stride, every per-token view of a B = 1 problem is a [2, h, H] view whose row j
// is local part j, and the two parts' fp32 states laid out one after another are one
// [2, H, dk, dv] state. So one backend call over tokens [0, h) of that two-row problem is
// the two parts' calls at once, with the work of one part of twice the length: the
// kernels cut it into as many parallel segments as a contiguous rank's part, where two
// calls over half parts each ran half as many, twice (docs/providers.md).
#pragma once

#include <cstdint>
#include <optional>
#include <vector>

#include "lasp2/params.h"
#include "lasp2/types.h"

namespace lasp2 {

struct PartPair {
  AttentionParams params;  // batch 2, seqlen h: row j is local part j
  TokenRange range;        // [0, h)

  // The pair of `parts` of a problem `p`: B = 1, exactly [0, h) and [h, 2h) with
  // 2h = p.seqlen > 0, and LASP2_PAIR_PARTS not 0. Nothing otherwise.
  static std::optional<PartPair> of(const AttentionParams& p, const std::vector<TokenRange>& parts);
  // Whether pairs are formed at all: LASP2_PAIR_PARTS (unset: 1; 0 runs the parts one
  // call each, the A/B's reference). Read once per process, at the first call: a forward
  // and its backward must lay out what one keeps for the other alike.
  static bool enabled();

  ConstView view(const ConstView& v) const { return {v.data, rows(v.stride)}; }
  MutView view(const MutView& v) const { return {v.data, rows(v.stride)}; }

 private:
  BTHStrides rows(BTHStrides s) const {
    s.batch = range.end * s.seq;
    return s;
  }
};

// Where buffers of `stride` elements each, one per part in order, begin when they lie
// one after another: the first entry's address (found from any non-null one; null
// entries are slots the caller filled with zeros). Nothing when they do not lie so;
// nullptr when every entry is null.
template <typename T>
std::optional<T*> laid_out(const std::vector<T*>& buffers, int64_t stride) {
  std::optional<T*> base;
  for (size_t i = 0; i < buffers.size(); ++i) {
    if (buffers[i] == nullptr) continue;
    T* b = buffers[i] - static_cast<int64_t>(i) * stride;
    if (base && *base != b) return std::nullopt;
    base = b;
  }
  return base ? base : std::optional<T*>(nullptr);
}

}  // namespace lasp2
