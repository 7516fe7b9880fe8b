// What a PartFamily takes from its kernel backend unchanged: the device its buffers live
// on and the copy, fill_zero, copy_rows and add on them. ScalarDecay (on a KernelBackend) and
// DeltaFamily (on a DeltaKernelBackend) derive from it; Backend is any type with
// device(), copy, fill_zero, copy_rows and add of PartFamily's signatures.
#pragma once

#include <cstdint>
#include <vector>

#include "lasp2/part_family.h"

namespace lasp2 {

template <typename Backend>
class BackendFamily : public PartFamily {
 public:
  Device device() const override { return be_.device(); }
  void copy(float* dst, const float* src, int64_t count, void* stream) const override {
    be_.copy(dst, src, count, stream);
  }
  void fill_zero(float* dst, int64_t count, void* stream) const override {
    be_.fill_zero(dst, count, stream);
  }
  void copy_rows(float* dst, const std::vector<const float*>& rows, int64_t count, void* stream) const override {
    be_.copy_rows(dst, rows, count, stream);
  }
  void add(float* dst, const float* src, int64_t count, void* stream) const override {
    be_.add(dst, src, count, stream);
  }

 protected:
  explicit BackendFamily(const Backend& backend) : be_(backend) {}

  const Backend& be_;
};

}  // namespace lasp2
