#include "instrumented_communicator.h"

#include <chrono>

#include "lasp2/kernel_backend.h"

namespace lasp2::torch_binding {
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

// count elements of `type` as float32 words, for the backend's float copies.
int64_t words(std::size_t count, ScalarType type) {
  const std::size_t bytes = count * element_size(type);
  LASP2_CHECK(bytes % 4 == 0, "NoopCommunicator moves whole 4-byte words only");
  return static_cast<int64_t>(bytes / 4);
}

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

NoopCommunicator::NoopCommunicator(const std::shared_ptr<Communicator>& like) {
  LASP2_CHECK(like != nullptr, "NoopCommunicator needs a communicator to imitate");
  rank_ = like->rank();
  size_ = like->size();
  device_ = like->device();
}

std::unique_ptr<CommWork> NoopCommunicator::all_gather(const void* send, void* recv,
                                                       std::size_t count, ScalarType type,
                                                       void* stream) {
  const KernelBackend& be = backend_for(device_);
  const int64_t n = words(count, type);
  for (int r = 0; r < size_; ++r) {
    be.copy(static_cast<float*>(recv) + r * n, static_cast<const float*>(send), n, stream);
  }
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CommWork> NoopCommunicator::send(const void*, std::size_t, ScalarType, int,
                                                 void*) {
  return std::make_unique<CompletedWork>();
}

std::unique_ptr<CommWork> NoopCommunicator::recv(void* buffer, std::size_t count, ScalarType type,
                                                 int, void* stream) {
  backend_for(device_).fill_zero(static_cast<float*>(buffer), words(count, type), stream);
  return std::make_unique<CompletedWork>();
}

}  // namespace lasp2::torch_binding
