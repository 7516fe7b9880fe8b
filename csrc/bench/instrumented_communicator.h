// Communicator wrappers for benchmarks, built into the optional extension lasp2._bench
// (setup.py with LASP2_BUILD_BENCH=1), never into lasp2._C:
//   TimedCommunicator: forwards to another communicator and adds up the host time
//     spent inside its calls and in CommWork::wait, with call and byte counts. On
//     the CPU (gloo) that is the time a rank is blocked on communication, waiting
//     for peers included; for CUDA communicators it is enqueue time only.
//   NoopCommunicator: the same rank and size as another communicator but moves
//     nothing between ranks (all_gather replicates the local block, recv zero-fills),
//     so a run with it costs the compute alone: total - no-op total is the exposed
//     communication time, serial waits included, on any device.
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <memory>

#include "lasp2/communicator.h"

namespace lasp2::bench {

class TimedCommunicator final : public Communicator {
 public:
  explicit TimedCommunicator(std::shared_ptr<Communicator> inner);

  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  Device device() const override { return inner_->device(); }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void* stream) override;
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;

  double seconds() const { return nanoseconds_.load() * 1e-9; }
  int64_t calls() const { return calls_.load(); }
  int64_t bytes() const { return bytes_.load(); }  // sent by this rank (recv counts 0)
  void reset();

  // Adds the host time of one call or wait.
  void add(int64_t nanoseconds) { nanoseconds_ += nanoseconds; }

 private:
  template <typename F>
  std::unique_ptr<CommWork> timed(std::size_t bytes, F&& call);

  std::shared_ptr<Communicator> inner_;
  std::atomic<int64_t> nanoseconds_{0}, calls_{0}, bytes_{0};
};

class NoopCommunicator final : public Communicator {
 public:
  explicit NoopCommunicator(const std::shared_ptr<Communicator>& like);

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  Device device() const override { return device_.is_cuda() ? Device::kCUDA : Device::kCPU; }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void* stream) override;
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;

 private:
  at::Tensor bytes_at(const void* data, std::size_t count, ScalarType type) const;

  int rank_, size_;
  at::Device device_;  // the current CUDA device at construction for CUDA communicators
};

}  // namespace lasp2::bench
