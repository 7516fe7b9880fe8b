// "NaN at the call" (issue 13; docs/reliability.md, "Guaranteed across the ranks of a
// group"). The per-call cross-rank check compares a call's DEVICE values (the bit-exact
// digest of `decay`, the float64 maximum of `g` / `decay` whose sign says "positive
// gate") DEPTH calls later, so that the host never waits for the op's stream
// (csrc/torch/group_check.h). To keep the calls in between from returning a silently
// wrong answer, the check ARMS the call's values (a few int64 words on the op's device)
// right before the op; the forward of the same thread TAKES them and gathers them over
// the group: LASP-2 in its own AllGather (a few words per rank, independent of the
// sequence length), LASP-1 (a ring of sends) in one AllGather of their own posted before
// the ring, provider "ulysses" (Python all-to-alls) through its collectives
// (csrc/torch/call_check_op.h). After it every rank compares every rank's words on the
// device: when two ranks' digests differ, or a maximum word is positive on a rank, the
// call's outputs and final states become NaN on every rank (one tiny kernel that writes
// nothing otherwise; no host sync). The error itself still comes from the check, DEPTH
// calls later or at the backward, naming the value and the ranks. The check arms only
// when its row agreed at this call and the call has device values, both alike on every
// rank, so every rank gathers the words or none does.
//
// Thread-local: the check and the op run on the caller's thread (and each rank of the
// core tests is a thread). Every check of a group call disarms first, so an armed call
// whose op never takes it leaves nothing for a later op.
#pragma once

#include <cstdint>

#include "lasp2/types.h"

namespace lasp2 {

// int64 words per rank in the forward AllGather: the check's LAGGED ring entry
// (lasp2/ops/_group_consistency.py).
constexpr int kCallCheckWords = 4;
constexpr int64_t kCallCheckFloats = 2 * kCallCheckWords;  // as fp32 slots of the gather

struct CallCheck {
  const int64_t* words = nullptr;  // `count` int64 on `device`; null: nothing armed
  int count = 0;                   // <= kCallCheckWords
  uint32_t max_mask = 0;  // bit i: word i holds the float64 bits of a maximum that must not be > 0
  Device device = Device::kCPU;
  bool armed() const { return words != nullptr && count > 0; }
};

void arm_call_check(const CallCheck& check);
void disarm_call_check();
CallCheck take_call_check();  // the armed check (or none), disarmed

// What a failed check writes NaN into: a [B, T, H, D] view (last dimension contiguous)
// of a float type, or (floats()) a contiguous fp32 block.
struct PoisonTarget {
  void* data = nullptr;
  ScalarType dtype = ScalarType::kFloat32;
  int64_t batch = 0, seqlen = 0, heads = 0, dim = 0;
  BTHStrides stride;

  static PoisonTarget floats(float* data, int64_t count) {
    return {data, ScalarType::kFloat32, 1, 1, 1, count, {count, count, count}};
  }
  int64_t numel() const { return data == nullptr ? 0 : batch * seqlen * heads * dim; }
};

constexpr int kMaxPoisonTargets = 4;

// `gathered` holds the ranks' words as fp32 slots: rank r's at gathered + r * rank_stride
// (two slots per word, the low half first). When the words fail (consistency_values.h,
// words_fail) every target is filled with NaN; otherwise nothing is written. Enqueued
// on `stream` (CUDA: one kernel), no host sync.
void poison_on_failed_check(Device device, const float* gathered, int64_t rank_stride, int world,
                            const CallCheck& check, const PoisonTarget* targets, int count, void* stream);

}  // namespace lasp2
