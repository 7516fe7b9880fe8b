#include "lasp2/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

namespace lasp2 {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) fail(std::string("lasp2 NCCL communicator: ") + what + ": " + cudaGetErrorString(err));
}

void check_nccl(ncclResult_t res, const char* what) {
  if (res != ncclSuccess) fail(std::string("lasp2 NCCL communicator: ") + what + ": " + ncclGetErrorString(res));
}

ncclDataType_t to_nccl(ScalarType type) {
  switch (type) {
    case ScalarType::kFloat32:
      return ncclFloat32;
    case ScalarType::kFloat64:
      return ncclFloat64;
    case ScalarType::kFloat16:
      return ncclFloat16;
    case ScalarType::kBFloat16:
      return ncclBfloat16;
  }
  fail("lasp2 NCCL communicator: unknown scalar type");
}

// Restores the caller's current device on scope exit.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceGuard() { cudaSetDevice(previous_); }

 private:
  int previous_ = 0;
};

// The caller's stream waits on this event to see the collective's result.
class EventWork final : public CommWork {
 public:
  EventWork(cudaEvent_t done, int device) : done_(done), device_(device) {}
  ~EventWork() override {
    if (done_) cudaEventDestroy(done_);
  }
  void wait(void* stream) override {
    DeviceGuard guard(device_);
    check_cuda(cudaStreamWaitEvent(static_cast<cudaStream_t>(stream), done_, 0), "cudaStreamWaitEvent");
  }

 private:
  cudaEvent_t done_;
  int device_;
};

cudaEvent_t new_event() {
  cudaEvent_t event;
  check_cuda(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "cudaEventCreate");
  return event;
}

}  // namespace

// Timeouts and peer failures. Collectives run on the communication stream and the
// host never blocks on them, so a peer that exits or stalls would leave the stream
// (and every later sync of the caller) stuck forever. With a timeout set, a
// watchdog thread polls NCCL's asynchronous error state and the completion of each
// collective; on an error, or a collective older than the timeout, it aborts the
// communicator (ncclCommAbort releases the stuck kernels) and records why. The
// next call on this communicator then throws a lasp2::Error naming the collective;
// the communicator stays unusable (make a new one), the process stays alive.
struct Pending {
  cudaEvent_t done;
  std::chrono::steady_clock::time_point deadline;
  std::string what;
};

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;  // communication stream
  cudaEvent_t ready = nullptr;    // inputs ready on the caller's stream
  int device = 0;
  std::chrono::milliseconds timeout{0};  // 0: no watchdog

  std::mutex mu;  // guards everything below, and every use of `comm`
  std::condition_variable wake;
  std::deque<Pending> pending;
  std::string error;  // non-empty once aborted
  bool stop = false;
  std::thread watchdog;

  void throw_if_failed() {
    std::lock_guard<std::mutex> lock(mu);
    if (!error.empty()) fail(error);
  }

  // Called with `mu` held.
  void abort_locked(const std::string& why) {
    if (!error.empty()) return;
    error = why + "; the communicator was aborted (create a new one to continue)";
    if (comm) ncclCommAbort(comm);
    comm = nullptr;
    for (auto& p : pending) cudaEventDestroy(p.done);
    pending.clear();
  }

  void watch() {
    cudaSetDevice(device);
    std::unique_lock<std::mutex> lock(mu);
    while (!stop) {
      wake.wait_for(lock, std::chrono::milliseconds(50));
      if (stop || !error.empty()) continue;
      ncclResult_t async = ncclSuccess;
      if (comm && ncclCommGetAsyncError(comm, &async) == ncclSuccess && async != ncclSuccess &&
          async != ncclInProgress) {
        abort_locked(std::string("lasp2 NCCL communicator: ") +
                     (pending.empty() ? "a collective" : pending.front().what) +
                     " failed: " + ncclGetErrorString(async) + " (a peer exited or failed?)");
        continue;
      }
      while (!pending.empty() && cudaEventQuery(pending.front().done) == cudaSuccess) {
        cudaEventDestroy(pending.front().done);
        pending.pop_front();
      }
      if (!pending.empty() && std::chrono::steady_clock::now() > pending.front().deadline) {
        abort_locked("lasp2 NCCL communicator: " + pending.front().what + " timed out after " +
                     std::to_string(timeout.count()) + " ms (a peer exited, stalled, or skipped the call?)");
      }
    }
  }
};

NcclUniqueIdBytes nccl_unique_id() {
  static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "unexpected ncclUniqueId size");
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  NcclUniqueIdBytes bytes;
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

NcclCommunicator::NcclCommunicator(const NcclUniqueIdBytes& id, int size, int rank, int device,
                                   double timeout_seconds)
    : state_(std::make_unique<State>()), size_(size), rank_(rank), device_(device) {
  LASP2_CHECK(size >= 1 && rank >= 0 && rank < size, "NCCL communicator: rank must lie in [0, size)");
  LASP2_CHECK(timeout_seconds >= 0, "NCCL communicator: the timeout must be >= 0 seconds (0: none)");
  DeviceGuard guard(device_);
  ncclUniqueId nccl_id;
  std::memcpy(&nccl_id, id.data(), sizeof(nccl_id));
  check_nccl(ncclCommInitRank(&state_->comm, size, nccl_id, rank), "ncclCommInitRank");
  check_cuda(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  state_->ready = new_event();
  state_->device = device_;
  state_->timeout = std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000.0));
  if (state_->timeout.count() > 0) state_->watchdog = std::thread([s = state_.get()] { s->watch(); });
}

NcclCommunicator::~NcclCommunicator() {
  DeviceGuard guard(device_);
  if (state_->watchdog.joinable()) {
    {
      std::lock_guard<std::mutex> lock(state_->mu);
      state_->stop = true;
    }
    state_->wake.notify_all();
    state_->watchdog.join();
  }
  bool aborted = false;
  {
    std::lock_guard<std::mutex> lock(state_->mu);
    aborted = !state_->error.empty();
    for (auto& p : state_->pending) cudaEventDestroy(p.done);
    state_->pending.clear();
  }
  if (state_->stream && !aborted) cudaStreamSynchronize(state_->stream);
  if (state_->comm) ncclCommDestroy(state_->comm);
  if (state_->ready) cudaEventDestroy(state_->ready);
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

std::string NcclCommunicator::label(const char* collective) const {
  return std::string(collective) + " [rank " + std::to_string(rank_) + " of " + std::to_string(size_) +
         ", device " + std::to_string(device_) + "]";
}

void NcclCommunicator::abort(const std::string& reason) {
  std::lock_guard<std::mutex> lock(state_->mu);
  state_->abort_locked("lasp2 NCCL communicator: aborted: " + reason);
}

// Runs `launch` on the communication stream after the caller's stream has
// reached this point, and returns the event that marks its completion.
// Throws instead when the communicator was aborted (watchdog or abort()).
template <typename Launch>
std::unique_ptr<CommWork> enqueue(NcclCommunicator::State& s, int device, void* caller_stream,
                                  const std::string& what, Launch&& launch) {
  DeviceGuard guard(device);
  std::lock_guard<std::mutex> lock(s.mu);
  if (!s.error.empty()) fail(s.error);
  auto caller = static_cast<cudaStream_t>(caller_stream);
  check_cuda(cudaEventRecord(s.ready, caller), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(s.stream, s.ready, 0), "cudaStreamWaitEvent");
  launch(s.comm, s.stream);
  cudaEvent_t done = new_event();
  check_cuda(cudaEventRecord(done, s.stream), "cudaEventRecord");
  if (s.timeout.count() > 0) {  // the watchdog's own event: EventWork destroys `done`
    cudaEvent_t watched = new_event();
    check_cuda(cudaEventRecord(watched, s.stream), "cudaEventRecord");
    s.pending.push_back({watched, std::chrono::steady_clock::now() + s.timeout, what});
    s.wake.notify_all();
  }
  return std::make_unique<EventWork>(done, device);
}

std::unique_ptr<CommWork> NcclCommunicator::all_gather(const void* send, void* recv, std::size_t count,
                                                       ScalarType type, void* stream) {
  return enqueue(*state_, device_, stream, label("all_gather"), [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclAllGather(send, recv, count, to_nccl(type), comm, s), "ncclAllGather");
  });
}

std::unique_ptr<CommWork> NcclCommunicator::send(const void* buffer, std::size_t count, ScalarType type,
                                                 int peer, void* stream) {
  return enqueue(*state_, device_, stream, label("send"), [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclSend(buffer, count, to_nccl(type), peer, comm, s), "ncclSend");
  });
}

std::unique_ptr<CommWork> NcclCommunicator::recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                                 void* stream) {
  return enqueue(*state_, device_, stream, label("recv"), [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclRecv(buffer, count, to_nccl(type), peer, comm, s), "ncclRecv");
  });
}

}  // namespace lasp2
