// One request's slot: the set of operations its worker enqueued and their outcome counters.
//
// Contract
//   - `open` is the number of enqueued operations that have not ended. is_complete() is one
//     acquire load (wait-free); the counters are published before `open` is decremented, so a
//     reader that sees open == 0 sees final counters.
//   - `ops`, `errors`, `removed`, `cancelled` are guarded by `mu`. The core never calls out of a
//     Slot while holding `mu` (no decision, no end of an op), so `mu` is a leaf lock except for
//     the join-table shard locks taken under it by enqueue/remove (lock order: slot -> shard).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "op.hpp"
#include "sync.hpp"
#include "types.hpp"

namespace kvsched::core {

struct Slot {
  explicit Slot(std::string r) : rid(std::move(r)) { ops.reserve(8); }

  const std::string rid;

  mutable Mutex mu;
  std::vector<OpPtr> ops;                            // guarded by mu
  std::vector<std::pair<Uuid, std::string>> errors;  // guarded by mu
  bool removed = false;                              // guarded by mu
  bool cancelled = false;                            // guarded by mu

  Atomic<uint64_t> expected{0};
  Atomic<uint64_t> completed{0};
  Atomic<uint64_t> failed{0};
  Atomic<uint64_t> cancelled_ops{0};
  Atomic<uint64_t> open{0};

  bool is_complete() const {
    // order: acquire — pairs with the acq_rel fetch_sub in Scheduler::count_into_slot(); a reader
    // that sees 0 also sees the outcome counters and errors written before it.
    return open.load(std::memory_order_acquire) == 0;
  }
};

}  // namespace kvsched::core
