// lasp2::Communicator over a torch.distributed ProcessGroup (gloo on the CPU,
// NCCL or any other backend on GPUs): the group comes from the caller, e.g.
// Megatron's context-parallel group, so no global state is created here.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>

#include "lasp2/communicator.h"

namespace lasp2::torch_binding {

class ProcessGroupCommunicator final : public Communicator {
 public:
  ProcessGroupCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device);

  int rank() const override { return group_->getRank(); }
  int size() const override { return group_->getSize(); }
  Device device() const override { return device_.is_cuda() ? Device::kCUDA : Device::kCPU; }
  const c10::intrusive_ptr<c10d::ProcessGroup>& group() const { return group_; }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void* stream) override;
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void* stream) override;

 private:
  at::Tensor wrap(const void* data, std::size_t count, ScalarType type) const;
  // "lasp2: <collective> over process group '<name>' [backend, rank r of n]", for errors.
  std::string describe(const char* collective) const;

  c10::intrusive_ptr<c10d::ProcessGroup> group_;
  at::Device device_;
  int tag_ = 0;
};

at::ScalarType to_aten(ScalarType type);

}  // namespace lasp2::torch_binding
