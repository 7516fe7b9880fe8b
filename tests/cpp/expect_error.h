// The check of the bad-input tests: a call must throw lasp2::Error whose message names
// the field or buffer at fault (so a user can tell what to fix), not crash or return.
#pragma once

#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "lasp2/types.h"

namespace lasp2::testing {

inline void expect_error_naming(const std::function<void()>& call, const std::string& name) {
  try {
    call();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(name), std::string::npos)
        << "the message does not name " << name << ": " << e.what();
    return;
  }
  ADD_FAILURE() << "no lasp2::Error naming " << name;
}

}  // namespace lasp2::testing
