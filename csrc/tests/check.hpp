// A minimal test harness for the C++ core: CHECK macros that count failures and say where.
#pragma once

#include <cstdio>
#include <cstdlib>

namespace kvsched::test {
inline int& failures() {
  static int n = 0;
  return n;
}
}  // namespace kvsched::test

#define CHECK(cond)                                                               \
  do {                                                                            \
    if (!(cond)) {                                                                \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++kvsched::test::failures();                                                \
    }                                                                             \
  } while (0)

#define CHECK_THROWS(expected_code, stmt)                                                        \
  do {                                                                                  \
    bool thrown_ = false;                                                               \
    try {                                                                               \
      stmt;                                                                             \
    } catch (const kvsched::core::Error& e_) {                                          \
      thrown_ = e_.code() == (expected_code);                                                    \
      if (!thrown_) std::fprintf(stderr, "%s:%d: wrong error: %s\n", __FILE__, __LINE__, e_.what()); \
    }                                                                                   \
    if (!thrown_) {                                                                     \
      std::fprintf(stderr, "%s:%d: expected error from: %s\n", __FILE__, __LINE__, #stmt); \
      ++kvsched::test::failures();                                                      \
    }                                                                                   \
  } while (0)
