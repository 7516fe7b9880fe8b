// The small communication interface the sequence-parallel algorithms are written
// against. Implementations: NcclCommunicator (core, CUDA builds), a torch
// ProcessGroup adapter (binding layer), and an in-process thread group (tests).
//
// Stream semantics: a call is ordered after the work already enqueued on `stream`
// (a cudaStream_t for CUDA memory, ignored for host memory); CommWork::wait(stream)
// makes the result visible to work enqueued on `stream` afterwards, without
// blocking the host where the implementation can avoid it.
#pragma once

#include <cstddef>
#include <memory>

#include "lasp2/types.h"

namespace lasp2 {

class CommWork {
 public:
  virtual ~CommWork() = default;
  virtual void wait(void* stream) = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual Device device() const = 0;  // where the buffers it moves live (checked by the schedules)

  // recv holds size() * count elements: rank r's `send` lands at recv + r * count.
  virtual std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                               ScalarType type, void* stream) = 0;

  // Point-to-point transfers for ring algorithms (LASP-1). Peers are ranks of this group.
  virtual std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type,
                                         int peer, void* stream) = 0;
  virtual std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type,
                                         int peer, void* stream) = 0;
};

// A CommWork that is already complete (local copies, size-1 groups).
class CompletedWork final : public CommWork {
 public:
  void wait(void*) override {}
};

}  // namespace lasp2
