// Value types shared by the whole core: uuids, enums, requirements and the error type.
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <string>
#include <utility>

namespace kvsched::core {

// A 128-bit operation id, big-endian halves (hi holds the first 8 bytes of the canonical form).
struct Uuid {
  uint64_t hi = 0;
  uint64_t lo = 0;
  bool operator==(const Uuid& o) const { return hi == o.hi && lo == o.lo; }
  bool operator!=(const Uuid& o) const { return !(*this == o); }

  // Canonical 8-4-4-4-12 lowercase form, as Python's str(uuid.UUID) prints it.
  std::string str() const {
    char buf[37];
    std::snprintf(buf, sizeof buf, "%08x-%04x-%04x-%04x-%012llx", static_cast<unsigned>(hi >> 32),
                  static_cast<unsigned>((hi >> 16) & 0xffff), static_cast<unsigned>(hi & 0xffff),
                  static_cast<unsigned>(lo >> 48),
                  static_cast<unsigned long long>(lo & 0xffffffffffffULL));
    return std::string(buf, 36);
  }
};

struct UuidHash {
  size_t operator()(const Uuid& u) const {
    // uuid4 bits are already random; a multiply-xorshift mixes in both halves for other schemes.
    uint64_t x = u.hi ^ (u.lo * 0x9e3779b97f4a7c15ULL);
    x ^= x >> 29;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 32;
    return static_cast<size_t>(x);
  }
};

enum class Kind : uint8_t { kLoad = 0, kStore = 1 };
enum class Mode : uint8_t { kScheduled = 0, kImmediate = 1 };
enum class Decision : uint8_t { kNone = 0, kExecute = 1, kCancel = 2 };
enum class Outcome : uint8_t { kOpen = 0, kCompleted = 1, kFailed = 2, kCancelled = 3 };

// Progress and requirements share one totally ordered 64-bit "position":
//   position = iteration << 24 | stage
// where stage is the number of layers complete in that iteration, or kIterationDone once the
// iteration is marked complete. A requirement holds exactly when progress >= its position, which
// covers every clause of contract S2 (docs/contract.md) with one comparison (a later iteration
// compares above every stage of an earlier one). Position 0 is "no requirement".
constexpr int kStageBits = 24;
constexpr uint64_t kIterationDone = (uint64_t{1} << kStageBits) - 1;
constexpr uint64_t kMaxLayer = kIterationDone - 2;             // so layer + 1 < kIterationDone
constexpr uint64_t kMaxIteration = (uint64_t{1} << 40) - 1;

constexpr uint64_t make_position(uint64_t iteration, uint64_t stage) {
  return (iteration << kStageBits) | stage;
}
constexpr uint64_t position_iteration(uint64_t p) { return p >> kStageBits; }
constexpr uint64_t position_stage(uint64_t p) { return p & kIterationDone; }

// Requirement LayerComplete(layer, iteration): layer `layer` done means layer+1 layers done.
constexpr uint64_t layer_requirement(uint64_t layer, uint64_t iteration) {
  return make_position(iteration, layer + 1);
}
constexpr uint64_t iteration_requirement(uint64_t iteration) {
  return make_position(iteration, kIterationDone);
}

enum class ErrorCode : uint8_t {
  kSlotExists,
  kUnknownSlot,
  kSlotBusy,
  kDuplicate,
  kProtocol,
  kClosed,
  kInvalidArgument,
  kForked,  // the scheduler was inherited by a forked child (fork_guard.hpp)
};

// Bounds on text the core keeps or quotes. An error recorded on a slot (slot_status().errors) is
// cut to kMaxErrorBytes: a caller's 50 MB message must not live in every snapshot. A request id
// quoted in an error message is cut to kMaxQuotedBytes: the message names the request, it does
// not copy a 10 MB id.
constexpr size_t kMaxErrorBytes = 4096;
constexpr size_t kMaxQuotedBytes = 200;

// `text` unchanged when it fits in `max` bytes, else its first bytes and how much was cut. The
// cut never splits a UTF-8 sequence (it backs up over continuation bytes).
inline std::string cut_text(const std::string& text, size_t max) {
  if (text.size() <= max) return text;
  size_t n = max;
  while (n > 0 && (static_cast<unsigned char>(text[n]) & 0xC0) == 0x80) --n;
  return text.substr(0, n) + "... (" + std::to_string(text.size() - n) + " more bytes)";
}

// The one exception type of the core. Every public operation validates before it mutates, so an
// Error always leaves the scheduler as it was (contract S8, docs/contract.md). The binding layer
// maps `code` to the Python class of the same name in kvsched/errors.py.
class Error : public std::exception {
 public:
  Error(ErrorCode code, std::string message) : code_(code), message_(std::move(message)) {}
  ErrorCode code() const { return code_; }
  const char* what() const noexcept override { return message_.c_str(); }

 private:
  ErrorCode code_;
  std::string message_;
};

}  // namespace kvsched::core
