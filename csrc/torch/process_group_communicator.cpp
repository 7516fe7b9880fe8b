#include "process_group_communicator.h"

#include <torch/csrc/distributed/c10d/Work.hpp>

// _allgather_base is marked deprecated in newer torch in
// favour of a name older releases lack; it remains the portable spelling.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace lasp2::torch_binding {
namespace {

// Keeps the wrapped buffers alive until the collective is waited on. For NCCL
// process groups wait() only makes the current stream wait: the host goes on.
class TorchWork final : public CommWork {
 public:
  TorchWork(c10::intrusive_ptr<c10d::Work> work, std::vector<at::Tensor> keep)
      : work_(std::move(work)), keep_(std::move(keep)) {}
  void wait(void*) override {
    if (work_) work_->wait();
    work_.reset();
    keep_.clear();
  }
  ~TorchWork() override {
    if (work_) work_->wait();  // never leave a collective writing into freed memory
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::vector<at::Tensor> keep_;
};

}  // namespace

at::ScalarType to_aten(ScalarType type) {
  switch (type) {
    case ScalarType::kFloat32:
      return at::kFloat;
    case ScalarType::kFloat64:
      return at::kDouble;
    case ScalarType::kFloat16:
      return at::kHalf;
    case ScalarType::kBFloat16:
      return at::kBFloat16;
  }
  fail("lasp2: unknown scalar type");
}

ProcessGroupCommunicator::ProcessGroupCommunicator(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                   at::Device device)
    : group_(std::move(group)), device_(device) {
  LASP2_CHECK(group_, "ProcessGroupCommunicator needs a process group");
}

at::Tensor ProcessGroupCommunicator::wrap(const void* data, std::size_t count,
                                          ScalarType type) const {
  return at::from_blob(const_cast<void*>(data), {static_cast<int64_t>(count)},
                       at::TensorOptions().dtype(to_aten(type)).device(device_));
}

std::unique_ptr<CommWork> ProcessGroupCommunicator::all_gather(const void* send, void* recv,
                                                               std::size_t count,
                                                               ScalarType type, void*) {
  at::Tensor in = wrap(send, count, type);
  at::Tensor out = wrap(recv, count * size(), type);
  auto work = group_->_allgather_base(out, in);
  return std::make_unique<TorchWork>(std::move(work), std::vector<at::Tensor>{in, out});
}

std::unique_ptr<CommWork> ProcessGroupCommunicator::send(const void* buffer, std::size_t count,
                                                         ScalarType type, int peer, void*) {
  std::vector<at::Tensor> tensors{wrap(buffer, count, type)};
  auto work = group_->send(tensors, peer, tag_);
  return std::make_unique<TorchWork>(std::move(work), std::move(tensors));
}

std::unique_ptr<CommWork> ProcessGroupCommunicator::recv(void* buffer, std::size_t count,
                                                         ScalarType type, int peer, void*) {
  std::vector<at::Tensor> tensors{wrap(buffer, count, type)};
  auto work = group_->recv(tensors, peer, tag_);
  return std::make_unique<TorchWork>(std::move(work), std::move(tensors));
}

}  // namespace lasp2::torch_binding
