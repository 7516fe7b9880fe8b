// pdl.h: when launch_kernel (pdl.cuh) sets the PDL attribute, and its launch check.
#include <atomic>
#include <map>
#include <mutex>
#include <string>
#include <utility>

#include "env_knob.h"
#include "lasp2/types.h"
#include "launch.h"
#include "pdl.h"
#include "route.h"

namespace lasp2::cuda {

namespace {

// The kernel's code on the current device was compiled from PTX of sm_90+ (__CUDA_ARCH__ >=
// 900: the code with the griddepcontrol instructions). ptxVersion, not binaryVersion: a newer
// device JIT-compiling the compute_80 PTX reports its own binaryVersion, but that code has no
// wait. cudaFuncGetAttributes once per kernel and device (host time at every launch otherwise).
bool built_for_sm90(const void* kernel) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, bool> known;
  const std::lock_guard<std::mutex> lock(mu);
  const auto it = known.find({kernel, dev});
  if (it != known.end()) return it->second;
  cudaFuncAttributes fa{};
  const cudaError_t e = cudaFuncGetAttributes(&fa, kernel);
  if (e != cudaSuccess) (void)cudaGetLastError();  // no attribute then; the launch reports a real fault
  const bool ok = e == cudaSuccess && fa.ptxVersion >= 90;
  known.emplace(std::make_pair(kernel, dev), ok);
  return ok;
}

std::atomic<int64_t> attributed{0};

}  // namespace

bool pdl_launch_attribute(const void* kernel) {
  if (!env_flag("LASP2_CUDA_PDL", false)) return false;
  if (device_info().cc_major < 9 || !built_for_sm90(kernel)) return false;
  attributed.fetch_add(1, std::memory_order_relaxed);
  return true;
}

int64_t pdl_attributed_launches() { return attributed.load(std::memory_order_relaxed); }

void check_launch(const char* what, cudaError_t launched) {
  if (launched != cudaSuccess) {
    (void)cudaGetLastError();  // the same error, recorded as the last one too
    fail(std::string("lasp2 (CUDA): launching ") + what + " failed: " + cudaGetErrorString(launched));
  }
  check_launch(what);
}

}  // namespace lasp2::cuda
