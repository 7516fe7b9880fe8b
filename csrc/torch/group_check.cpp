#include "group_check.h"

#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
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
                       int64_t lagged, int64_t depth)
    : group_(std::move(group)), device_(device), row_(row), lagged_(lagged), depth_(depth) {
  LASP2_CHECK(group_, "GroupCheck needs a process group");
  LASP2_CHECK(row_ >= 1 && lagged_ >= 0 && lagged_ < row_ && depth_ >= 1, "GroupCheck: bad row / lagged / depth");
  LASP2_CHECK(device_.is_cpu() || device_.is_cuda(), "GroupCheck: a CPU or CUDA device");
  world_ = group_->getSize();
  rank_ = group_->getRank();
  entry_seq_.assign(depth_, -1);
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (device_.is_cuda()) {
    guard.emplace(device_);
    // high priority: its few tiny kernels and copies are scheduled ahead of the op's queued
    // blocks, so the host's wait for the table is the round trip, not the op's kernel
    side_ = c10::cuda::getStreamFromPool(/*isHighPriority=*/true, device_.index());
    events_ = std::vector<at::cuda::CUDAEvent>(depth_);
  }
#else
  LASP2_CHECK(!device_.is_cuda(), "GroupCheck: this lasp2 build has no CUDA support");
#endif
  ring_ = at::zeros({depth_, std::max<int64_t>(lagged_, 1)}, int64_on(device_));
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

int64_t GroupCheck::entry_of(int64_t seq) const {
  const int64_t entry = seq % depth_;
  LASP2_CHECK(seq >= 0 && entry_seq_[entry] == seq,
              "GroupCheck.exchange: entry " + std::to_string(seq) + " is not staged (sent or dropped already)");
  return entry;
}

int64_t GroupCheck::stage(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds) {
  LASP2_CHECK(values.size() == kinds.size() && static_cast<int64_t>(values.size()) <= lagged_,
              "GroupCheck.stage: at most `lagged` values, one kind each");
  const int64_t seq = next_seq_;
  const int64_t entry = seq % depth_;
  LASP2_CHECK(entry_seq_[entry] < 0, "GroupCheck.stage: all " + std::to_string(depth_) +
                                         " ring entries wait to be sent; send the oldest first");
#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  if (device_.is_cuda()) guard.emplace(device_);
#endif
  // the entry's previous values were sent by an exchange whose stream the host waited for
  at::Tensor slots = ring_[entry];
  slots.zero_();
  for (size_t i = 0; i < values.size(); ++i) {
    if (!values[i] || values[i]->numel() == 0) continue;  // the slot stays 0
    const at::Tensor& t = *values[i];
    LASP2_CHECK(t.device() == device_, "GroupCheck.stage: a value on " + t.device().str() + ", the check runs on " +
                                           device_.str());
    at::Tensor slot = slots.narrow(0, static_cast<int64_t>(i), 1);
    if (kinds[i] == kDigest) {
      at::sum_out(slot, digest(t), at::IntArrayRef{0}, /*keepdim=*/true);
    } else {
      const at::Tensor x = t.scalar_type() == at::kBool ? t.detach().to(at::kFloat) : t.detach();
      slot.view(at::kDouble).copy_(at::amax(x).reshape({1}));
    }
  }
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) events_[entry].record(c10::cuda::getCurrentCUDAStream(device_.index()));
#endif
  entry_seq_[entry] = seq;
  ++next_seq_;
  return seq;
}

int64_t GroupCheck::exchange(const std::vector<int64_t>& head, const std::vector<int64_t>& sends,
                             const std::vector<int64_t>& max_slots) {
  const int64_t n = static_cast<int64_t>(sends.size());
  const int64_t first = row_ - lagged_ * n;  // where the sent entries start
  LASP2_CHECK(static_cast<int64_t>(head.size()) <= first, "GroupCheck.exchange: the row's head is too long");
  std::vector<int64_t> entries;
  for (int64_t seq : sends) entries.push_back(entry_of(seq));
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
    for (int64_t entry : entries) events_[entry].block(*side_);  // those calls' values, nothing queued later
    mine_.narrow(0, 0, first).copy_(host_row_.narrow(0, 0, first), /*non_blocking=*/true);
  }
#endif
  for (int64_t i = 0; i < n; ++i) {
    mine_.narrow(0, first + i * lagged_, lagged_).copy_(ring_[entries[i]].narrow(0, 0, lagged_));
  }
  try {
    group_->_allgather_base(gathered_, mine_)->wait();
  } catch (const std::exception& e) {
    throw std::runtime_error(std::string("all_gather of the consistency rows failed: ") + e.what());
  }
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) {
    host_table_.copy_(gathered_, /*non_blocking=*/true);
    side_->synchronize();  // the check's own stream: the op's queue is not drained
  }
#endif
  for (size_t i = 0; i < entries.size(); ++i) entry_seq_[entries[i]] = -1;

  // a max slot differs between ranks (their own tensors): only its sign is compared
  std::vector<bool> is_max(row_, false);
  for (int64_t slot : max_slots) {
    LASP2_CHECK(slot >= first && slot < row_, "GroupCheck.exchange: a max slot outside the sent entries");
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

void GroupCheck::discard() { entry_seq_.assign(depth_, -1); }

at::Tensor GroupCheck::table() const { return host_table_.view({world_, row_}).clone(); }

void register_group_check(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<GroupCheck, std::shared_ptr<GroupCheck>>(
      m, "GroupCheck", "the per-call cross-rank consistency check of one (group, device) (group_check.h)")
      .def(py::init<c10::intrusive_ptr<c10d::ProcessGroup>, at::Device, int64_t, int64_t, int64_t>(),
           py::arg("group"), py::arg("device"), py::arg("row"), py::arg("lagged"), py::arg("depth"))
      .def("stage", &GroupCheck::stage, py::arg("values"), py::arg("kinds"),
           "-> the staged entry's sequence number")
      .def("exchange", &GroupCheck::exchange, py::arg("head"), py::arg("sends"), py::arg("max_slots"),
           py::call_guard<py::gil_scoped_release>(),
           "-> -1 when every rank sent the same row and no max slot is positive, else the first such column")
      .def("discard", &GroupCheck::discard)
      .def("table", &GroupCheck::table)
      .def_property_readonly("world", &GroupCheck::world)
      .def_property_readonly("rank", &GroupCheck::rank)
      .def_property_readonly("depth", &GroupCheck::depth);
}

}  // namespace lasp2::torch_binding
