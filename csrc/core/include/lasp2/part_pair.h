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

// What any family's pair shares: the token range [0, h) of the two-row problem and the
// strides that reach its row 1 (a batch stride of h times the sequence stride; h tokens
// on from token 0 of the one row).
struct PairRows {
  TokenRange range;  // [0, h)

  // [0, h) when `parts` of a problem of `batch` rows and `seqlen` local tokens are exactly
  // [0, h) and [h, 2h) of one row with 2h = seqlen > 0 and LASP2_PAIR_PARTS is not 0.
  static std::optional<TokenRange> range_of(int64_t batch, int64_t seqlen, const std::vector<TokenRange>& parts);
  // Whether pairs are formed at all: LASP2_PAIR_PARTS (unset: 1; 0 runs the parts one
  // call each, the A/B's reference). Read once per process, at the first call: a forward
  // and its backward must lay out what one keeps for the other alike.
  static bool enabled();

  BTHStrides rows(BTHStrides s) const {
    s.batch = range.end * s.seq;
    return s;
  }
  ConstView view(const ConstView& v) const { return {v.data, rows(v.stride)}; }
  MutView view(const MutView& v) const { return {v.data, rows(v.stride)}; }
  // What a family files the pair's kept work and summary under: the whole local range,
  // which is no part of a balanced layout.
  TokenRange key() const { return {0, 2 * range.end}; }

  // The pair of `parts` of `p` with what every family's params have read as two rows
  // (batch, seqlen, q, k, v); the family then sets its own per-row fields. Nothing where
  // range_of finds no pair.
  template <typename Pair, typename Params>
  static std::optional<Pair> two_rows(const Params& p, const std::vector<TokenRange>& parts) {
    const std::optional<TokenRange> range = range_of(p.batch, p.seqlen, parts);
    if (!range) return std::nullopt;
    Pair pair;
    pair.range = *range;
    pair.params = p;
    pair.params.batch = 2;
    pair.params.seqlen = range->end;
    pair.params.q = pair.view(p.q);
    pair.params.k = pair.view(p.k);
    pair.params.v = pair.view(p.v);
    return pair;
  }
};

// The scalar-decay family's pair (the delta rule's: delta_rule/delta_pair.h).
struct PartPair : PairRows {
  AttentionParams params;  // batch 2, seqlen h: row j is local part j

  // The pair of `parts` of a problem `p` (see range_of). Nothing otherwise.
  static std::optional<PartPair> of(const AttentionParams& p, const std::vector<TokenRange>& parts);
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
// The same over one member of each entry (PartSummary::state, PartStates::leaving_grad, ...).
template <typename E, typename T>
std::optional<T*> laid_out(const std::vector<E>& entries, T* E::*member, int64_t stride) {
  std::vector<T*> buffers;
  for (const E& e : entries) buffers.push_back(e.*member);
  return laid_out(buffers, stride);
}

}  // namespace lasp2
