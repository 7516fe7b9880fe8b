// A token's document: whether one starts at token t of row b, and its index (the
// batch row where the layout has no document ids). Device helpers of the recurrent
// walks (delta_recurrent.cu), the segment composition (delta_compose.cu) and the chunked
// documents' kernels (delta_chunk_docs.cu). Included by .cu files only; internal linkage.
#pragma once

#include <cstdint>

#include "delta_rule/cuda/delta_launch.h"

namespace lasp2::delta::gpu {
namespace {

__device__ __forceinline__ bool starts_doc(const Problem& p, int b, int64_t t) {
  return p.doc_start != nullptr && p.doc_start[b * p.doc_sb + t] != 0;
}
__device__ __forceinline__ int64_t doc_of(const Problem& p, int b, int64_t t) {
  return p.doc_id != nullptr ? p.doc_id[b * p.doc_sb + t] : b;
}

}  // namespace
}  // namespace lasp2::delta::gpu
