// lasp2::Communicator directly on NCCL, with its own communication stream so
// that collectives overlap compute on the caller's stream. Ordering uses CUDA
// events only (no device-wide syncs), so it also works under CUDA graph capture.
#pragma once

#include <array>
#include <memory>
#include <string>

#include "lasp2/communicator.h"

namespace lasp2 {

constexpr std::size_t kNcclUniqueIdBytes = 128;
using NcclUniqueIdBytes = std::array<char, kNcclUniqueIdBytes>;

// Made on one rank and shared with the others (e.g. through the torch group).
NcclUniqueIdBytes nccl_unique_id();

class NcclCommunicator final : public Communicator {
 public:
  // Collective over the `size` ranks that call with the same id; device is the
  // CUDA device index all of this rank's buffers live on. timeout_seconds > 0 starts
  // a watchdog that aborts the communicator when a collective takes longer or NCCL
  // reports an asynchronous error (a peer died); later calls then throw.
  NcclCommunicator(const NcclUniqueIdBytes& id, int size, int rank, int device,
                   double timeout_seconds = 0);
  ~NcclCommunicator() override;
  NcclCommunicator(const NcclCommunicator&) = delete;
  NcclCommunicator& operator=(const NcclCommunicator&) = delete;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return Device::kCUDA; }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void* stream) override;
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;

  // Aborts the NCCL communicator now (unblocking stuck collectives); later calls throw.
  void abort(const std::string& reason);

  struct State;  // NCCL and CUDA handles, opaque to includers

 private:
  std::unique_ptr<State> state_;
  int size_;
  int rank_;
  int device_;

  std::string label(const char* collective) const;
};

}  // namespace lasp2
