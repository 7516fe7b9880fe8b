// The per-call cross-rank consistency check of lasp2's ops as one C++ object per
// (process group, device): lasp2/ops/_group_consistency.py builds each call's row of
// small integers (sizes, options, host digests) and hands it here; exchange() sends it
// in ONE fixed-size all-gather and compares the gathered table on the host.
//
// Values that live on the device (the bits of `decay`, "g holds a positive entry") would
// make that host read wait for the op's stream, i.e. drain the GPU's queue at every
// call. stage() therefore computes them on the current stream into the LAST `lagged`
// slots of the row buffer, and the next exchange() on the group (the next call, or the
// backward of the outputs) sends them, waiting only for the event recorded after them:
// the host never waits for work enqueued after the previous call's values.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
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

  GroupCheck(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device, int64_t row, int64_t lagged);

  // Writes the device values of this call into the lagged slots (None: 0), on the
  // current stream: kDigest a bit-exact int64 digest, kMax the float64 bits of the
  // maximum (a positive one is a flag). Records the event exchange() waits for.
  void stage(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds);

  // Sends `head` (at most row - lagged values, zero-padded) followed by the lagged slots
  // as they were last staged, all-gathers every rank's row and compares on the host.
  // Returns -1 when every row is equal and no slot of `max_slots` holds a positive
  // float64 on any rank; otherwise the first column that differs or is flagged. Clears
  // the lagged slots for the next call. Throws RuntimeError when the collective fails.
  int64_t exchange(const std::vector<int64_t>& head, const std::vector<int64_t>& max_slots);

  // Forgets the staged values (zeros in their slots, ordered after them on the current
  // stream): every rank raised at a call whose exchange did not send them.
  void discard();

  // The last gathered table, [world, row] int64 on the CPU (to word an error).
  at::Tensor table() const;

  int64_t world() const { return world_; }
  int64_t rank() const { return rank_; }

 private:
  at::Tensor digest(const at::Tensor& t);

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  at::Device device_;
  int64_t row_, lagged_, world_, rank_;
  at::Tensor host_row_;    // [row] int64, pinned on CUDA: the head is written here
  at::Tensor mine_;        // [row] int64 on the device: what is sent
  at::Tensor gathered_;    // [world * row] int64 on the device
  at::Tensor host_table_;  // [world * row] int64, pinned on CUDA
  at::Tensor weights_;     // the digest's multipliers, for the last length digested
  bool staged_ = false;
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAStream> side_;  // the check's own stream, beside the op's
  at::cuda::CUDAEvent staged_event_;
#endif
};

void register_group_check(pybind11::module_& m);

}  // namespace lasp2::torch_binding
