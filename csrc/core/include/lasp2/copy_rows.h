// Rows of equal length gathered into one array: what a LASP-2 forward does with the maps
// of every global part. The backends' default: one copy (or zero fill) a row.
#pragma once

#include <cstdint>
#include <vector>

namespace lasp2 {

// dst[r * count, +count) = rows[r][0, count), zeros where rows[r] is null, with `be`'s own
// copy and fill_zero (KernelBackend and delta::DeltaKernelBackend).
template <typename Backend>
void copy_rows_one_by_one(const Backend& be, float* dst, const std::vector<const float*>& rows, int64_t count,
                          void* stream) {
  for (size_t r = 0; r < rows.size(); ++r) {
    float* out = dst + static_cast<int64_t>(r) * count;
    if (rows[r] != nullptr) be.copy(out, rows[r], count, stream);
    else be.fill_zero(out, count, stream);
  }
}

}  // namespace lasp2
