// Helpers shared by the scheduler's implementation files (scheduler*.cpp); not part of the API.
#pragma once

#include <chrono>
#include <string>

#include "op.hpp"
#include "sync.hpp"
#include "types.hpp"

namespace kvsched::core::detail {

inline int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

inline std::string who(const std::string& rid, const Uuid* uuid) {
  std::string s = "request '" + cut_text(rid, kMaxQuotedBytes) + "'";
  if (uuid) s += " op " + uuid->str();
  return s;
}

[[noreturn]] inline void fail(ErrorCode code, const std::string& rid, const Uuid* uuid,
                       const std::string& what) {
  throw Error(code, who(rid, uuid) + ": " + what);
}

inline const char* mode_name(Mode m) { return m == Mode::kScheduled ? "SCHEDULED" : "IMMEDIATE"; }

// S1: the second half of an operation must name the request id and mode its first half named.
// `first` and `second` name the sides ("worker", "transfer") for the message.
inline void check_halves_agree(const Op& op, const std::string& rid, const Uuid& uuid, Mode mode,
                        const char* first, const char* second) {
  if (op.rid != rid)
    fail(ErrorCode::kProtocol, rid, &uuid,
         std::string("halves disagree on the request id (") + first + " half says '" + op.rid +
             "')");
  if (op.mode != mode)
    fail(ErrorCode::kProtocol, rid, &uuid,
         std::string("halves disagree on the mode (") + first + " half is " + mode_name(op.mode) +
             ", " + second + " half " + mode_name(mode) + ")");
}

inline void bump(Atomic<uint64_t>& c) {
  // order: relaxed — statistic only; never read to make a decision.
  c.fetch_add(1, std::memory_order_relaxed);
}

}  // namespace kvsched::core::detail
