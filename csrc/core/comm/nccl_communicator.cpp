#include "lasp2/nccl_communicator.h"

#include <cuda_runtime.h>
#include <nccl.h>

#include <cstring>
#include <string>

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

struct NcclCommunicator::State {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;  // communication stream
  cudaEvent_t ready = nullptr;    // inputs ready on the caller's stream
};

NcclUniqueIdBytes nccl_unique_id() {
  static_assert(sizeof(ncclUniqueId) == kNcclUniqueIdBytes, "unexpected ncclUniqueId size");
  ncclUniqueId id;
  check_nccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  NcclUniqueIdBytes bytes;
  std::memcpy(bytes.data(), &id, sizeof(id));
  return bytes;
}

NcclCommunicator::NcclCommunicator(const NcclUniqueIdBytes& id, int size, int rank, int device)
    : state_(std::make_unique<State>()), size_(size), rank_(rank), device_(device) {
  LASP2_CHECK(size >= 1 && rank >= 0 && rank < size, "NCCL communicator: rank must lie in [0, size)");
  DeviceGuard guard(device_);
  ncclUniqueId nccl_id;
  std::memcpy(&nccl_id, id.data(), sizeof(nccl_id));
  check_nccl(ncclCommInitRank(&state_->comm, size, nccl_id, rank), "ncclCommInitRank");
  check_cuda(cudaStreamCreateWithFlags(&state_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
  state_->ready = new_event();
}

NcclCommunicator::~NcclCommunicator() {
  DeviceGuard guard(device_);
  if (state_->stream) cudaStreamSynchronize(state_->stream);
  if (state_->comm) ncclCommDestroy(state_->comm);
  if (state_->ready) cudaEventDestroy(state_->ready);
  if (state_->stream) cudaStreamDestroy(state_->stream);
}

// Runs `launch` on the communication stream after the caller's stream has
// reached this point, and returns the event that marks its completion.
template <typename Launch>
std::unique_ptr<CommWork> enqueue(NcclCommunicator::State& s, int device, void* caller_stream, Launch&& launch) {
  DeviceGuard guard(device);
  auto caller = static_cast<cudaStream_t>(caller_stream);
  check_cuda(cudaEventRecord(s.ready, caller), "cudaEventRecord");
  check_cuda(cudaStreamWaitEvent(s.stream, s.ready, 0), "cudaStreamWaitEvent");
  launch(s.comm, s.stream);
  cudaEvent_t done = new_event();
  check_cuda(cudaEventRecord(done, s.stream), "cudaEventRecord");
  return std::make_unique<EventWork>(done, device);
}

std::unique_ptr<CommWork> NcclCommunicator::all_gather(const void* send, void* recv, std::size_t count,
                                                       ScalarType type, void* stream) {
  return enqueue(*state_, device_, stream, [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclAllGather(send, recv, count, to_nccl(type), comm, s), "ncclAllGather");
  });
}

std::unique_ptr<CommWork> NcclCommunicator::send(const void* buffer, std::size_t count, ScalarType type,
                                                 int peer, void* stream) {
  return enqueue(*state_, device_, stream, [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclSend(buffer, count, to_nccl(type), peer, comm, s), "ncclSend");
  });
}

std::unique_ptr<CommWork> NcclCommunicator::recv(void* buffer, std::size_t count, ScalarType type, int peer,
                                                 void* stream) {
  return enqueue(*state_, device_, stream, [&](ncclComm_t comm, cudaStream_t s) {
    check_nccl(ncclRecv(buffer, count, to_nccl(type), peer, comm, s), "ncclRecv");
  });
}

}  // namespace lasp2
