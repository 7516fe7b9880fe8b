// Launchers of the per-call consistency check's two small kernels (csrc/torch/group_check.h):
// one fused kernel computing all of a call's device values into a ring entry (it replaces
// 1 + 2 per gate flag + 5 per decay digest small torch kernels), and one writing the row
// that is sent (the host's head passed by value, the sent ring entries appended) in place
// of a host-to-device copy plus one copy per sent entry. Plain structs, so group_check.cpp
// compiles with the host compiler.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace lasp2::cuda {

constexpr int kMaxStagedValues = 8;  // values per ring entry (the Python side sends at most LAGGED = 4)
constexpr int kStageBlocks = 32;     // the most thread blocks per value
// int64 words of one ring entry's scratch: partial results per (value, block), then a counter
constexpr int kStageScratch = kMaxStagedValues * kStageBlocks + 1;

enum class StagedElem : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kBool = 4 };

struct StagedValue {
  const void* ptr = nullptr;  // contiguous
  int64_t n = 0;              // 0: absent (the slot is 0)
  int elem = 0;               // StagedElem
  int kind = 0;               // lasp2::consistency::Kind
};

struct StageArgs {
  StagedValue v[kMaxStagedValues];
  int count = 0;              // values given
  int slots = 0;              // slots of the entry written (>= count; the rest get 0)
  int64_t* out = nullptr;     // the ring entry: slots int64
  int64_t* scratch = nullptr;  // kStageScratch int64, zero before the first launch (the kernel leaves it so)
};

// Writes the entry's slots (lasp2/consistency_values.h) on `stream`, one launch.
void launch_stage_values(const StageArgs& a, cudaStream_t stream);

constexpr int kMaxCheckRow = 64;
constexpr int kMaxCheckSends = 16;

struct RowArgs {
  int64_t head[kMaxCheckRow];  // slots [0, first): the head, zero-padded
  int entries[kMaxCheckSends];  // ring entries sent, in order
  int row = 0, first = 0, lagged = 0, sends = 0;
  const int64_t* ring = nullptr;  // [depth, ring_stride]
  int64_t ring_stride = 0;
  int64_t* mine = nullptr;  // the row sent: row int64
};

// mine = head[0, first) ++ ring[entries[0]][0, lagged) ++ ... on `stream`, one launch.
void launch_write_row(const RowArgs& a, cudaStream_t stream);

}  // namespace lasp2::cuda
