#include "lasp2/types.h"

namespace lasp2 {

std::size_t element_size(ScalarType type) {
  switch (type) {
    case ScalarType::kFloat32:
      return 4;
    case ScalarType::kFloat64:
      return 8;
    case ScalarType::kFloat16:
    case ScalarType::kBFloat16:
      return 2;
  }
  fail("lasp2: unknown scalar type");
}

const char* to_string(ScalarType type) {
  switch (type) {
    case ScalarType::kFloat32:
      return "float32";
    case ScalarType::kFloat64:
      return "float64";
    case ScalarType::kFloat16:
      return "float16";
    case ScalarType::kBFloat16:
      return "bfloat16";
  }
  return "unknown";
}

void fail(const std::string& message) { throw Error(message); }

}  // namespace lasp2
