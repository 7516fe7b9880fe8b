#include "process_group_communicator.h"

#include <torch/csrc/distributed/c10d/Work.hpp>

#include <stdexcept>
#include <string>

// _allgather_base is marked deprecated in newer torch in
// favour of a name older releases lack; it remains the portable spelling.
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace lasp2::torch_binding {
namespace {

// Keeps the wrapped buffers alive until the collective is waited on. For NCCL
// process groups wait() only makes the current stream wait: the host goes on.
// A failed or timed-out collective (a peer exited, the group's timeout passed)
// becomes one std::runtime_error (Python RuntimeError) naming the collective and
// the group; it is thrown once, never from the destructor, which would abort the
// process (std::terminate) while the stack unwinds from the first error.
class TorchWork final : public CommWork {
 public:
  TorchWork(c10::intrusive_ptr<c10d::Work> work, std::vector<at::Tensor> keep, std::string what)
      : work_(std::move(work)), keep_(std::move(keep)), what_(std::move(what)) {}
  void wait(void*) override {
    auto work = std::move(work_);  // waited at most once, even when it throws
    if (!work) return;
    try {
      work->wait();
    } catch (const std::exception& e) {
      keep_.clear();
      throw std::runtime_error(what_ + " failed: " + e.what());
    }
    keep_.clear();
  }
  ~TorchWork() override {
    if (!work_) return;
    try {
      work_->wait();  // never leave a collective writing into freed memory
    } catch (...) {
      // an error already surfaced (or is surfacing) elsewhere; nothing to add here
    }
  }

 private:
  c10::intrusive_ptr<c10d::Work> work_;
  std::vector<at::Tensor> keep_;
  std::string what_;
};

// Starting a collective can fail too (e.g. gloo reports a peer that already left).
template <typename Start>
c10::intrusive_ptr<c10d::Work> start(const std::string& what, Start&& start_work) {
  try {
    return start_work();
  } catch (const std::exception& e) {
    throw std::runtime_error(what + " failed to start: " + e.what());
  }
}

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

std::string ProcessGroupCommunicator::describe(const char* collective) const {
  std::string name = group_->getGroupName();
  const std::string& desc = group_->getGroupDesc();
  if (!desc.empty() && desc != name) name += " (" + desc + ")";
  return std::string("lasp2: ") + collective + " over process group '" + name + "' [backend " +
         group_->getBackendName() + ", rank " + std::to_string(rank()) + " of " +
         std::to_string(size()) + "]";
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
  auto work = start(describe("all_gather"), [&] { return group_->_allgather_base(out, in); });
  return std::make_unique<TorchWork>(std::move(work), std::vector<at::Tensor>{in, out}, describe("all_gather"));
}

std::unique_ptr<CommWork> ProcessGroupCommunicator::send(const void* buffer, std::size_t count,
                                                         ScalarType type, int peer, void*) {
  std::vector<at::Tensor> tensors{wrap(buffer, count, type)};
  const std::string what = describe("send") + " with peer " + std::to_string(peer);
  auto work = start(what, [&] { return group_->send(tensors, peer, tag_); });
  return std::make_unique<TorchWork>(std::move(work), std::move(tensors), what);
}

std::unique_ptr<CommWork> ProcessGroupCommunicator::recv(void* buffer, std::size_t count,
                                                         ScalarType type, int peer, void*) {
  std::vector<at::Tensor> tensors{wrap(buffer, count, type)};
  const std::string what = describe("recv") + " with peer " + std::to_string(peer);
  auto work = start(what, [&] { return group_->recv(tensors, peer, tag_); });
  return std::make_unique<TorchWork>(std::move(work), std::move(tensors), what);
}

}  // namespace lasp2::torch_binding
