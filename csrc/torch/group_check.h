// The per-call cross-rank consistency check of lasp2's ops as one C++ object per
// (process group, device): lasp2/ops/_group_consistency.py builds each call's row of
// small integers (sizes, options, host digests) and hands it here; exchange() sends it
// in ONE fixed-size all-gather and compares the gathered table on the host.
//
// Values that live on the device (the bits of `decay`, "g holds a positive entry") would
// make that host read wait for the op's stream, i.e. drain the GPU's queue at every
// call. stage() therefore computes them on the op's stream (ONE fused kernel per call,
// csrc/core/cuda/consistency_kernels.h; the same definition on the CPU,
// csrc/core/consistency_values.h) into one entry of a RING of
// `depth` entries (`lagged` int64 each) and records an event after them; a later
// exchange() sends the entries it is asked for at the end of its row, its side stream
// waiting only for THOSE entries' events. The caller sends an entry `depth` calls after
// staging it (or at the backward of its outputs), so the host may run `depth` calls ahead
// of the GPU: the event it waits for is that old.
//
// On CUDA the row is written by one kernel (the head passed by value, the sent ring entries
// appended) and sent by the all-gather on a high-priority stream of the check's own; the
// host waits for that stream only, never for the op's queue behind the events.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#ifdef LASP2_WITH_CUDA
#include <ATen/cuda/CUDAEvent.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace pybind11 {
class module_;
}

namespace lasp2::torch_binding {

class GroupCheck {
 public:
  // Kinds of a staged device value.
  enum Kind : int64_t { kDigest = 0, kMax = 1 };

  GroupCheck(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device, int64_t row, int64_t lagged,
             int64_t depth);

  // The argument checks of stage(), also run by exchange_then_stage before its collective.
  void check_values(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds) const;

  // Writes this call's device values (None: 0) into the next free ring entry, on the current
  // stream: kDigest a bit-exact int64 digest, kMax the float64 bits of the maximum (a
  // positive one is a flag). Records the entry's event. Returns the entry's sequence number
  // (0, 1, 2, ... per object), which exchange() takes. Throws when all `depth` entries wait.
  int64_t stage(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds);

  // Sends `head` (zero-padded) followed by the staged entries `sends` (sequence numbers, in
  // order; entry i of n fills slots [row - lagged * (n - i), row - lagged * (n - i - 1))),
  // all-gathers every rank's row and compares on the host. Returns -1 when every row is
  // equal and no slot of `max_slots` holds a positive float64 on any rank; otherwise the
  // first column that differs or is flagged. Frees the sent entries. Throws RuntimeError
  // when the collective fails.
  int64_t exchange(const std::vector<int64_t>& head, const std::vector<int64_t>& sends,
                   const std::vector<int64_t>& max_slots);

  // exchange(), then, when every row agreed and `values` holds a tensor, stage(values,
  // kinds): one call from Python for a call whose device values go DEPTH calls later.
  // The staged entry is then ARMED for this thread's next LASP-2 forward, which folds it
  // into its own AllGather and poisons its outputs on every rank when the ranks' values
  // fail (lasp2/call_check.h); exchange() disarms first. Returns (exchange's result, the
  // staged sequence number or -1).
  std::pair<int64_t, int64_t> exchange_then_stage(const std::vector<int64_t>& head, const std::vector<int64_t>& sends,
                                                  const std::vector<int64_t>& max_slots,
                                                  const std::vector<std::optional<at::Tensor>>& values,
                                                  const std::vector<int64_t>& kinds);

  // Frees every staged entry unsent (every rank dropped them at the same point).
  void discard();

  // The last gathered table, [world, row] int64 on the CPU (to word an error).
  at::Tensor table() const;

  int64_t world() const { return world_; }
  int64_t rank() const { return rank_; }
  int64_t depth() const { return depth_; }

 private:
  int64_t entry_of(int64_t seq) const;
  void stage_on_cpu(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds,
                    int64_t* slots) const;
#ifdef LASP2_WITH_CUDA
  void stage_on_cuda(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds,
                     int64_t entry);
  void send_on_cuda(const std::vector<int64_t>& head, const std::vector<int64_t>& entries, int64_t first);
#endif

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  at::Device device_;
  int64_t row_, lagged_, depth_, world_, rank_;
  int64_t next_seq_ = 0;
  std::vector<int64_t> entry_seq_;  // per ring entry: the sequence number staged there, -1 when free
  at::Tensor ring_;        // [depth, lagged] int64 on the device: staged values
  at::Tensor scratch_;     // CUDA: [depth, kStageScratch] int64, the stage kernel's partials per entry
  at::Tensor mine_;        // [row] int64 on the device: what is sent
  at::Tensor gathered_;    // [world * row] int64 on the device
  at::Tensor host_table_;  // [world * row] int64, pinned on CUDA
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side_;  // the check's own stream, beside the op's
  std::vector<at::cuda::CUDAEvent> events_;    // per ring entry: recorded after its values
#endif
};

void register_group_check(pybind11::module_& m);

}  // namespace lasp2::torch_binding
