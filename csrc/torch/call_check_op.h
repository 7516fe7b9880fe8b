// "NaN at the call" for an op that runs outside the C++ schedules (provider "ulysses",
// whose collectives are Python all-to-alls): it takes the words the call's cross-rank
// check armed (lasp2/call_check.h), gathers them over its group with its own collectives,
// and hands the gathered words here, where the same compare rule and poison kernel as
// LASP-2's run on the outputs' device (no host sync).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/utils/pybind.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace lasp2::torch_binding {

// The armed check, disarmed: (a copy of its words, int64 [count] on `like`'s device,
// enqueued on the current stream; the bit mask of its maximum words), or none.
std::optional<std::pair<at::Tensor, int64_t>> take_call_check_words(const at::Tensor& like);

// `gathered`: every rank's words, int64 [world, count], on the targets' device. Fills each
// target ([B, T, H, D] of a float type, last dimension contiguous) with NaN when the
// words fail (consistency_values.h, words_fail); writes nothing otherwise.
void poison_on_failed_words(const at::Tensor& gathered, int64_t max_mask, const std::vector<at::Tensor>& targets);

void register_call_check(pybind11::module_& m);

}  // namespace lasp2::torch_binding
