#include "group_check.h"

#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/utils/pybind.h>

#include <cstring>
#include <stdexcept>
#include <string>

#include "lasp2/types.h"

#ifdef LASP2_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#endif

// _allgather_base is marked deprecated in newer torch in favour of a name older
// releases lack; it remains the portable spelling (as in process_group_communicator.cpp).
#pragma GCC diagnostic ignored "-Wdeprecated-declarations"

namespace lasp2::torch_binding {

namespace {

at::TensorOptions int64_on(at::Device device) { return at::TensorOptions().dtype(at::kLong).device(device); }

at::Tensor host_buffer(int64_t n, at::Device device) {
  // pinned for a CUDA group: its copies to and from the device are then truly asynchronous
  return at::empty({n}, at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
}

}  // namespace

GroupCheck::GroupCheck(c10::intrusive_ptr<c10d::ProcessGroup> group, at::Device device, int64_t row,
                       int64_t lagged)
    : group_(std::move(group)), device_(device), row_(row), lagged_(lagged) {
  LASP2_CHECK(group_, "GroupCheck needs a process group");
  LASP2_CHECK(row_ >= 1 && lagged_ >= 0 && lagged_ < row_, "GroupCheck: bad row / lagged sizes");
  LASP2_CHECK(device_.is_cpu() || device_.is_cuda(), "GroupCheck: a CPU or CUDA device");
  world_ = group_->getSize();
  rank_ = group_->getRank();
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (device_.is_cuda()) {
    guard.emplace(device_);
    side_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/false, device_.index());
  }
#else
  LASP2_CHECK(!device_.is_cuda(), "GroupCheck: this lasp2 build has no CUDA support");
#endif
  host_row_ = host_buffer(row_, device_);
  host_row_.zero_();
  mine_ = at::zeros({row_}, int64_on(device_));
  gathered_ = at::empty({world_ * row_}, int64_on(device_));
  host_table_ = device_.is_cuda() ? host_buffer(world_ * row_, device_) : gathered_;
}

at::Tensor GroupCheck::digest(const at::Tensor& t) {
  // position-sensitive wrap-around int64 arithmetic over the exact float64 bits
  at::Tensor bits = t.detach().reshape(-1).to(at::kDouble).contiguous().view(at::kLong);
  const int64_t n = bits.numel();
  if (!weights_.defined() || weights_.numel() != n) {
    weights_ = at::bitwise_or(at::arange(n, int64_on(at::kCPU)) * 2654435761LL + 40503, 1).to(device_);
  }
  return at::bitwise_xor(bits, at::bitwise_right_shift(bits, 29)).mul_(weights_);
}

void GroupCheck::stage(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds) {
  LASP2_CHECK(values.size() == kinds.size() && static_cast<int64_t>(values.size()) <= lagged_,
              "GroupCheck.stage: at most `lagged` values, one kind each");
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (device_.is_cuda()) guard.emplace(device_);
#endif
  const int64_t first = row_ - lagged_;
  for (size_t i = 0; i < values.size(); ++i) {
    if (!values[i] || values[i]->numel() == 0) continue;  // the slot stays 0
    const at::Tensor& t = *values[i];
    LASP2_CHECK(t.device() == device_, "GroupCheck.stage: a value on " + t.device().str() + ", the check runs on " +
                                           device_.str());
    at::Tensor slot = mine_.narrow(0, first + static_cast<int64_t>(i), 1);
    if (kinds[i] == kDigest) {
      at::sum_out(slot, digest(t), at::IntArrayRef{0}, /*keepdim=*/true);
    } else {
      const at::Tensor x = t.scalar_type() == at::kBool ? t.detach().to(at::kFloat) : t.detach();
      slot.view(at::kDouble).copy_(at::amax(x).reshape({1}));
    }
  }
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) staged_event_.record(c10::cuda::getCurrentCUDAStream(device_.index()));
#endif
  staged_ = true;
}

int64_t GroupCheck::exchange(const std::vector<int64_t>& head, const std::vector<int64_t>& max_slots) {
  const int64_t first = row_ - lagged_;
  LASP2_CHECK(static_cast<int64_t>(head.size()) <= first, "GroupCheck.exchange: the row's head is too long");
  // the previous exchange waited for its copies, so the host row is free to rewrite
  int64_t* row = device_.is_cuda() ? host_row_.data_ptr<int64_t>() : mine_.data_ptr<int64_t>();
  std::memcpy(row, head.data(), head.size() * sizeof(int64_t));
  std::memset(row + head.size(), 0, (first - head.size()) * sizeof(int64_t));

#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  std::optional<c10::cuda::CUDAStreamGuard> on_side;
  if (device_.is_cuda()) {
    guard.emplace(device_);
    on_side.emplace(*side_);
    if (staged_) staged_event_.block(*side_);  // the previous call's device values, nothing later
    mine_.narrow(0, 0, first).copy_(host_row_.narrow(0, 0, first), /*non_blocking=*/true);
  }
#endif
  try {
    group_->_allgather_base(gathered_, mine_)->wait();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("all_gather of the consistency rows failed: ") + e.what());
  }
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) {
    host_table_.copy_(gathered_, /*non_blocking=*/true);
    if (lagged_) mine_.narrow(0, first, lagged_).zero_();
    side_->synchronize();  // the check's own stream: the op's queue is not drained
  }
#endif
  if (!device_.is_cuda() && lagged_) mine_.narrow(0, first, lagged_).zero_();
  staged_ = false;

  // a max slot differs between ranks (their own tensors): only its sign is compared
  std::vector<bool> is_max(row_, false);
  for (int64_t slot : max_slots) {
    LASP2_CHECK(slot >= first && slot < row_, "GroupCheck.exchange: a max slot outside the lagged slots");
    is_max[slot] = true;
  }
  const int64_t* table = host_table_.data_ptr<int64_t>();
  for (int64_t col = 0; col < row_; ++col) {
    if (is_max[col]) continue;
    for (int64_t r = 1; r < world_; ++r) {
      if (table[r * row_ + col] != table[col]) return col;
    }
  }
  for (int64_t slot : max_slots) {
    for (int64_t r = 0; r < world_; ++r) {
      double value;
      std::memcpy(&value, table + r * row_ + slot, sizeof(double));
      if (value > 0) return slot;
    }
  }
  return -1;
}

void GroupCheck::discard() {
  if (!staged_ || lagged_ == 0) return;
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (device_.is_cuda()) guard.emplace(device_);
#endif
  mine_.narrow(0, row_ - lagged_, lagged_).zero_();
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) staged_event_.record(c10::cuda::getCurrentCUDAStream(device_.index()));
#endif
}

at::Tensor GroupCheck::table() const { return host_table_.view({world_, row_}).clone(); }

void register_group_check(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<GroupCheck, std::shared_ptr<GroupCheck>>(
      m, "GroupCheck", "the per-call cross-rank consistency check of one (group, device) (group_check.h)")
      .def(py::init<c10::intrusive_ptr<c10d::ProcessGroup>, at::Device, int64_t, int64_t>(), py::arg("group"),
           py::arg("device"), py::arg("row"), py::arg("lagged"))
      .def("stage", &GroupCheck::stage, py::arg("values"), py::arg("kinds"))
      .def("exchange", &GroupCheck::exchange, py::arg("head"), py::arg("max_slots"),
           py::call_guard<py::gil_scoped_release>(),
           "-> -1 when every rank sent the same row and no max slot is positive, else the first such column")
      .def("discard", &GroupCheck::discard)
      .def("table", &GroupCheck::table)
      .def_property_readonly("world", &GroupCheck::world)
      .def_property_readonly("rank", &GroupCheck::rank);
}

}  // namespace lasp2::torch_binding
