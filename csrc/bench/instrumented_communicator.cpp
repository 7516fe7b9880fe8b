#include "instrumented_communicator.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <chrono>

namespace lasp2::bench {
namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

class TimedWork final : public CommWork {
 public:
  TimedWork(std::unique_ptr<CommWork> inner, TimedCommunicator* owner)
      : inner_(std::move(inner)), owner_(owner) {}
  void wait(void* stream) override {
    const int64_t t0 = now_ns();
    inner_->wait(stream);
    owner_->add(now_ns() - t0);
  }

 private:
  std::unique_ptr<CommWork> inner_;
  TimedCommunicator* owner_;
};

}  // namespace

TimedCommunicator::TimedCommunicator(std::shared_ptr<Communicator> inner) : inner_(std::move(inner)) {
  LASP2_CHECK(inner_ != nullptr, "TimedCommunicator needs a communicator to wrap");
}

void TimedCommunicator::reset() {
  nanoseconds_ = 0;
  calls_ = 0;
  bytes_ = 0;
}

template <typename F>
std::unique_ptr<CommWork> TimedCommunicator::timed(std::size_t bytes, F&& call) {
  ++calls_;
  bytes_ += static_cast<int64_t>(bytes);
  const int64_t t0 = now_ns();
  std::unique_ptr<CommWork> work = call();
  add(now_ns() - t0);
  return std::make_unique<TimedWork>(std::move(work), this);
}

std::unique_ptr<CommWork> TimedCommunicator::all_gather(const void* send, void* recv,
                                                        std::size_t count, ScalarType type,
                                                        void* stream) {
  return timed(count * element_size(type),
               [&] { return inner_->all_gather(send, recv, count, type, stream); });
}

std::unique_ptr<CommWork> TimedCommunicator::send(const void* buffer, std::size_t count,
                                                  ScalarType type, int peer, void* stream) {
  return timed(count * element_size(type),
               [&] { return inner_->send(buffer, count, type, peer, stream); });
}

std::unique_ptr<CommWork> TimedCommunicator::recv(void* buffer, std::size_t count,
                                                  ScalarType type, int peer, void* stream) {
  return timed(0, [&] { return inner_->recv(buffer, count, type, peer, stream); });
}

NoopCommunicator::NoopCommunicator(const std::shared_ptr<Communicator>& like)
    : device_(at::kCPU) {
  LASP2_CHECK(like != nullptr, "NoopCommunicator needs a communicator to imitate");
  rank_ = like->rank();
  size_ = like->size();
  if (like->device() == Device::kCUDA) {
    device_ = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getDevice();
  }
}

// The raw bytes as a byte tensor on the communicator's device; copies go on torch's
// current stream, which is the stream the core enqueues on.
at::Tensor NoopCommunicator::bytes_at(const void* data, std::size_t count, ScalarType type) const {
  return at::from_blob(const_cast<void*>(data), {static_cast<int64_t>(count * element_size(type))},
                       at::TensorOptions().dtype(at::kByte).device(device_));
}

std::unique_ptr<CommWork> NoopCommunicator::all_gather(const void* send, void* recv,
                                                       std::size_t count, ScalarType type, void*) {
  const at::Tensor in = bytes_at(send, count, type);
  const at::Tensor out = bytes_at(recv, count * size_, type);
  out.view({size_, in.numel()}).copy_(in.unsqueeze(0).expand({size_, in.numel()}));
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CommWork> NoopCommunicator::send(const void*, std::size_t, ScalarType, int,
                                                 void*) {
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CommWork> NoopCommunicator::recv(void* buffer, std::size_t count, ScalarType type,
                                                 int, void*) {
  bytes_at(buffer, count, type).zero_();
  return std::make_unique<CompletedWork>();
}

}  // namespace lasp2::bench
