// The strict environment-knob readers (env_knob.h): unset and empty give the default,
// whole base-10 integers in range and listed spellings are taken, anything else throws
// lasp2::Error naming the variable, the value and what is allowed.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "env_knob.h"
#include "expect_error.h"
#include "lasp2/types.h"

namespace lasp2 {
namespace {

constexpr const char* kVar = "LASP2_TEST_ENV_KNOB";

// Sets kVar (nullptr: unsets it) for one test and unsets it after.
struct KnobValue {
  explicit KnobValue(const char* value) {
    if (value == nullptr) unsetenv(kVar);
    else setenv(kVar, value, 1);
  }
  ~KnobValue() { unsetenv(kVar); }
};

// The message of the Error that f throws ("" and a failure where it returns).
template <typename F>
std::string error_of(F&& f) {
  try {
    f();
  } catch (const Error& e) {
    return e.what();
  }
  ADD_FAILURE() << "no lasp2::Error";
  return "";
}

TEST(EnvKnob, IntUnsetAndEmptyGiveTheFallback) {
  {
    KnobValue v(nullptr);
    EXPECT_EQ(env_int(kVar, 48, 0, 120), 48);
    EXPECT_EQ(env_int(kVar, -1, 0, 10), -1);  // the fallback is not range-checked
  }
  KnobValue v("");
  EXPECT_EQ(env_int(kVar, 256, 0, 1000), 256);
  EXPECT_EQ(env_int64(kVar, -7), -7);
}

TEST(EnvKnob, IntTakesWholeIntegersInRange) {
  struct Case {
    const char* s;
    int64_t want;
  };
  for (const Case& c : {Case{"0", 0}, Case{"12", 12}, Case{"120", 120}, Case{"-3", -3}, Case{"+5", 5},
                        Case{"007", 7}}) {
    KnobValue v(c.s);
    EXPECT_EQ(env_int(kVar, 99, -10, 120), c.want) << c.s;
  }
  KnobValue v("9000000000");  // past int, within int64
  EXPECT_EQ(env_int64(kVar, 0, 1, INT64_MAX), int64_t{9000000000});
}

TEST(EnvKnob, IntRangeEndsAreInclusive) {
  {
    KnobValue v("3");
    EXPECT_EQ(env_int(kVar, 0, 3, 6), 3);
  }
  KnobValue v("6");
  EXPECT_EQ(env_int(kVar, 0, 3, 6), 6);
}

TEST(EnvKnob, IntRejectsMalformedValues) {
  // std::atoi read "12x" as 12 and "abc" as 0; strtoll alone would take " 12"
  for (const char* bad : {"12x", "abc", "x12", " 12", "12 ", "1.5", "1e3", "-", "+", "--1", "0x10"}) {
    KnobValue v(bad);
    const std::string msg = error_of([] { env_int(kVar, 256, 0, 1000); });
    EXPECT_NE(msg.find(kVar), std::string::npos) << msg;
    EXPECT_NE(msg.find(std::string("\"") + bad + "\""), std::string::npos) << msg;
    EXPECT_NE(msg.find("[0, 1000]"), std::string::npos) << msg;
  }
}

TEST(EnvKnob, IntRejectsValuesOutOfRange) {
  for (const char* bad : {"-1", "121", "2147483648"}) {
    KnobValue v(bad);
    const std::string msg = error_of([] { env_int(kVar, 48, 0, 120); });
    EXPECT_NE(msg.find(std::string(kVar) + "=\"" + bad + "\""), std::string::npos) << msg;
    EXPECT_NE(msg.find("a base-10 integer in [0, 120]"), std::string::npos) << msg;
  }
}

TEST(EnvKnob, IntRejectsOverflow) {
  // int range without bounds: values past int fail rather than wrap
  for (const char* bad : {"2147483648", "-2147483649"}) {
    KnobValue v(bad);
    EXPECT_NE(error_of([] { env_int(kVar, 0); }).find(kVar), std::string::npos) << bad;
  }
  // past int64 (strtoll's ERANGE), either sign
  for (const char* bad : {"9223372036854775808", "-9223372036854775809", "99999999999999999999999"}) {
    KnobValue v(bad);
    EXPECT_NE(error_of([] { env_int64(kVar, 0); }).find(kVar), std::string::npos) << bad;
  }
  KnobValue v("9223372036854775807");
  EXPECT_EQ(env_int64(kVar, 0), INT64_MAX);
}

TEST(EnvKnob, ChoiceGivesTheIndexOrTheFallback) {
  {
    KnobValue v(nullptr);
    EXPECT_EQ(env_choice(kVar, {"old", "v6"}, -1), -1);
  }
  {
    KnobValue v("");
    EXPECT_EQ(env_choice(kVar, {"old", "v6"}, 10), 10);
  }
  {
    KnobValue v("old");
    EXPECT_EQ(env_choice(kVar, {"old", "v6"}, -1), 0);
  }
  KnobValue v("v6");
  EXPECT_EQ(env_choice(kVar, {"old", "v6"}, -1), 1);
}

TEST(EnvKnob, ChoiceRejectsOtherSpellings) {
  for (const char* bad : {"v7", "OLD", "old ", " v6", "v", "v66"}) {
    KnobValue v(bad);
    const std::string msg = error_of([] { env_choice(kVar, {"old", "v6", "tma"}, -1); });
    EXPECT_NE(msg.find(std::string(kVar) + "=\"" + bad + "\""), std::string::npos) << msg;
    EXPECT_NE(msg.find("one of: old, v6, tma"), std::string::npos) << msg;
  }
}

TEST(EnvKnob, FlagTakesZeroAndOne) {
  {
    KnobValue v(nullptr);
    EXPECT_TRUE(env_flag(kVar, true));
    EXPECT_FALSE(env_flag(kVar, false));
  }
  {
    KnobValue v("0");
    EXPECT_FALSE(env_flag(kVar, true));
  }
  {
    KnobValue v("1");
    EXPECT_TRUE(env_flag(kVar, false));
  }
  // env[0] == '0' used to read "00" and "0x" as off, and "no" as on
  for (const char* bad : {"00", "0x", "no", "true", "2"}) {
    KnobValue v(bad);
    lasp2::testing::expect_error_naming([] { env_flag(kVar, true); }, kVar);
  }
}

// A knob's message names its own variable, not another one's.
TEST(EnvKnob, MessageNamesTheVariableRead) {
  setenv("LASP2_TEST_ENV_KNOB_OTHER", "bad", 1);
  lasp2::testing::expect_error_naming([] { env_int("LASP2_TEST_ENV_KNOB_OTHER", 0); },
                                      "LASP2_TEST_ENV_KNOB_OTHER=\"bad\"");
  unsetenv("LASP2_TEST_ENV_KNOB_OTHER");
}

}  // namespace
}  // namespace lasp2
