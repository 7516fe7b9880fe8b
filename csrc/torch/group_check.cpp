#include "group_check.h"

#include <torch/csrc/distributed/c10d/Work.hpp>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>

#include "consistency_values.h"
#include "lasp2/call_check.h"
#include "lasp2/types.h"

#ifdef LASP2_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "cuda/consistency_kernels.h"
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
    LASP2_CHECK(row_ <= lasp2::cuda::kMaxCheckRow && row_ / std::max<int64_t>(lagged_, 1) <= lasp2::cuda::kMaxCheckSends,
                "GroupCheck: a CUDA row holds at most 64 slots and 16 sent entries");
    scratch_ = at::zeros({depth_, lasp2::cuda::kStageScratch}, int64_on(device_));
  }
#else
  LASP2_CHECK(!device_.is_cuda(), "GroupCheck: this lasp2 build has no CUDA support");
#endif
  ring_ = at::zeros({depth_, std::max<int64_t>(lagged_, 1)}, int64_on(device_));
  mine_ = at::zeros({row_}, int64_on(device_));
  gathered_ = at::empty({world_ * row_}, int64_on(device_));
  host_table_ = device_.is_cuda() ? host_buffer(world_ * row_, device_) : gathered_;
}

int64_t GroupCheck::entry_of(int64_t seq) const {
  const int64_t entry = seq % depth_;
  LASP2_CHECK(seq >= 0 && entry_seq_[entry] == seq,
              "GroupCheck.exchange: entry " + std::to_string(seq) + " is not staged (sent or dropped already)");
  return entry;
}

void GroupCheck::stage_on_cpu(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds,
                              int64_t* slots) const {
  std::fill(slots, slots + lagged_, 0);
  for (size_t i = 0; i < values.size(); ++i) {
    if (!values[i] || values[i]->numel() == 0) continue;  // the slot stays 0
    const at::Tensor x = values[i]->detach().to(at::kDouble).contiguous();  // no copy when it is one already
    const double* data = x.data_ptr<double>();
    const int64_t n = x.numel();
    if (kinds[i] == kDigest) {
      uint64_t sum = 0;
      for (int64_t j = 0; j < n; ++j) sum += consistency::digest_term(data[j], j);
      slots[i] = static_cast<int64_t>(sum);
    } else {
      double most = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < n; ++j) most = consistency::max_step(most, data[j]);
      slots[i] = consistency::double_bits(most);
    }
  }
}

#ifdef LASP2_WITH_CUDA
void GroupCheck::stage_on_cuda(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds,
                               int64_t entry) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
  int64_t* out = ring_.data_ptr<int64_t>() + entry * ring_.size(1);
  if (values.empty()) {
    C10_CUDA_CHECK(cudaMemsetAsync(out, 0, lagged_ * sizeof(int64_t), stream));
    return;
  }
  lasp2::cuda::StageArgs args;
  args.count = static_cast<int>(values.size());
  args.slots = static_cast<int>(lagged_);
  args.out = out;
  args.scratch = scratch_.data_ptr<int64_t>() + entry * scratch_.size(1);
  std::vector<at::Tensor> held;  // converted copies, alive until the launch is queued
  held.reserve(values.size());
  for (size_t i = 0; i < values.size(); ++i) {
    lasp2::cuda::StagedValue& v = args.v[i];
    v.kind = static_cast<int>(kinds[i]);
    if (!values[i] || values[i]->numel() == 0) continue;  // n = 0: the slot is 0
    at::Tensor t = values[i]->detach();
    switch (t.scalar_type()) {
      case at::kFloat: v.elem = static_cast<int>(lasp2::cuda::StagedElem::kF32); break;
      case at::kDouble: v.elem = static_cast<int>(lasp2::cuda::StagedElem::kF64); break;
      case at::kHalf: v.elem = static_cast<int>(lasp2::cuda::StagedElem::kF16); break;
      case at::kBFloat16: v.elem = static_cast<int>(lasp2::cuda::StagedElem::kBF16); break;
      case at::kBool: v.elem = static_cast<int>(lasp2::cuda::StagedElem::kBool); break;
      default:  // any other dtype: as float64, the definition's own type
        t = t.to(at::kDouble);
        v.elem = static_cast<int>(lasp2::cuda::StagedElem::kF64);
    }
    held.push_back(t.contiguous());  // no copy when it is contiguous already
    v.ptr = held.back().data_ptr();
    v.n = held.back().numel();
  }
  lasp2::cuda::launch_stage_values(args, stream);
}

void GroupCheck::send_on_cuda(const std::vector<int64_t>& head, const std::vector<int64_t>& entries, int64_t first) {
  lasp2::cuda::RowArgs args;
  std::copy(head.begin(), head.end(), args.head);
  std::fill(args.head + head.size(), args.head + first, 0);
  std::copy(entries.begin(), entries.end(), args.entries);
  args.row = static_cast<int>(row_);
  args.first = static_cast<int>(first);
  args.lagged = static_cast<int>(lagged_);
  args.sends = static_cast<int>(entries.size());
  args.ring = ring_.data_ptr<int64_t>();
  args.ring_stride = ring_.size(1);
  args.mine = mine_.data_ptr<int64_t>();
  lasp2::cuda::launch_write_row(args, side_->stream());
}
#endif

void GroupCheck::check_values(const std::vector<std::optional<at::Tensor>>& values,
                              const std::vector<int64_t>& kinds) const {
  LASP2_CHECK(values.size() == kinds.size() && static_cast<int64_t>(values.size()) <= lagged_,
              "GroupCheck.stage: at most `lagged` values, one kind each");
#ifdef LASP2_WITH_CUDA
  LASP2_CHECK(!device_.is_cuda() || values.size() <= static_cast<size_t>(lasp2::cuda::kMaxStagedValues),
              "GroupCheck.stage: at most 8 values");
#endif
  for (size_t i = 0; i < values.size(); ++i) {
    LASP2_CHECK(kinds[i] == kDigest || kinds[i] == kMax, "GroupCheck.stage: a kind is 0 (digest) or 1 (max)");
    LASP2_CHECK(!values[i] || values[i]->device() == device_, "GroupCheck.stage: a value on " +
                                                                  values[i]->device().str() + ", the check runs on " +
                                                                  device_.str());
  }
}

int64_t GroupCheck::stage(const std::vector<std::optional<at::Tensor>>& values, const std::vector<int64_t>& kinds) {
  check_values(values, kinds);
  const int64_t seq = next_seq_;
  const int64_t entry = seq % depth_;
  LASP2_CHECK(entry_seq_[entry] < 0, "GroupCheck.stage: all " + std::to_string(depth_) +
                                         " ring entries wait to be sent; send the oldest first");
  // the entry's previous values were sent by an exchange whose stream the host waited for
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) {
    c10::cuda::CUDAGuard guard(device_);
    // an entry dropped unsent (discard) may still have its stage kernel running, maybe on
    // another stream: the new one must not share the entry's scratch counter with it
    events_[entry].block(c10::cuda::getCurrentCUDAStream(device_.index()));
    stage_on_cuda(values, kinds, entry);
    events_[entry].record(c10::cuda::getCurrentCUDAStream(device_.index()));
  }
#endif
  if (device_.is_cpu()) stage_on_cpu(values, kinds, ring_.data_ptr<int64_t>() + entry * ring_.size(1));
  entry_seq_[entry] = seq;
  ++next_seq_;
  return seq;
}

int64_t GroupCheck::exchange(const std::vector<int64_t>& head, const std::vector<int64_t>& sends,
                             const std::vector<int64_t>& max_slots) {
  disarm_call_check();  // a new call on a group: what an earlier one armed is not this call's
  const int64_t n = static_cast<int64_t>(sends.size());
  const int64_t first = row_ - lagged_ * n;  // where the sent entries start
  LASP2_CHECK(static_cast<int64_t>(head.size()) <= first, "GroupCheck.exchange: the row's head is too long");
  std::vector<int64_t> entries;
  for (int64_t seq : sends) entries.push_back(entry_of(seq));
  // a max slot differs between ranks (their own tensors): only its sign is compared
  std::vector<bool> is_max(row_, false);
  for (int64_t slot : max_slots) {
    LASP2_CHECK(slot >= first && slot < row_, "GroupCheck.exchange: a max slot outside the sent entries");
    is_max[slot] = true;
  }

#ifdef LASP2_WITH_CUDA
  std::optional<c10::cuda::CUDAGuard> guard;
  std::optional<c10::cuda::CUDAStreamGuard> on_side;
  if (device_.is_cuda()) {
    guard.emplace(device_);
    on_side.emplace(*side_);
    for (int64_t entry : entries) events_[entry].block(*side_);  // those calls' values, nothing queued later
    send_on_cuda(head, entries, first);
  }
#endif
  if (device_.is_cpu()) {  // the previous exchange's collective finished: the row is free to rewrite
    int64_t* row = mine_.data_ptr<int64_t>();
    std::copy(head.begin(), head.end(), row);
    std::fill(row + head.size(), row + first, 0);
    for (int64_t i = 0; i < n; ++i) {
      const int64_t* staged = ring_.data_ptr<int64_t>() + entries[i] * ring_.size(1);
      std::copy(staged, staged + lagged_, row + first + i * lagged_);
    }
  }
  try {
    group_->_allgather_base(gathered_, mine_)->wait();
  } catch (const std::exception& e) {
#ifdef LASP2_WITH_CUDA
    // the side stream may still run this exchange's row kernel (reading ring entries the
    // caller is about to drop and restage): let it finish, so a failed exchange, like a
    // good one, leaves nothing of its own queued
    if (device_.is_cuda()) {
      try {
        side_->synchronize();
      } catch (const std::exception&) {  // the collective's own error is the one to report
      }
    }
#endif
    throw std::runtime_error(std::string("all_gather of the consistency rows failed: ") + e.what());
  }
#ifdef LASP2_WITH_CUDA
  if (device_.is_cuda()) {
    C10_CUDA_CHECK(cudaMemcpyAsync(host_table_.data_ptr<int64_t>(), gathered_.data_ptr<int64_t>(),
                                   world_ * row_ * sizeof(int64_t), cudaMemcpyDeviceToHost, side_->stream()));
    side_->synchronize();  // the check's own stream: the op's queue is not drained
  }
#endif
  for (size_t i = 0; i < entries.size(); ++i) entry_seq_[entries[i]] = -1;

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

std::pair<int64_t, int64_t> GroupCheck::exchange_then_stage(const std::vector<int64_t>& head,
                                                            const std::vector<int64_t>& sends,
                                                            const std::vector<int64_t>& max_slots,
                                                            const std::vector<std::optional<at::Tensor>>& values,
                                                            const std::vector<int64_t>& kinds) {
  // a rank's own bad values must fail before the collective, not after it (where only
  // that rank would raise and its peers would go on into the op's collectives)
  check_values(values, kinds);
  const int64_t col = exchange(head, sends, max_slots);
  const bool any = std::any_of(values.begin(), values.end(), [](const auto& v) { return v.has_value(); });
  if (col >= 0 || !any) return {col, -1};
  const int64_t seq = stage(values, kinds);
  // the op that follows on this thread folds the staged words into its own AllGather and
  // poisons its outputs on every rank if they fail (lasp2/call_check.h): compared DEPTH
  // calls later by this check, but never returned unpoisoned in between
  if (static_cast<int64_t>(values.size()) <= kCallCheckWords) {
    CallCheck check;
    check.words = ring_.data_ptr<int64_t>() + entry_of(seq) * ring_.size(1);
    check.count = static_cast<int>(std::min<int64_t>(lagged_, kCallCheckWords));
    for (size_t i = 0; i < kinds.size(); ++i)
      if (kinds[i] == kMax) check.max_mask |= 1u << i;
    check.device = device_.is_cuda() ? lasp2::Device::kCUDA : lasp2::Device::kCPU;
    arm_call_check(check);
  }
  return {col, seq};
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
      .def("exchange_then_stage", &GroupCheck::exchange_then_stage, py::arg("head"), py::arg("sends"),
           py::arg("max_slots"), py::arg("values"), py::arg("kinds"), py::call_guard<py::gil_scoped_release>(),
           "-> (exchange's result, the staged entry's sequence number or -1)")
      .def("discard", &GroupCheck::discard)
      .def_static("disarm_call_check", &disarm_call_check,
                  "forgets the device values a call armed for the next LASP-2 forward (lasp2/call_check.h)")
      .def("table", &GroupCheck::table)
      .def_property_readonly("world", &GroupCheck::world)
      .def_property_readonly("rank", &GroupCheck::rank)
      .def_property_readonly("depth", &GroupCheck::depth);
}

}  // namespace lasp2::torch_binding
