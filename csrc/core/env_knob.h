// Strict readers of the backends' environment knobs (LASP2_CUDA_*, LASP2_DELTA_*).
// The knobs choose kernels and sizes for tests and benchmarks; a misspelt value must not
// silently pick the default (or, with std::atoi, 0), so anything but an allowed value
// throws lasp2::Error naming the variable, the value and what it takes. Unset and empty
// both mean the default (the tests' EnvGuard unsets with an empty value). Each call reads
// the environment anew: the tests switch knobs between launches.
#pragma once

#include <climits>
#include <cstdint>
#include <initializer_list>

namespace lasp2 {

// The whole value as a base-10 integer (an optional sign, then digits only) in [lo, hi];
// `fallback` (not range-checked) when unset or empty.
int64_t env_int64(const char* name, int64_t fallback, int64_t lo = INT64_MIN, int64_t hi = INT64_MAX);
int env_int(const char* name, int fallback, int lo = INT_MIN, int hi = INT_MAX);

// The index in `allowed` of the value (exact, case-sensitive spelling); `fallback`
// (any int, e.g. -1 for "the default") when unset or empty.
int env_choice(const char* name, std::initializer_list<const char*> allowed, int fallback);

// A switch: "0" false, "1" true, `fallback` when unset or empty.
bool env_flag(const char* name, bool fallback);

}  // namespace lasp2
