#include "env_knob.h"

#include <cerrno>
#include <cstdlib>
#include <string>

#include "lasp2/types.h"

namespace lasp2 {
namespace {

// The variable's value, null where unset or empty (both the default).
const char* knob_value(const char* name) {
  const char* s = std::getenv(name);
  return s != nullptr && *s != '\0' ? s : nullptr;
}

[[noreturn]] void fail_knob(const char* name, const char* value, const std::string& allowed) {
  fail(std::string("lasp2: environment variable ") + name + "=\"" + value + "\": must be " + allowed +
       " (or unset for the default)");
}

// Digits only after an optional sign: strtoll alone would take leading spaces and stop at
// the first non-digit ("12x" -> 12).
bool parse_int64(const char* s, int64_t* out) {
  const char* d = (*s == '-' || *s == '+') ? s + 1 : s;
  if (*d == '\0') return false;
  for (const char* c = d; *c != '\0'; ++c)
    if (*c < '0' || *c > '9') return false;
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(s, &end, 10);
  if (errno == ERANGE || *end != '\0') return false;  // overflow
  *out = static_cast<int64_t>(v);
  return true;
}

}  // namespace

int64_t env_int64(const char* name, int64_t fallback, int64_t lo, int64_t hi) {
  const char* s = knob_value(name);
  if (s == nullptr) return fallback;
  int64_t v = 0;
  if (!parse_int64(s, &v) || v < lo || v > hi)
    fail_knob(name, s, "a base-10 integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

int env_int(const char* name, int fallback, int lo, int hi) {
  return static_cast<int>(env_int64(name, fallback, lo, hi));
}

int env_choice(const char* name, std::initializer_list<const char*> allowed, int fallback) {
  const char* s = knob_value(name);
  if (s == nullptr) return fallback;
  int i = 0;
  std::string list;
  for (const char* a : allowed) {
    if (std::string(s) == a) return i;
    list += (i == 0 ? "" : ", ") + std::string(a);
    ++i;
  }
  fail_knob(name, s, "one of: " + list);
}

bool env_flag(const char* name, bool fallback) {
  const int i = env_choice(name, {"0", "1"}, -1);
  return i < 0 ? fallback : i == 1;
}

}  // namespace lasp2
