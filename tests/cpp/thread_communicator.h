// A Communicator for P threads of one process: lets the core tests run the
// sequence-parallel schedules end to end without any framework or network.
#pragma once

#include <condition_variable>
#include <cstring>
#include <deque>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "lasp2/communicator.h"

namespace lasp2::testing {

class ThreadGroup {
 public:
  explicit ThreadGroup(int size) : size_(size), slots_(size, nullptr), mailboxes_(size * size) {}

  int size() const { return size_; }

  // Everyone publishes a pointer, waits, reads the others', waits again.
  void barrier() {
    std::unique_lock<std::mutex> lock(mu_);
    const int gen = generation_;
    if (++arrived_ == size_) {
      arrived_ = 0;
      ++generation_;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return generation_ != gen; });
    }
  }
  void publish(int rank, const void* send) { slots_[rank] = send; }
  const void* slot(int rank) const { return slots_[rank]; }

  void post(int src, int dst, std::vector<char> message) {
    std::lock_guard<std::mutex> lock(mu_);
    mailboxes_[src * size_ + dst].push_back(std::move(message));
    cv_.notify_all();
  }
  std::vector<char> take(int src, int dst) {
    std::unique_lock<std::mutex> lock(mu_);
    auto& box = mailboxes_[src * size_ + dst];
    cv_.wait(lock, [&] { return !box.empty(); });
    std::vector<char> message = std::move(box.front());
    box.pop_front();
    return message;
  }

 private:
  int size_;
  std::vector<const void*> slots_;
  std::vector<std::deque<std::vector<char>>> mailboxes_;
  std::mutex mu_;
  std::condition_variable cv_;
  int arrived_ = 0;
  int generation_ = 0;
};

class ThreadCommunicator final : public Communicator {
 public:
  ThreadCommunicator(std::shared_ptr<ThreadGroup> group, int rank) : group_(std::move(group)), rank_(rank) {}

  int rank() const override { return rank_; }
  int size() const override { return group_->size(); }
  Device device() const override { return Device::kCPU; }

  std::unique_ptr<CommWork> all_gather(const void* send, void* recv, std::size_t count,
                                       ScalarType type, void*) override {
    ++collectives_;
    const std::size_t bytes = count * element_size(type);
    group_->publish(rank_, send);
    group_->barrier();
    for (int r = 0; r < size(); ++r)
      std::memcpy(static_cast<char*>(recv) + r * bytes, group_->slot(r), bytes);
    group_->barrier();
    return std::make_unique<CompletedWork>();
  }

  // Point-to-point goes through per-(src, dst) mailboxes: send is buffered, recv
  // blocks until the matching message arrives.
  std::unique_ptr<CommWork> send(const void* buffer, std::size_t count, ScalarType type, int peer,
                                 void*) override {
    ++p2p_;
    const auto* bytes = static_cast<const char*>(buffer);
    group_->post(rank_, peer, std::vector<char>(bytes, bytes + count * element_size(type)));
    return std::make_unique<CompletedWork>();
  }
  std::unique_ptr<CommWork> recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                 void*) override {
    ++p2p_;
    std::vector<char> message = group_->take(peer, rank_);
    LASP2_CHECK(message.size() == count * element_size(type), "thread communicator: size mismatch");
    std::memcpy(buffer, message.data(), message.size());
    return std::make_unique<CompletedWork>();
  }

  int collectives() const { return collectives_; }
  int p2p_calls() const { return p2p_; }

 private:
  std::shared_ptr<ThreadGroup> group_;
  int rank_;
  int collectives_ = 0;
  int p2p_ = 0;
};

// Runs fn(rank, comm) on `size` threads, each with a Comm(group, rank), and joins
// them; exceptions are rethrown. Comm defaults to the host-memory communicator.
template <typename Comm = ThreadCommunicator, typename Fn>
void run_ranks(int size, Fn fn) {
  auto group = std::make_shared<ThreadGroup>(size);
  std::vector<std::thread> threads;
  std::vector<std::exception_ptr> errors(size);
  for (int r = 0; r < size; ++r) {
    threads.emplace_back([&, r] {
      Comm comm(group, r);
      try {
        fn(r, comm);
      } catch (...) {
        errors[r] = std::current_exception();
      }
    });
  }
  for (auto& t : threads) t.join();
  for (auto& e : errors)
    if (e) std::rethrow_exception(e);
}

}  // namespace lasp2::testing
